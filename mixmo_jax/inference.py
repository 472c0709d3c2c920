"""Jitted, sharded inference over a whole dataset (shared by training-time
evaluation, `evaluate` and `predict`).

At test time every stem sees the same image and the core gets the sum of the
stem outputs (paper section 3.1, Algorithm 1 lines 36-39); the model returns
each member's logits [B, M, C] and the ensemble is formed in `metrics`.
"""
import functools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mixmo_jax import augment, input_pipeline, sharding


def make_predict_fn(model, mesh, mean: Sequence[float],
                    std: Sequence[float]) -> Callable:
  """Returns jitted `f(variables, images [B, H, W, 3] uint8) -> [B, M, C]`.

  `images` is sharded over the mesh's 'data' axis, `variables` replicated.
  """

  def predict(variables, images):
    x = augment.normalize(images, tuple(mean), tuple(std))
    return model.apply(variables, x, train=False)

  return jax.jit(
      predict,
      in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
      out_shardings=sharding.data_sharded(mesh))


def predict_member_logits(predict_fn: Callable, variables, images: np.ndarray,
                          batch_size: int, mesh) -> np.ndarray:
  """Member logits for a whole dataset, padding and masking the last batch.

  Args:
    predict_fn: from `make_predict_fn`.
    variables: {'params', 'batch_stats'}, replicated on `mesh`.
    images: uint8 [N, H, W, 3], the same on every process.
    batch_size: global eval batch size, divisible by the device count.
    mesh: the mesh `predict_fn` was built for.

  Returns:
    float32 [N, M, C] on the host (every process gets all of it).
  """
  labels = np.zeros(len(images), np.int32)
  slicer = input_pipeline.process_slice(
      batch_size, jax.process_index(), jax.process_count())
  outputs = []
  for batch_images, _, mask in input_pipeline.eval_batches(
      images, labels, batch_size):
    batch = sharding.global_batch(batch_images[slicer], mesh)
    logits = predict_fn(variables, batch)
    if jax.process_count() > 1:
      logits = multihost_utils.process_allgather(logits, tiled=True)
    outputs.append(np.asarray(logits)[mask])
  return np.concatenate(outputs, axis=0)


@functools.lru_cache(maxsize=8)
def _cached_predict_fn(model, mesh, mean, std):
  return make_predict_fn(model, mesh, mean, std)


def predict_with_config(model, config, variables, images, mesh) -> np.ndarray:
  """`predict_member_logits` with the config's normalisation and batch size."""
  fn = _cached_predict_fn(model, mesh, tuple(config.image_mean),
                          tuple(config.image_std))
  return predict_member_logits(fn, variables, images, config.eval_batch_size,
                               mesh)
