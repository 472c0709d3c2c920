"""Out-of-distribution detection: the test set against registered OOD sets.

    python -m mixmo_jax.evaluate --workdir=DIR --ood=svhn_cropped,cifar10

Each OOD set is a registered dataset (`mixmo_jax.data`: e.g. svhn_cropped,
cifar10, cifar100, digits_inverted), read as the run's config would read it
(same data_dir, manual_dir, image_size, data_seed; its 'test' split) and
predicted by the same inference path as the test set. Its labels are
ignored. `metrics.ood_metrics` scores in-distribution test images against
OOD images by the max probability, the entropy and the Dempster-Shafer
uncertainty. eval.json['ood'][name] = {auroc_msp, aupr_in_msp, aupr_out_msp,
tnr_at_tpr95_msp, the same four for entropy, dempster_shafer_mean_logits
and dempster_shafer_members (`metrics.ood_scores`), num_in, num_ood, split}.
"""
from typing import Any
from collections.abc import Sequence

import numpy as np

from mixmo_jax import data
from mixmo_jax.evaluation import metrics
from mixmo_jax.evaluation.runs import EvaluationError, Run, predict_members

OOD_SPLIT = 'test'


def check_names(names: Sequence[str], config) -> None:
  """EvaluationError (one line) for an OOD name that is not a registered
  dataset, is the run's own dataset, or cannot give the run's image size."""
  allowed = [n for n in data.dataset_names() if n != config.dataset]
  for name in names:
    if name not in data.dataset_names():
      raise EvaluationError(f'--ood: unknown dataset {name!r}; allowed: '
                            f'{", ".join(allowed)}')
    if name == config.dataset:
      raise EvaluationError(f'--ood: {name!r} is the in-distribution dataset')
    spec = data.get_dataset(name)
    if not spec.resizable and spec.image_size != config.image_size:
      raise EvaluationError(
          f'--ood: {name} images are {spec.image_size}x{spec.image_size}, '
          f'the run expects {config.image_size}x{config.image_size}')


def load_ood_images(config, name: str) -> np.ndarray:
  """The OOD set's 'test' images uint8 [N', H, W, 3], read with the run's
  data fields (DatasetUnavailableError when it is nowhere to be found)."""
  ood_config = config.copy_and_resolve_references()
  with ood_config.unlocked():
    ood_config.dataset = name
  return data.load_split(ood_config, OOD_SPLIT)[0]


def evaluate_ood(
    runs: Sequence[Run], names: Sequence[str], mesh, test_logits: np.ndarray,
    eval_batch_size: int | None = None) -> dict[str, dict[str, Any]]:
  """{name: metrics.ood_metrics(test, OOD) + {'split'}} for each OOD set.

  Args:
    runs: the evaluated runs (members concatenated as for the test set).
    names: registered dataset names.
    mesh: local mesh of the inference path.
    test_logits: the members' test-set logits [N, sum M, C].
    eval_batch_size: as for the test set.
  """
  config = runs[0].config
  check_names(names, config)
  out = {}
  for name in names:
    images = load_ood_images(config, name)
    ood_logits = predict_members(runs, images, mesh, eval_batch_size)
    out[name] = metrics.ood_metrics(test_logits, ood_logits,
                                    config.evaluation.ensemble)
    out[name]['split'] = OOD_SPLIT
  return out
