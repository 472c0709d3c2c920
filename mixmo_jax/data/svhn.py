"""SVHN (cropped digits, 32x32) through TFDS: an out-of-distribution test set.

`svhn_cropped` is the OOD set uncertainty-baselines pairs with CIFAR (`python
-m mixmo_jax.evaluate --ood=svhn_cropped`); it can also be trained on. The
sources are tried in the order of `cifar`, with no network wait:

(a) prepared TFDS data in `data_dir` ('' = the TFDS default);
(b) the original files of the SVHN authors in `manual_dir`:
    `train_32x32.mat` / `test_32x32.mat` (MATLAB arrays X uint8 [32, 32, 3, N]
    and y [N, 1] in 1..10, 10 standing for the digit 0, mapped to 0 as TFDS
    does), read with scipy; nothing is written;
(c) the download host answers a TCP connect within ~3 s: TFDS
    `download_and_prepare` into `data_dir`, then (a);
(d) otherwise `DatasetUnavailableError` at once, naming the file to put into
    `manual_dir` and the TFDS folder expected in `data_dir`.
"""
import os

from absl import logging
import numpy as np

from mixmo_jax.data import cifar, registry
from mixmo_jax.data.registry import DatasetUnavailableError

NAME = 'svhn_cropped'
DOWNLOAD_HOST = 'ufldl.stanford.edu'
DOWNLOAD_URL = 'http://ufldl.stanford.edu/housenumbers/'
FILES = {'train': 'train_32x32.mat', 'test': 'test_32x32.mat'}


def read_mat(path):
  """(uint8 [N, 32, 32, 3], int32 [N]) from an SVHN `*_32x32.mat` file."""
  from scipy import io as sio
  mat = sio.loadmat(path)
  images = np.transpose(np.asarray(mat['X'], np.uint8), (3, 0, 1, 2))
  labels = np.asarray(mat['y']).reshape(-1).astype(np.int32) % 10
  return np.ascontiguousarray(images), labels


def load(split, data_dir='', manual_dir=''):
  """(uint8 [N, 32, 32, 3], int32 [N]) of SVHN `split`, see the module doc."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(NAME, data_dir=data_dir or None)
  arrays = cifar._try_prepared(builder, split)
  if arrays is not None:
    return arrays
  path = os.path.join(manual_dir, FILES[split]) if manual_dir else ''
  if path and os.path.isfile(path):
    logging.info('Reading %s %s from %s', NAME, split, path)
    return read_mat(path)
  if cifar.host_reachable(DOWNLOAD_HOST, port=80):
    logging.info('Downloading and preparing %s into %s', NAME, builder.data_dir)
    builder.download_and_prepare()
    return cifar._read_tfds(builder, split)
  where = (
      os.path.abspath(manual_dir)
      if manual_dir else '<a folder you name in config.manual_dir>')
  raise DatasetUnavailableError(
      f'{NAME} is not available offline (no prepared TFDS data, no '
      f'{FILES[split]}, {DOWNLOAD_HOST} unreachable): put {FILES[split]} '
      f'(from {DOWNLOAD_URL}{FILES[split]}) into manual_dir={where}, or a '
      f'prepared TFDS dataset at {builder.data_dir} (config.data_dir='
      f'{data_dir!r}).')


def _load(config, split):
  return load(split, data_dir=config.get('data_dir', ''),
              manual_dir=config.get('manual_dir', ''))


registry.register_dataset(
    NAME,
    registry.DatasetSpec(num_classes=10, image_size=32, num_train=73257,
                         num_test=26032, load=_load))
