"""CIFAR-10 / CIFAR-100 through TFDS, with a fast offline path.

Sources, tried in this order:

(a) Prepared TFDS data in `data_dir` ('' = the TFDS default,
    `$TFDS_DATA_DIR` or `~/tensorflow_datasets`): read it. The attempt is
    `builder.as_dataset`, which fails at once (a local existence check) when
    nothing is prepared; this order also makes `tfds.testing.mock_data` work.
(b) The original python archive from the CIFAR authors in `manual_dir`
    (`cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`, or its extracted
    folder `cifar-10-batches-py/` / `cifar-100-python/`): read directly with
    the small pickle reader below. No network, no TFDS preparation, nothing
    written. (Its sample order differs from TFDS's, so the same seed gives a
    different data order than source (a); the sets are the same.)
(c) The download host answers a TCP connect within ~3 s: let TFDS
    `download_and_prepare` into `data_dir`, then read as in (a).
(d) Otherwise raise `DatasetUnavailableError` at once, naming the archive
    to put into `manual_dir` and the prepared TFDS folder expected in
    `data_dir` (an offline TFDS download would retry for minutes).

Labels: CIFAR-100 uses the fine labels ('label' in TFDS, 'fine_labels' in the
archive).
"""
import io
import os
import pickle
import socket
import tarfile

from absl import logging
import numpy as np

from mixmo_jax.data import registry
from mixmo_jax.data.registry import DatasetUnavailableError

DOWNLOAD_HOST = 'www.cs.toronto.edu'
DOWNLOAD_URL = 'https://www.cs.toronto.edu/~kriz/'
PROBE_TIMEOUT_S = 3.0

# name -> (archive file, folder inside it, label key, train files, test files)
_ARCHIVES = {
    'cifar10': ('cifar-10-python.tar.gz', 'cifar-10-batches-py', 'labels',
                tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',)),
    'cifar100': ('cifar-100-python.tar.gz', 'cifar-100-python', 'fine_labels',
                 ('train',), ('test',)),
}


def host_reachable(host=DOWNLOAD_HOST, port=443, timeout=PROBE_TIMEOUT_S):
  """True if a TCP connection to host:port opens within `timeout` seconds.

  Tests replace this function (monkeypatch) so that they never touch the
  network.
  """
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def archive_name(name):
  """The CIFAR authors' archive file name for 'cifar10' / 'cifar100'."""
  return _ARCHIVES[name][0]


# ---------------------------------------------------------------- (a), (c)


def _read_tfds(builder, split, chunk=10000):
  """All of `split` as numpy: uint8 [N, 32, 32, 3], int32 [N].

  Reads in chunks: `as_dataset(batch_size=-1)` pads to the split size from
  the metadata, which is empty under `mock_data` (TFDS 4.9.10 then aborts).
  """
  import tensorflow_datasets as tfds
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: (ex['image'], ex['label'])).batch(chunk)
  parts = list(tfds.as_numpy(ds))
  if not parts:
    return (np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32))
  images = np.concatenate([p[0] for p in parts]).astype(np.uint8)
  labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
  return images, labels


def _try_prepared(builder, split):
  """Source (a): the arrays, or None when nothing is prepared."""
  try:
    return _read_tfds(builder, split)
  except AssertionError:  # TFDS: "could not find data in <data_dir>".
    if builder.is_prepared():
      raise
    return None


