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
`augment.normalize` of training and evaluation, so the logits equal those of
`evaluate` bit for bit on the same device count and batch size.

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

Everything is one jitted function over a mesh of the local devices: the batch
is padded up to a multiple of the device count (or cut into chunks of
config.eval_batch_size, rounded likewise) and the padding stripped. Each new
padded batch size compiles once; the ensemble mode is chosen on the host, so
changing `predictor.config.evaluation.ensemble` does not recompile.
"""
import functools
import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mixmo_jax import augment, checkpointing, metrics, models, sharding

UNIT_TOLERANCE = 1e-3
OUTPUT_KEYS = ('logits', 'member_probs', 'probs', 'entropy',
               'expected_entropy', 'mutual_information')


def _entropy(log_probs):
  """H = -sum_c exp(lp_c) lp_c over the last axis (lp finite)."""
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def _forward(model, variables, images, mean, std):
  """Member logits and every ensemble quantity, for both ensemble modes.

  Args:
    model: the flax module.
    variables: {'params', 'batch_stats'}.
    images: uint8 [B, H, W, 3] in [0, 255] or float32 in [0, 1].
    mean, std: static 3-tuples, config.image_mean / image_std.

  Returns:
    dict of float32 arrays: logits, member_probs [B, M, C]; log_probs_logits,
    log_probs_probs [B, C]; entropy_logits, entropy_probs, expected_entropy
    [B].
  """
  if images.dtype != jnp.uint8:  # Floats in [0, 1]: to the uint8 scale.
    images = images * 255.0
  x = augment.normalize(images, mean, std)
  logits = model.apply(variables, x, train=False).astype(jnp.float32)
  member_lp = jax.nn.log_softmax(logits, axis=-1)  # Shape: [B, M, C].
  lp_logits = metrics.ensemble_log_probs(logits, 'logits')  # Shape: [B, C].
  lp_probs = metrics.ensemble_log_probs(logits, 'probs')  # Shape: [B, C].
  return {
      'logits': logits,
      'member_probs': jnp.exp(member_lp),
      'log_probs_logits': lp_logits,
      'log_probs_probs': lp_probs,
      'entropy_logits': _entropy(lp_logits),
      'entropy_probs': _entropy(lp_probs),
      'expected_entropy': jnp.mean(_entropy(member_lp), axis=-1),
  }


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
    if mesh is None:
      mesh = sharding.make_mesh(jax.local_devices())
    self.mesh = mesh
    self.variables = sharding.replicate(variables, self.mesh)
    self.model = models.get_model(config)
    self._fn = jax.jit(
        functools.partial(_forward, self.model),
        static_argnums=(2, 3),
        in_shardings=(sharding.replicated(self.mesh),
                      sharding.data_sharded(self.mesh)),
        out_shardings=sharding.data_sharded(self.mesh))

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
    if images.size and not (np.all(np.isfinite(images))
                            and images.min() >= -UNIT_TOLERANCE
                            and images.max() <= 1.0 + UNIT_TOLERANCE):
      raise ValueError(f'floating images must be in [0, 1] (pass uint8 for '
                       f'[0, 255]); got values in [{images.min()}, '
                       f'{images.max()}]')
    return images

  def _chunk_size(self) -> int:
    n = self.num_devices
    return -(-self.config.eval_batch_size // n) * n

  def _run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """One padded chunk through the jitted function; padding stripped."""
    count = len(images)
    padded = -(-count // self.num_devices) * self.num_devices
    if padded != count:
      pad = np.zeros((padded - count,) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad])
    batch = jax.device_put(images, sharding.data_sharded(self.mesh))
    out = self._fn(self.variables, batch,
                   tuple(float(v) for v in self.config.image_mean),
                   tuple(float(v) for v in self.config.image_std))
    return {k: np.asarray(v)[:count] for k, v in out.items()}

  def __call__(self, images) -> Dict[str, np.ndarray]:
    """Predictions for images [B, H, W, 3] (see the module docstring).

    Returns:
      {'logits' [B, M, C], 'member_probs' [B, M, C], 'probs' [B, C],
       'entropy' [B], 'expected_entropy' [B], 'mutual_information' [B]},
      NumPy float32.

    Raises:
      ValueError: wrong shape or dtype, or floats outside [0, 1].
    """
    mode = self.config.evaluation.ensemble
    if mode not in ('logits', 'probs'):
      raise ValueError(f"config.evaluation.ensemble must be 'logits' or "
                       f"'probs', got {mode!r}")
    images = self.check_images(images)
    if len(images) == 0:
      m, c = self.config.num_members, self.config.num_classes
      empty = {'logits': (0, m, c), 'member_probs': (0, m, c), 'probs': (0, c)}
      return {k: np.zeros(empty.get(k, (0,)), np.float32) for k in OUTPUT_KEYS}
    chunk = self._chunk_size()
    parts = [self._run(images[i:i + chunk])
             for i in range(0, len(images), chunk)]
    raw = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    mutual_information = raw['entropy_probs'] - raw['expected_entropy']
    return {
        'logits': raw['logits'],
        'member_probs': raw['member_probs'],
        'probs': np.exp(raw[f'log_probs_{mode}']),
        'entropy': raw[f'entropy_{mode}'],
        'expected_entropy': raw['expected_entropy'],
        'mutual_information': np.maximum(mutual_information, 0.0),
    }


def load(workdir: str, step: Optional[int] = None) -> Predictor:
  """A `Predictor` for the run in `workdir` (config.json + verified checkpoint).

  Args:
    workdir: a training workdir.
    step: checkpoint step (default: the latest).

  Raises:
    FileNotFoundError: no workdir or config.json.
    checkpointing.CheckpointError: no checkpoint (at `step`), or a corrupt one.
  """
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} is missing: not a training workdir')
  if not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    raise checkpointing.CheckpointError(f'no checkpoint in {workdir}')
  config, variables, restored = checkpointing.restore_for_inference(workdir,
                                                                    step)
  return Predictor(config, variables, restored)
