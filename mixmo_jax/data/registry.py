"""The dataset registry: one table from a dataset name to its spec and loader.

    spec = registry.get_dataset(config.dataset)
    images, labels = registry.load_split(config, 'train')   # uint8, int32

A dataset is one module that builds a `DatasetSpec` (static facts + a loader)
and calls `register_dataset(name, spec)`; the built-in ones (`digits`,
`cifar10`, `cifar100`, `tiny_imagenet`) register themselves when
`mixmo_jax.data` is imported.  Code from outside the package registers its
own the same way, and the config validation, the training loop and the
evaluation then accept `config.dataset=name`.

The sizes in a spec are the standard ones; the training loop still counts
the arrays it receives (TFDS split metadata are empty under
`tfds.testing.mock_data`, so they are never used).
"""
from __future__ import annotations

import dataclasses
import pickle
import tarfile
import zipfile
from typing import Any
from collections.abc import Callable

import numpy as np

# What a damaged archive raises while it is read (a truncated gzip stream
# gives EOFError, a damaged pickle UnpicklingError).
_CORRUPT_ERRORS = (tarfile.TarError, EOFError, pickle.UnpicklingError,
                   zipfile.BadZipFile)

SPLITS = ('train', 'test')
Loader = Callable[[Any, str], tuple[np.ndarray, np.ndarray]]


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither prepared nor provided nor downloadable.

  Raised within seconds (never after minutes of download retries), with a
  one-line message that names the file to provide and the folder to put it in.
  """


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset and how to load it.

  Attributes:
    num_classes: C.
    image_size: H = W of the images `load_split` returns by default.
    num_train: N of the 'train' split.
    num_test: N of the 'test' split (Tiny ImageNet: its labelled 'val' split).
    load: `load(config, split) -> (images [N, H, W, 3], labels [N])` for split
      'train' or 'test'; may raise DatasetUnavailableError.
    resizable: whether `load` resizes to any `config.image_size` (otherwise
      `config.image_size` must equal `image_size`).
    test_set_fields: further config fields that select the test set (e.g. the
      digits' split seed); runs ensembled at evaluation must agree on them.
  """
  num_classes: int
  image_size: int
  num_train: int
  num_test: int
  load: Loader | None = None
  resizable: bool = False
  test_set_fields: tuple[str, ...] = ()


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(name: str, spec: DatasetSpec, *,
                     overwrite: bool = False) -> DatasetSpec:
  """Registers `spec` under `name` (ValueError if taken, unless overwrite)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f'dataset name must be a non-empty string, got {name!r}')
  if name in _REGISTRY and not overwrite:
    raise ValueError(f'dataset {name!r} is already registered; pass '
                     'overwrite=True to replace it')
  if spec.load is None:
    raise ValueError(f'dataset {name!r}: the spec needs a loader')
  _REGISTRY[name] = spec
  return spec


def dataset_names() -> tuple[str, ...]:
  """Sorted names of the registered datasets."""
  return tuple(sorted(_REGISTRY))


def get_dataset(name: str) -> DatasetSpec:
  """The spec registered as `name`; ValueError listing the known names."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f'unknown dataset {name!r}; allowed: '
                     f'{", ".join(dataset_names())}') from None


def load_split(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The whole split of `config.dataset` in host memory.

  Args:
    config: the run's ConfigDict (dataset, image_size and the fields the
      dataset's loader reads: data_dir, manual_dir, data_seed).
    split: 'train' or 'test'.

  Returns:
    images uint8 [N, H, W, 3] (H = W = config.image_size), labels int32 [N].

  Raises:
    ValueError: unknown dataset or split, or an image_size the dataset does
      not have.
    DatasetUnavailableError: the data is nowhere to be found (fast), or an
      archive is damaged (truncated, not a tar / zip / pickle).
  """
  spec = get_dataset(config.dataset)
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; allowed: {list(SPLITS)}')
  size = config.image_size
  if not spec.resizable and size != spec.image_size:
    raise ValueError(f'{config.dataset} images are {spec.image_size}x'
                     f'{spec.image_size}; got config.image_size={size}')
  if spec.load is None:
    raise ValueError(f'dataset {config.dataset!r} registers no loader')
  try:
    images, labels = spec.load(config, split)
  except _CORRUPT_ERRORS as e:
    where = config.get('manual_dir', '') or config.get('data_dir', '')
    raise DatasetUnavailableError(
        f'{config.dataset} {split}: a file in {where or "the data folder"} '
        f'is damaged ({type(e).__name__}: {" ".join(str(e).split())}); '
        'download it again, check its size and checksum, or remove it') from e
  images = np.asarray(images, np.uint8)
  labels = np.asarray(labels, np.int32)
  if images.shape[1:] != (size, size, 3) or labels.shape != images.shape[:1]:
    raise ValueError(f'{config.dataset} {split}: got images {images.shape} '
                     f'and labels {labels.shape}')
  return images, labels
