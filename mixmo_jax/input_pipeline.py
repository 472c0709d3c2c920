"""Host-side data: whole splits as uint8 arrays, and which samples each step uses.

Everything random about a batch except *which* samples it holds runs on device
inside the jitted train step (DESIGN 1.4). Here:

- `load_split(config, split)`: the whole split in host memory, uint8
  [N, H, W, 3] and int32 [N].
- `train_indices(seed, step, ...)`: the step's unique samples, a pure function
  of (seed, step) (Algorithm 1 line 2: each epoch is a permutation of the
  training set cut into N // (B / b) chunks of B / b samples; the remainder is
  dropped). Mid-epoch resume is therefore exact.
- `process_slice`: the contiguous part of those samples this host feeds.
- `eval_batches`: the test set once, the last batch padded and masked.

TensorFlow/TFDS are imported lazily, only for the CIFAR datasets, so config
validation runs before TF is imported.
"""
import functools

import jax
import numpy as np

from mixmo_jax.datasets import digits
from mixmo_jax.datasets import tfds_cifar
from mixmo_jax.datasets import tiny_imagenet
from mixmo_jax.datasets.common import DATASETS
from mixmo_jax.datasets.common import DatasetSpec
from mixmo_jax.datasets.common import DatasetUnavailableError

__all__ = [
    'DATASETS', 'DatasetSpec', 'DatasetUnavailableError', 'load_split',
    'unique_per_step', 'steps_per_epoch', 'data_key', 'epoch_permutation',
    'train_indices', 'process_slice', 'eval_batches',
]

SPLITS = ('train', 'test')
# Salt of the data-order key: data_key = fold_in(key(seed), DATA_KEY_SALT).
DATA_KEY_SALT = 0x5EEDDA7A


# ---------------------------------------------------------------- loading


def _load_cifar(config, split):
  return tfds_cifar.load(config.dataset, split,
                         data_dir=config.get('data_dir', ''),
                         manual_dir=config.get('manual_dir', ''))


def _load_tiny_imagenet(config, split):
  manual_dir = config.get('manual_dir', '')
  cache_dir = config.get('data_dir', '') or manual_dir
  return tiny_imagenet.load(split, manual_dir, cache_dir=cache_dir)


def _load_digits(config, split):
  return digits.load(split, config.image_size, config.get('data_seed', 0))


_LOADERS = {
    'digits': _load_digits,
    'cifar10': _load_cifar,
    'cifar100': _load_cifar,
    'tiny_imagenet': _load_tiny_imagenet,
}


def _check_request(config, split):
  if config.dataset not in DATASETS:
    raise ValueError(f'Unknown dataset {config.dataset!r}; allowed: '
                     f'{sorted(DATASETS)}.')
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; allowed: {list(SPLITS)}.')
  native = DATASETS[config.dataset].image_size
  if config.dataset != 'digits' and config.image_size != native:
    raise ValueError(f'{config.dataset} images are {native}x{native}; got '
                     f'config.image_size={config.image_size}.')


def load_split(config, split):
  """The whole split in host memory.

  Dispatches on config.dataset ('digits', 'cifar10', 'cifar100',
  'tiny_imagenet'; see `mixmo_jax/datasets/`). Reads config.image_size,
  data_seed (digits), data_dir and manual_dir.

  Args:
    config: the ConfigDict.
    split: 'train' or 'test' (Tiny ImageNet: its labelled 'val' split).

  Returns:
    images uint8 [N, H, W, 3] (H = W = config.image_size), labels int32 [N].

  Raises:
    ValueError: unknown dataset or split, or image_size not the dataset's.
    DatasetUnavailableError: the data is nowhere to be found (fast).
  """
  _check_request(config, split)
  images, labels = _LOADERS[config.dataset](config, split)
  images = np.asarray(images, np.uint8)
  labels = np.asarray(labels, np.int32)
  size = config.image_size
  if images.shape[1:] != (size, size, 3) or labels.shape != images.shape[:1]:
    raise ValueError(f'{config.dataset} {split}: got images {images.shape} '
                     f'and labels {labels.shape}')
  return images, labels


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


def data_key(seed):
  """The data-order key: fold_in(key(seed), DATA_KEY_SALT) (DESIGN 1.3)."""
  return jax.random.fold_in(jax.random.key(seed), DATA_KEY_SALT)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed, epoch, num_train):
  """int64 [N] (read-only): permutation(fold_in(data_key(seed), epoch), N).

  Computed on the CPU device (integer threefry bits, the same on every
  backend) and cached, so the steps of an epoch cost no recomputation.
  """
  with jax.default_device(_cpu_device()):
    key = jax.random.fold_in(data_key(seed), epoch)
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
      x = np.concatenate([x, np.zeros((batch_size - valid,) + x.shape[1:],
                                      x.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - valid,), np.int32)])
    yield x, y, mask
