"""Tests for mixmo_jax.data (registry, pipeline) and the digits / CIFAR readers.

No network: the reachability probe is replaced in every test that could reach
it, and TFDS runs under `tfds.testing.mock_data` or on empty folders.
"""
import io
import os
import pickle
import tarfile
import time

import jax
import ml_collections
import numpy as np
import pytest

from mixmo_jax import data as data_lib
from mixmo_jax import keys
from mixmo_jax.data import cifar, pipeline
from mixmo_jax.data import digits as digits_lib


def make_config(**overrides):
  config = ml_collections.ConfigDict(
      dict(dataset='digits', image_size=32, data_seed=0, data_dir='',
           manual_dir='', batch_size=64, batch_repetitions=4, seed=0))
  config.update(overrides)
  return config


@pytest.fixture
def offline(monkeypatch):
  """The download host is unreachable."""
  monkeypatch.setattr(cifar, 'host_reachable', lambda *a, **k: False)


@pytest.fixture
def no_probe(monkeypatch):
  """The reachability probe must not even be called."""

  def fail(*args, **kwargs):
    raise AssertionError('the network probe was called')

  monkeypatch.setattr(cifar, 'host_reachable', fail)


# ------------------------------------------------------------------ digits


def _bilinear_reference(images, size):
  """Half-pixel-centred bilinear upsampling with edge clamping, [N,h,w]."""
  h = images.shape[1]
  src = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, h - 1)
  f = src - i0
  rows = (
      images[:, i0, :] * (1 - f)[None, :, None] +
      images[:, i1, :] * f[None, :, None])
  return rows[:, :, i0] * (1 - f) + rows[:, :, i1] * f


class TestDigits:

  def test_shapes_sizes_dtypes(self):
    config = make_config()
    (xtr,
     ytr), (xte,
            yte) = [data_lib.load_split(config, s) for s in ('train', 'test')]
    assert xtr.shape == (1437, 32, 32, 3) and xte.shape == (360, 32, 32, 3)
    assert ytr.shape == (1437,) and yte.shape == (360,)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int32
    np.testing.assert_array_equal(xtr[..., 0], xtr[..., 1])
    np.testing.assert_array_equal(xtr[..., 0], xtr[..., 2])
    assert xtr.max() == 255 and xtr.min() == 0

  def test_stratified(self):
    from sklearn import datasets
    target = datasets.load_digits().target
    _, yte = data_lib.load_split(make_config(), 'test')
    _, ytr = data_lib.load_split(make_config(), 'train')
    for c in range(10):
      total = int(np.sum(target == c))
      assert np.sum(ytr == c) + np.sum(yte == c) == total
      assert abs(np.sum(yte == c) - 0.2 * total) <= 1.0

  def test_values_are_the_digits(self):
    """Split and pixels against an independent computation."""
    from sklearn import datasets, model_selection
    d = datasets.load_digits()
    idx_tr, idx_te = model_selection.train_test_split(
        np.arange(len(d.target)), test_size=0.2, stratify=d.target,
        random_state=3)
    for split, idx in (('train', idx_tr), ('test', idx_te)):
      x, y = data_lib.load_split(make_config(data_seed=3), split)
      np.testing.assert_array_equal(y, d.target[idx])
      expected = _bilinear_reference(d.images[idx] * 255.0 / 16.0, 32)
      diff = np.abs(x[..., 0].astype(np.float64) - expected)
      assert diff.max() <= 1.0

  def test_other_size(self):
    x, _ = data_lib.load_split(make_config(image_size=16), 'test')
    assert x.shape == (360, 16, 16, 3) and x.dtype == np.uint8

  def test_deterministic_and_seeded(self):
    x1, y1 = data_lib.load_split(make_config(data_seed=5), 'train')
    digits_lib._splits.cache_clear()
    x2, y2 = data_lib.load_split(make_config(data_seed=5), 'train')
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, y3 = data_lib.load_split(make_config(data_seed=6), 'train')
    assert not np.array_equal(y1, y3) or not np.array_equal(x1, x3)

  def test_cache_returns_copies(self):
    x1, _ = data_lib.load_split(make_config(), 'test')
    x1[:] = 0
    x2, _ = data_lib.load_split(make_config(), 'test')
    assert x2.max() == 255


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError, match='cifar100.*digits|digits.*cifar100'):
    data_lib.load_split(make_config(dataset='mnist'), 'train')
  with pytest.raises(ValueError, match='split'):
    data_lib.load_split(make_config(), 'validation')


def test_datasets_metadata():
  assert set(data_lib.dataset_names()) == {
      'digits', 'cifar10', 'cifar100', 'tiny_imagenet', 'digits_inverted',
      'svhn_cropped'
  }
  assert data_lib.get_dataset('cifar100').num_classes == 100
  assert data_lib.get_dataset('tiny_imagenet').image_size == 64
  assert (data_lib.get_dataset('digits').num_train,
          data_lib.get_dataset('digits').num_test) == (1437, 360)


# ------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize('name,split,n,classes', [('cifar100', 'train', 7, 100),
                                                  ('cifar10', 'test', 5, 10)])
