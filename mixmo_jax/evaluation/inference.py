"""The one inference path: normalise, pad, shard, run (training-time
evaluation, `evaluate` and `predict` all use it).

At test time every stem sees the same image and the core gets the sum of the
stem outputs (paper Sec. 3.1, Algorithm 1 lines 36-39); the model returns
each member's logits [B, M, C] and the ensemble is formed in `metrics`.
The whole set is cut into batches of a fixed size (a multiple of the device
count), the last one padded and its padding dropped, so every sample counts
once and all batches share one compiled program.
"""
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from mixmo_jax import sharding
from mixmo_jax.data import augment, pipeline


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
    batch_size: global eval batch size, divisible by the device count;
      capped at N rounded up to a multiple of the device count (a larger
      batch would only be padding, and memory).
    mesh: the mesh `predict_fn` was built for.

  Returns:
    float32 [N, M, C] on the host (every process gets all of it).
  """
  batch_size = min(batch_size,
                   rounded_batch_size(max(len(images), 1), mesh.devices.size))
  labels = np.zeros(len(images), np.int32)
  slicer = pipeline.process_slice(batch_size, jax.process_index(),
                                  jax.process_count())
  outputs = []
  for batch_images, _, mask in pipeline.eval_batches(images, labels,
                                                     batch_size):
    batch = sharding.global_batch(batch_images[slicer], mesh)
    logits = predict_fn(variables, batch)
    if jax.process_count() > 1:
      logits = multihost_utils.process_allgather(logits, tiled=True)
    outputs.append(np.asarray(logits)[mask])
  return np.concatenate(outputs, axis=0)


def rounded_batch_size(batch_size: int, num_devices: int) -> int:
  """The smallest multiple of `num_devices` >= batch_size."""
  return -(-int(batch_size) // num_devices) * num_devices


@functools.lru_cache(maxsize=8)
def _cached_predict_fn(model, mesh, mean, std):
  return make_predict_fn(model, mesh, mean, std)


def predict_with_config(model, config, variables, images, mesh,
                        batch_size: int | None = None) -> np.ndarray:
  """`predict_member_logits` with the config's normalisation.

  Args:
    model, config: the run's network and config.
    variables: replicated on `mesh`.
    images: uint8 (or float on the [0, 255] scale) [N, H, W, 3].
    mesh: the mesh `variables` live on.
    batch_size: default config.eval_batch_size; rounded up to a multiple of
      the mesh's device count (padding is dropped, results unchanged).

  Returns:
    float32 [N, M, C].
  """
  fn = _cached_predict_fn(model, mesh, tuple(config.image_mean),
                          tuple(config.image_std))
  size = rounded_batch_size(batch_size or config.eval_batch_size,
                            mesh.devices.size)
  return predict_member_logits(fn, variables, images, size, mesh)
