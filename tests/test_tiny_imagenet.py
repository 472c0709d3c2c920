"""Tests for the Tiny ImageNet reader on a fabricated miniature of its layout."""
import os
import shutil
import zipfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mixmo_jax import data
from mixmo_jax.data import tiny_imagenet

WNIDS = ['n0300', 'n0100', 'n0200']  # Written unsorted on purpose.
# Solid colours, far apart so that JPEG compression cannot confuse them.
COLOURS = {
    'n0100': (230, 20, 20),
    'n0200': (20, 230, 20),
    'n0300': (20, 20, 230)
}
VAL = [('val_3.JPEG', 'n0200'), ('val_0.JPEG', 'n0300'),
       ('val_2.JPEG', 'n0100'), ('val_1.JPEG', 'n0200')]


def _save(path, wnid, grey=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.new('RGB', (64, 64), COLOURS[wnid])
  if grey:
    image = image.convert('L')
  image.save(path, format='JPEG', quality=95)


def make_folder(root):
  """tiny-imagenet-200/ with 3 wnids, 2 train images each, 4 val images."""
  base = os.path.join(root, 'tiny-imagenet-200')
  os.makedirs(base)
  with open(os.path.join(base, 'wnids.txt'), 'w') as fh:
    fh.write('\n'.join(WNIDS) + '\n')
  with open(os.path.join(base, 'words.txt'), 'w') as fh:
    fh.write('\n'.join(f'{w}\tthing' for w in WNIDS) + '\n')
  for w in WNIDS:
    for k in range(2):
      _save(
          os.path.join(base, 'train', w, 'images', f'{w}_{k}.JPEG'), w,
          grey=(w == 'n0200' and k == 1))
    with open(os.path.join(base, 'train', w, f'{w}_boxes.txt'), 'w') as fh:
      fh.write(f'{w}_0.JPEG\t0\t0\t63\t63\n')
  lines = []
  for name, w in VAL:
    _save(os.path.join(base, 'val', 'images', name), w)
    lines.append(f'{name}\t{w}\t0\t0\t63\t63')
  with open(os.path.join(base, 'val', 'val_annotations.txt'), 'w') as fh:
    fh.write('\n'.join(lines) + '\n')
  return base


def make_zip(folder, out_dir):
  path = os.path.join(out_dir, 'tiny-imagenet-200.zip')
  with zipfile.ZipFile(path, 'w') as zf:
    for dirpath, _, files in os.walk(folder):
      rel = os.path.relpath(dirpath, os.path.dirname(folder))
      zf.write(dirpath, rel + '/')
      for f in files:
        zf.write(os.path.join(dirpath, f), os.path.join(rel, f))
  return path


def make_config(manual_dir, data_dir=''):
  return ml_collections.ConfigDict(
      dict(dataset='tiny_imagenet', image_size=64, data_seed=0,
           data_dir=data_dir, manual_dir=str(manual_dir)))


def _class_of_colour(images):
  """Index in sorted(WNIDS) of each image's (mean) colour."""
  order = sorted(WNIDS)
  refs = np.array([COLOURS[w] for w in order], np.float64)
  means = images.reshape(len(images), -1, 3).mean(1)
  grey = means.std(axis=1) < 5  # The grey train image: one channel value.
  dist = ((means[:, None] - refs[None])**2).sum(-1)
  return np.where(grey, -1, dist.argmin(1))


def check_arrays(config):
  x, y = data.load_split(config, 'train')
  assert x.shape == (6, 64, 64, 3) and x.dtype == np.uint8
  assert y.dtype == np.int32
  np.testing.assert_array_equal(y, [0, 0, 1, 1, 2, 2])  # sorted wnids.
  colour = _class_of_colour(x)
  np.testing.assert_array_equal(colour[colour >= 0], y[colour >= 0])
  assert (colour == -1).sum() == 1  # the grey JPEG, expanded to RGB.
  xv, yv = data.load_split(config, 'test')
  assert xv.shape == (4, 64, 64, 3)
  # Ordered by file name: val_0 (n0300), val_1 (n0200), val_2, val_3.
  np.testing.assert_array_equal(yv, [2, 1, 0, 1])
  np.testing.assert_array_equal(_class_of_colour(xv), yv)
  return x, y, xv, yv


def test_folder(tmp_path):
  make_folder(str(tmp_path))
  check_arrays(make_config(tmp_path))


def test_zip_same_as_folder_and_cache(tmp_path, monkeypatch):
  folder = make_folder(str(tmp_path / 'src'))
  (tmp_path / 'manual').mkdir()
  make_zip(folder, str(tmp_path / 'manual'))
  from_folder = check_arrays(make_config(tmp_path / 'src'))
  cache = tmp_path / 'cache'
  from_zip = check_arrays(make_config(tmp_path / 'manual', str(cache)))
  for a, b in zip(from_folder, from_zip):
    np.testing.assert_array_equal(a, b)
  assert len(list(cache.glob('tiny-imagenet-200_*.npz'))) == 2
  # The second read comes from the cache: decoding would now fail.
  monkeypatch.setattr(tiny_imagenet, '_decode_all',
                      lambda *a: pytest.fail('decoded twice'))
  again = check_arrays(make_config(tmp_path / 'manual', str(cache)))
  for a, b in zip(from_zip, again):
    np.testing.assert_array_equal(a, b)


def test_missing_dataset(tmp_path):
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load_split(make_config(tmp_path), 'train')
  assert 'tiny-imagenet-200.zip' in str(err.value)
  assert str(tmp_path) in str(err.value)
  with pytest.raises(data.DatasetUnavailableError, match='manual_dir.*empty'):
    data.load_split(make_config(''), 'train')


def test_missing_file(tmp_path):
  base = make_folder(str(tmp_path))
  os.remove(os.path.join(base, 'val', 'val_annotations.txt'))
  with pytest.raises(data.DatasetUnavailableError) as err:
    data.load_split(make_config(tmp_path), 'test')
  assert 'val/val_annotations.txt' in str(err.value)
  assert base in str(err.value)
  shutil.rmtree(os.path.join(base, 'train'))
  with pytest.raises(data.DatasetUnavailableError, match='train'):
    data.load_split(make_config(tmp_path), 'train')


def test_missing_val_image(tmp_path):
  base = make_folder(str(tmp_path))
  os.remove(os.path.join(base, 'val', 'images', 'val_2.JPEG'))
  with pytest.raises(data.DatasetUnavailableError, match='val_2.JPEG'):
    data.load_split(make_config(tmp_path), 'test')


def test_wrong_image_size(tmp_path):
  config = make_config(tmp_path)
  config.image_size = 32
  with pytest.raises(ValueError, match='64x64'):
    data.load_split(config, 'train')