def test_cifar_mock_data(name, split, n, classes, no_probe, tmp_path):
  import tensorflow_datasets as tfds
  config = make_config(dataset=name, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=n):
    x, y = data_lib.load_split(config, split)
  assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
  assert y.shape == (n,) and y.dtype == np.int32
  assert 0 <= y.min() and y.max() < classes


def test_cifar_wrong_image_size():
  with pytest.raises(ValueError, match='32x32'):
    data_lib.load_split(make_config(dataset='cifar10', image_size=16), 'train')


def test_cifar_offline_fails_fast(offline, tmp_path):
  import tensorflow_datasets  # noqa: F401  (import time is not the check)
  data_dir, manual_dir = tmp_path / 'data', tmp_path / 'manual'
  data_dir.mkdir()
  manual_dir.mkdir()
  config = make_config(dataset='cifar10', data_dir=str(data_dir),
                       manual_dir=str(manual_dir))
  start = time.time()
  with pytest.raises(data_lib.DatasetUnavailableError) as err:
    data_lib.load_split(config, 'train')
  assert time.time() - start < 3.0
  message = str(err.value)
  assert '\n' not in message
  assert 'cifar-10-python.tar.gz' in message
  assert str(manual_dir) in message and 'manual_dir' in message
  assert os.path.join(str(data_dir), 'cifar10') in message


def test_cifar100_offline_message_without_dirs(offline, tmp_path):
  config = make_config(dataset='cifar100', data_dir=str(tmp_path))
  with pytest.raises(data_lib.DatasetUnavailableError,
                     match='cifar-100-python.tar.gz.*manual_dir'):
    data_lib.load_split(config, 'test')


def test_cifar_downloads_when_reachable(monkeypatch, tmp_path):
  """(c): with the host reachable, TFDS download_and_prepare is called."""
  import tensorflow_datasets as tfds

  class Called(Exception):
    pass

  def fake_prepare(self, *args, **kwargs):
    raise Called(self.name)

  monkeypatch.setattr(cifar, 'host_reachable', lambda *a, **k: True)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      fake_prepare)
  with pytest.raises(Called):
    data_lib.load_split(
        make_config(dataset='cifar10', data_dir=str(tmp_path)), 'train')


def _pickle_bytes(obj):
  """Protocol 2 with the module name the authors' (numpy 1) files carry."""
  data = pickle.dumps(obj, protocol=2)
  return data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')


def _fake_batch(rng, n, label_keys):
  data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
  batch = {b'data': data, b'batch_label': b'fake'}
  for key, classes in label_keys.items():
    batch[key] = [int(v) for v in rng.integers(0, classes, size=n)]
  return batch


