"""Which samples each step uses, and the test set in fixed-size batches.

Everything random about a batch except *which* samples it holds runs on device
inside the jitted train step. Here:

- `train_indices(seed, step, ...)`: the step's unique samples, a pure function
  of (seed, step) (Algorithm 1 line 2: each epoch is a permutation of the
  training set cut into N // (B / b) chunks of B / b samples; the remainder is
  dropped). Mid-epoch resume is therefore exact.
- `process_slice`: the contiguous part of those samples this host feeds.
- `eval_batches`: the test set once, the last batch padded and masked.
"""
import functools

import jax
import numpy as np

from mixmo_jax import keys

# ---------------------------------------------------------------- training order


def unique_per_step(config):
  """B / b: the unique samples per step (batch_size counts the repetitions)."""
  b = config.batch_repetitions
  if config.batch_size % b:
    raise ValueError(f'batch_size {config.batch_size} is not a multiple of '
                     f'batch_repetitions {b}.')
  return config.batch_size // b


def steps_per_epoch(config, num_train):
  """N * b // B (Algorithm 1 line 2); the last incomplete chunk is dropped."""
  return num_train * config.batch_repetitions // config.batch_size


def _cpu_device():
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # CPU backend disabled (JAX_PLATFORMS without cpu).
    return None


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed, epoch, num_train):
  """int64 [N] (read-only): permutation(keys.epoch_key(seed, epoch), N).

  Computed on the CPU device (integer threefry bits, the same on every
  backend) and cached, so the steps of an epoch cost no recomputation.
  """
  with jax.default_device(_cpu_device()):
    key = keys.epoch_key(seed, epoch)
    perm = np.asarray(jax.random.permutation(key, num_train), np.int64)
  perm.flags.writeable = False
  return perm


def train_indices(seed, step, num_train, num_unique):
  """The unique sample indices of a step: a pure function of (seed, step).

  With S = num_train // num_unique steps per epoch, epoch e = step // S and
  the step takes chunk (step % S) of epoch e's permutation.

  Args:
    seed: int, config.seed.
    step: int >= 0, the global step (0-indexed).
    num_train: N.
    num_unique: U = B / b.

  Returns:
    int64 [U], distinct indices into the training arrays.
  """
  per_epoch = num_train // num_unique
  if per_epoch < 1:
    raise ValueError(f'{num_train} training samples cannot fill one step of '
                     f'{num_unique} unique samples.')
  epoch, chunk = divmod(int(step), per_epoch)
  perm = epoch_permutation(int(seed), epoch, int(num_train))
  return perm[chunk * num_unique:(chunk + 1) * num_unique].copy()


# Salt of the partner key: fold_in(fold_in(data_key, PARTNER_SALT), step).
PARTNER_SALT = 0x9A27E5


def needs_partners(config) -> bool:
  """Whether the step's pixel mix takes partners x_k from the training set.

  In-pixel CutMix / Mixup with MixMo (M > 1), and the single-network
  baselines with `pixel_mix_rule='per_sample'` (the authors' rule); the
  'batch' rule permutes the batch instead.
  """
  aug = config.augment
  if aug.pixel_mix == 'none':
    return False
  return config.num_members > 1 or aug.pixel_mix_rule == 'per_sample'


def partner_indices(seed, step, num_train, own, repetitions, num_members):
  """Partners x_k from the whole training set, a pure function of (seed, step).

  One partner per (copy position p, member m) of the repeated batch
  (row p holds unique sample p mod U, `mixmo.batch.repeat_batch`): on
  device, the member input at (row r, member m) is copy idx[r, m] and takes
  partner [idx[r, m], m].  Uniform over the N - 1 training samples other
  than the copy's own: j ~ U{0..N-2}, j -> j + 1 if j >= own (MixMo paper,
  App. 6.4: x_k drawn from the whole dataset).

  Args:
    seed, step: ints.  num_train: N.
    own: int [U], the step's unique sample indices (`train_indices`).
    repetitions: b.  num_members: M.

  Returns:
    int64 [U * b, M], indices into the training arrays.
  """
  own = np.asarray(own, np.int64)
  rows = own.shape[0] * int(repetitions)
  with jax.default_device(_cpu_device()):
    key = jax.random.fold_in(
        jax.random.fold_in(keys.data_key(int(seed)), PARTNER_SALT), int(step))
    j = np.asarray(
        jax.random.randint(key, (rows, int(num_members)), 0,
                           int(num_train) - 1), np.int64)
  own_rep = np.tile(own, int(repetitions))[:, None]
  return j + (j >= own_rep)


def process_slice(n, process_index, process_count):
  """The contiguous slice [i * n / P, (i + 1) * n / P) of host i out of P."""
  if n % process_count:
    raise ValueError(f'{n} samples per step do not divide over '
                     f'{process_count} processes.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in '
                     f'[0, {process_count}).')
  per = n // process_count
  return slice(process_index * per, (process_index + 1) * per)


# ---------------------------------------------------------------- evaluation


def eval_batches(images, labels, batch_size):
  """The whole set once, in order, in fixed-size batches.

  Args:
    images: [N, ...] (any dtype, kept).
    labels: int [N].
    batch_size: bs.

  Yields:
    (images [bs, ...], labels int32 [bs], mask bool [bs]): the last batch is
    padded with zeros and its padding has mask False, so that every sample
    counts exactly once and all batches share one jitted shape.
  """
  num = len(images)
  for start in range(0, num, batch_size):
    x = images[start:start + batch_size]
    y = np.asarray(labels[start:start + batch_size], np.int32)
    valid = len(x)
    mask = np.arange(batch_size) < valid
    if valid < batch_size:
      x = np.concatenate(
          [x, np.zeros((batch_size - valid,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - valid,), np.int32)])
    yield x, y, mask