# ---------------------------------------------------------------- (b)


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles the CIFAR batches: dicts of lists, bytes and numpy arrays only."""

  _ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'),
              ('numpy.core.multiarray', '_reconstruct'),
              ('numpy._core.multiarray', '_reconstruct'),
              ('numpy.core.multiarray', 'scalar'),
              ('numpy._core.multiarray', 'scalar'),
              ('copy_reg', '_reconstructor'), ('copyreg', '_reconstructor'),
              ('__builtin__', 'object'), ('builtins', 'object'),
              ('_codecs', 'encode')}  # Python 3 pickles of bytes.

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'unexpected {module}.{name} in CIFAR file')
    if module == 'numpy.core.multiarray' and hasattr(np, '_core'):
      module = 'numpy._core.multiarray'  # numpy 2 name of the same module.
    return super().find_class(module, name)


def _unpickle(data):
  """Python-2 CIFAR pickle bytes -> dict with str keys."""
  batch = _ArrayUnpickler(io.BytesIO(data), encoding='bytes').load()
  return {
      (k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()
  }


def _batches_to_arrays(batches, label_key):
  """[{'data': uint8 [n, 3072] (R, G, B planes), label_key: [n]}] -> arrays."""
  data = np.concatenate([np.asarray(b['data'], np.uint8) for b in batches])
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _manual_source(name, manual_dir):
  """The archive or extracted folder in manual_dir, or None."""
  if not manual_dir:
    return None
  archive, folder, _, train_files, test_files = _ARCHIVES[name]
  for path in (os.path.join(manual_dir, folder), manual_dir):
    if all(
        os.path.isfile(os.path.join(path, f))
        for f in train_files + test_files):
      return path
  path = os.path.join(manual_dir, archive)
  return path if os.path.isfile(path) else None


def _read_members(source, wanted):
  """{basename: bytes} of the `wanted` files, from a .tar.gz or a folder."""
  if os.path.isdir(source):
    out = {}
    for f in wanted:
      with open(os.path.join(source, f), 'rb') as fh:
        out[f] = fh.read()
    return out
  out = {}
  with tarfile.open(source, 'r:gz') as tar:
    for member in tar:  # One sequential pass over the gzip stream.
      base = os.path.basename(member.name)
      if member.isfile() and base in wanted:
        out[base] = tar.extractfile(member).read()
  missing = sorted(set(wanted) - set(out))
  if missing:
    raise DatasetUnavailableError(f'{source} lacks {missing}; expected the '
                                  'archive from the CIFAR authors')
  return out


def read_manual(name, split, source):
  """Source (b): uint8 [N, 32, 32, 3], int32 [N] from the authors' files."""
  _, _, label_key, train_files, test_files = _ARCHIVES[name]
  files = train_files if split == 'train' else test_files
  members = _read_members(source, files)
  return _batches_to_arrays([_unpickle(members[f]) for f in files], label_key)


# ---------------------------------------------------------------- dispatch


def _unavailable_message(name, builder, data_dir, manual_dir):
  archive = archive_name(name)
  where = os.path.abspath(manual_dir) if manual_dir else 'FOLDER'
  return (f'{name} is not available offline (no prepared TFDS data, no '
          f'archive, {DOWNLOAD_HOST} unreachable): put {archive} (from '
          f'{DOWNLOAD_URL}{archive}) into a folder and pass '
          f'--config.manual_dir={where}, or a prepared TFDS dataset at '
          f'{builder.data_dir} (--config.data_dir={data_dir or "FOLDER"}).')


def load(name, split, data_dir='', manual_dir=''):
  """(uint8 [N, 32, 32, 3], int32 [N]) of CIFAR `name`, see the module doc."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir or None)
  arrays = _try_prepared(builder, split)
  if arrays is not None:
    return arrays
  source = _manual_source(name, manual_dir)
  if source is not None:
    logging.info('Reading %s %s from %s', name, split, source)
    return read_manual(name, split, source)
  if host_reachable():
    logging.info('Downloading and preparing %s into %s', name, builder.data_dir)
    builder.download_and_prepare()
    return _read_tfds(builder, split)
  raise DatasetUnavailableError(
      _unavailable_message(name, builder, data_dir, manual_dir))


def _load(config, split):
  return load(config.dataset, split, data_dir=config.get('data_dir', ''),
              manual_dir=config.get('manual_dir', ''))


for _name, _classes in (('cifar10', 10), ('cifar100', 100)):
  registry.register_dataset(
      _name,
      registry.DatasetSpec(num_classes=_classes, image_size=32, num_train=50000,
                           num_test=10000, load=_load))