def _write_tar(path, folder, members):
  with tarfile.open(path, 'w:gz') as tar:
    for name, obj in members.items():
      data = _pickle_bytes(obj)
      info = tarfile.TarInfo(f'{folder}/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _expected_images(data):
  """Independent layout: pixel (i, j, c) = data[c * 1024 + i * 32 + j]."""
  n = len(data)
  out = np.zeros((n, 32, 32, 3), np.uint8)
  for c in range(3):
    for i in range(32):
      out[:, i, :, c] = data[:, c * 1024 + i * 32:c * 1024 + i * 32 + 32]
  return out


def test_cifar10_from_manual_archive(no_probe, tmp_path):
  rng = np.random.default_rng(0)
  members = {
      f'data_batch_{i}': _fake_batch(rng, 3, {b'labels': 10})
      for i in range(1, 6)
  }
  members['test_batch'] = _fake_batch(rng, 4, {b'labels': 10})
  members['batches.meta'] = {b'label_names': [b'a'] * 10}
  (tmp_path / 'manual').mkdir()
  _write_tar(tmp_path / 'manual' / 'cifar-10-python.tar.gz',
             'cifar-10-batches-py', members)
  config = make_config(dataset='cifar10', data_dir=str(tmp_path / 'data'),
                       manual_dir=str(tmp_path / 'manual'))
  x, y = data_lib.load_split(config, 'train')
  data = np.concatenate(
      [members[f'data_batch_{i}'][b'data'] for i in range(1, 6)])
  labels = sum((members[f'data_batch_{i}'][b'labels'] for i in range(1, 6)), [])
  assert x.dtype == np.uint8 and y.dtype == np.int32
  np.testing.assert_array_equal(x, _expected_images(data))
  np.testing.assert_array_equal(y, labels)
  x, y = data_lib.load_split(config, 'test')
  np.testing.assert_array_equal(
      x, _expected_images(members['test_batch'][b'data']))
  np.testing.assert_array_equal(y, members['test_batch'][b'labels'])


def test_cifar100_fine_labels_from_manual_archive(no_probe, tmp_path):
  rng = np.random.default_rng(1)
  keys = {b'fine_labels': 100, b'coarse_labels': 20}
  members = {
      'train': _fake_batch(rng, 6, keys),
      'test': _fake_batch(rng, 5, keys)
  }
  _write_tar(tmp_path / 'cifar-100-python.tar.gz', 'cifar-100-python', members)
  config = make_config(dataset='cifar100', data_dir=str(tmp_path / 'data'),
                       manual_dir=str(tmp_path))
  x, y = data_lib.load_split(config, 'test')
  assert x.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(y, members['test'][b'fine_labels'])


def test_cifar_manual_pickle_rejects_code(no_probe, tmp_path):
  marker = tmp_path / 'code_ran'

  class Evil:

    def __reduce__(self):
      return (os.mkdir, (str(marker),))

  _write_tar(tmp_path / 'cifar-100-python.tar.gz', 'cifar-100-python', {
      'train': Evil(),
      'test': Evil()
  })
  config = make_config(dataset='cifar100', data_dir=str(tmp_path / 'data'),
                       manual_dir=str(tmp_path))
  with pytest.raises(data_lib.DatasetUnavailableError) as err:
    data_lib.load_split(config, 'test')
  assert 'UnpicklingError' in str(err.value) and 'damaged' in str(err.value)
  assert isinstance(err.value.__cause__, pickle.UnpicklingError)
  assert not marker.exists()


# ------------------------------------------------------------------ order


def test_unique_and_steps_per_epoch():
  config = make_config(batch_size=64, batch_repetitions=4)
  assert pipeline.unique_per_step(config) == 16
  assert pipeline.steps_per_epoch(config, 50000) == 3125
  assert pipeline.steps_per_epoch(config,
                                  1437) == 89  # 1437 // 16, rest dropped.
  for n in (16, 17, 1000, 1437):
    assert pipeline.steps_per_epoch(config,
                                    n) == n // pipeline.unique_per_step(config)
  with pytest.raises(ValueError):
    pipeline.unique_per_step(make_config(batch_size=64, batch_repetitions=3))


class TestTrainIndices:

  def test_pure(self):
    a = pipeline.train_indices(3, 17, 100, 8)
    pipeline.epoch_permutation.cache_clear()
    b = pipeline.train_indices(3, 17, 100, 8)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == (8,)

  def test_formula(self):
    """Step s = chunk s % S of permutation(fold_in(data_key, s // S))."""
    n, u, seed = 50, 8, 11
    per_epoch = n // u
    for step in (0, 5, 6, 13):
      key = jax.random.fold_in(jax.random.key(seed), keys.DATA_KEY_SALT)
      key = jax.random.fold_in(key, step // per_epoch)
      perm = np.asarray(jax.random.permutation(key, n))
      chunk = step % per_epoch
      np.testing.assert_array_equal(
          pipeline.train_indices(seed, step, n, u),
          perm[chunk * u:(chunk + 1) * u])

  @pytest.mark.parametrize('n,u', [(96, 8), (103, 10)])
  def test_epochs_are_permutations(self, n, u):
    per_epoch = n // u
    epochs = []
    for e in range(3):
      idx = np.concatenate([
          pipeline.train_indices(0, e * per_epoch + s, n, u)
          for s in range(per_epoch)
      ])
      assert len(np.unique(idx)) == per_epoch * u
      assert idx.min() >= 0 and idx.max() < n
      if n % u == 0:
        np.testing.assert_array_equal(np.sort(idx), np.arange(n))
      epochs.append(idx)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])

  def test_seeds_differ(self):
    assert not np.array_equal(
        pipeline.train_indices(0, 0, 100, 10),
        pipeline.train_indices(1, 0, 100, 10))

  def test_too_few_samples(self):
    with pytest.raises(ValueError):
      pipeline.train_indices(0, 0, 5, 8)


def test_process_slice_partitions():
  for n, p in ((24, 4), (16, 1), (8, 8)):
    covered = np.concatenate(
        [np.arange(n)[pipeline.process_slice(n, i, p)] for i in range(p)])
    np.testing.assert_array_equal(covered, np.arange(n))
    assert all(
        len(range(n)[pipeline.process_slice(n, i, p)]) == n // p
        for i in range(p))
  with pytest.raises(ValueError):
    pipeline.process_slice(10, 0, 4)


@pytest.mark.parametrize('n,bs', [(23, 8), (16, 8), (3, 8), (0, 4)])
def test_eval_batches(n, bs):
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(n, 4, 4, 3)).astype(np.uint8)
  labels = rng.integers(1, 10, size=n)
  batches = list(pipeline.eval_batches(images, labels, bs))
  assert len(batches) == -(-n // bs)
  seen_x, seen_y = [], []
  for x, y, mask in batches:
    assert x.shape == (bs, 4, 4, 3) and x.dtype == np.uint8
    assert y.shape == (bs,) and y.dtype == np.int32
    assert mask.dtype == np.bool_
    assert not x[~mask].any() and not y[~mask].any()
    seen_x.append(x[mask])
    seen_y.append(y[mask])
  assert sum(len(y) for y in seen_y) == n
  if n:
    np.testing.assert_array_equal(np.concatenate(seen_x), images)
    np.testing.assert_array_equal(np.concatenate(seen_y), labels)
