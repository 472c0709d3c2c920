"""Predictions of a trained run on new images: probabilities and uncertainty.

  from mixmo_jax import predict
  predictor = predict.load('/tmp/digits')        # latest verified checkpoint
  out = predictor(images)                         # uint8 [B, H, W, 3]
  out['probs'].argmax(-1), out['mutual_information']

Input rule: `images` is [B, H, W, 3] with H = W = config.image_size, either
  * uint8 with values in [0, 255] (as stored in the datasets), or
  * floating point with values in [0, 1] (e.g. uint8 / 255); anything outside
    [-1e-3, 1 + 1e-3] is refused, since it is almost surely a [0, 255] float.
The training normalisation of the run's own config is applied on device,
(x - image_mean) / image_std with x in [0, 1]; for uint8 this is exactly the
`augment.normalize` of training and evaluation, and the images go through
the same inference path as `evaluate` (`evaluation.inference`), so the
logits equal those of `evaluate` bit for bit on the same devices.

Outputs (NumPy float32; B images, M members, C classes), from the member
logits z_i [B, M, C] and member probabilities p_i = softmax(z_i):
  logits              z [B, M, C]
  member_probs        p_i [B, M, C]
  probs               the ensemble as configured (config.evaluation.ensemble,
                      exactly `metrics.ensemble_log_probs`): softmax(mean_i z_i)
                      for 'logits' (MixMo), mean_i p_i for 'probs' (MIMO) [B, C]
  entropy             predictive entropy H(probs) = -sum_c probs_c log probs_c
                      [B]
  expected_entropy    mean_i H(p_i): the aleatoric part [B]
  mutual_information  H(mean_i p_i) - mean_i H(p_i) [B], the epistemic part
                      (BALD; Houlsby et al. 2011, Depeweg et al. 2018): >= 0
                      by concavity of H (rounding below 0 is clipped to 0).
                      It is always defined on the *probability* mean, so with
                      a logit-averaged ensemble entropy != expected_entropy +
                      mutual_information in general (equal for 'probs').

The member logits come from the jitted, sharded inference path (batches of
config.eval_batch_size rounded up to a multiple of the local device count,
the last one padded); the ensemble quantities are computed from them on the
host, so changing `predictor.config.evaluation.ensemble` does not recompile.
"""

import numpy as np

from mixmo_jax import checkpointing, models, sharding, storage
from mixmo_jax import workdir as wd
from mixmo_jax.evaluation import inference, metrics, runs

UNIT_TOLERANCE = 1e-3
OUTPUT_KEYS = ('logits', 'member_probs', 'probs', 'entropy', 'expected_entropy',
               'mutual_information')
ENSEMBLE_MODES = metrics.ENSEMBLE_MODES


def _entropy(log_probs: np.ndarray) -> np.ndarray:
  """H = -sum_c exp(lp_c) lp_c over the last axis (lp finite)."""
  return -np.sum(np.exp(log_probs) * log_probs, axis=-1)


class Predictor:
  """A restored run that maps images [B, H, W, 3] to probabilities.

  Attributes:
    config: the run's ConfigDict (from config.json); `evaluation.ensemble`
      is read at every call.
    step: the checkpoint step.
    variables: {'params', 'batch_stats'}, replicated on `mesh`.
    mesh: one-axis mesh of the local devices.
  """

  def __init__(self, config, variables, step: int, mesh=None):
    self.config = config
    self.step = int(step)
    self.mesh = sharding.local_mesh() if mesh is None else mesh
    self.variables = sharding.replicate(variables, self.mesh)
    self.model = models.get_model(config)
    self.source = f'at step {self.step}'  # `load` adds the workdir.

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def check_images(self, images) -> np.ndarray:
    """The images as uint8 or float32 [B, H, W, 3], or a one-line ValueError."""
    images = np.asarray(images)
    size = self.config.image_size
    expected = (size, size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f'expected images of shape [B, {size}, {size}, 3], got '
                       f'{list(images.shape)}')
    if images.dtype == np.uint8:
      return images
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f'images must be uint8 in [0, 255] or floating in '
                       f'[0, 1], got dtype {images.dtype}')
    images = images.astype(np.float32)
    if images.size and not (np.all(np.isfinite(images)) and
                            images.min() >= -UNIT_TOLERANCE and
                            images.max() <= 1.0 + UNIT_TOLERANCE):
      raise ValueError(f'floating images must be in [0, 1] (pass uint8 for '
                       f'[0, 255]); got values in [{images.min()}, '
                       f'{images.max()}]')
    return images

  def __call__(self, images) -> dict[str, np.ndarray]:
    """Predictions for images [B, H, W, 3] (see the module docstring).

    Returns:
      {'logits' [B, M, C], 'member_probs' [B, M, C], 'probs' [B, C],
       'entropy' [B], 'expected_entropy' [B], 'mutual_information' [B]},
      NumPy float32.

    Raises:
      ValueError: wrong shape or dtype, or floats outside [0, 1].
      runs.NonFiniteOutputError (a ValueError): the checkpoint predicts NaN
        or inf (diverged parameters), naming it.
    """
    mode = self.config.evaluation.ensemble
    if mode not in ENSEMBLE_MODES:
      raise ValueError(f'config.evaluation.ensemble must be one of '
                       f'{ENSEMBLE_MODES}, got {mode!r}')
    images = self.check_images(images)
    if len(images) == 0:
      m, c = self.config.num_members, self.config.num_classes
      empty = {'logits': (0, m, c), 'member_probs': (0, m, c), 'probs': (0, c)}
      return {k: np.zeros(empty.get(k, (0,)), np.float32) for k in OUTPUT_KEYS}
    if images.dtype != np.uint8:  # Floats in [0, 1]: to the uint8 scale.
      images = images * np.float32(255.0)
    logits = inference.predict_with_config(self.model, self.config,
                                           self.variables, images, self.mesh)
    runs.check_finite(logits, self.source)
    z = logits.astype(np.float64)
    member_lp = metrics.log_softmax(z)  # Shape: [B, M, C].
    ensemble_lp = metrics.ensemble_log_probs(z, mode)
    mean_probs_lp = metrics.ensemble_log_probs(z, 'probs')
    expected_entropy = np.mean(_entropy(member_lp), axis=-1)
    mutual_information = _entropy(mean_probs_lp) - expected_entropy
    out = {
        'logits': logits,
        'member_probs': np.exp(member_lp),
        'probs': np.exp(ensemble_lp),
        'entropy': _entropy(ensemble_lp),
        'expected_entropy': expected_entropy,
        'mutual_information': np.maximum(mutual_information, 0.0),
    }
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def load(workdir: str, step: checkpointing.Step = None) -> Predictor:
  """A `Predictor` for the run in `workdir` (the verified checkpoint and the
  config stored with it).

  Args:
    workdir: a training workdir.
    step: checkpoint step, or 'best' (the checkpoint of best ensemble test
      top-1, kept by `keep_best_checkpoint`); default: the latest.

  Raises:
    FileNotFoundError: no workdir or config.json.
    checkpointing.CheckpointError: no checkpoint (at `step`), or a corrupt one.
  """
  if wd.url_problem(workdir):
    raise ValueError(wd.url_problem(workdir))
  if not wd.checkpoint_steps(workdir):
    if not storage.isdir(workdir):
      raise FileNotFoundError(f'workdir {workdir} does not exist')
    raise checkpointing.CheckpointError(f'no checkpoint in {workdir}')
  try:  # The config stored with the checkpoints; config.json compared.
    config = runs.read_config(workdir)
  except runs.EvaluationError as e:
    raise FileNotFoundError(str(e)) from None
  run = runs.restore_run(workdir, config, step)
  predictor = Predictor(run.config, run.variables, run.step)
  predictor.source = f'at step {run.step} in {workdir}'
  return predictor
