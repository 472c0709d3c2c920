"""Tiny ImageNet (64x64, 200 classes) from its standard zip/folder layout.

A direct reader (no TFDS builder: TFDS has none for it, and a direct reader
needs no TensorFlow). It looks in `manual_dir` for, in this order:
  - the extracted folder `tiny-imagenet-200/` (or `manual_dir` itself being
    that folder, i.e. holding `wnids.txt`),
  - the archive `tiny-imagenet-200.zip`,
with the layout of the original release:
  wnids.txt                          the 200 class ids (wnids)
  train/<wnid>/images/*.JPEG         500 images per class -> 'train'
  val/images/*.JPEG                  10,000 images        -> 'test'
  val/val_annotations.txt            '<file>\\t<wnid>\\t<box...>' per line
Class index = position of the wnid in sorted(wnids) (the same order as
torchvision's ImageFolder over train/). Samples are ordered by (class, file
name) for 'train' and by file name for 'test'. Grey JPEGs become RGB.

Decoding 110k JPEGs takes about a minute, so each split is cached once
decoded as `tiny-imagenet-200_<split>_<fingerprint>.npz` in `cache_dir`
(the caller passes config.data_dir, or manual_dir when that is empty); the
fingerprint hashes the list of files read, so a changed dataset is re-read.
Delete the .npz files to force a re-read; an unwritable cache_dir only costs
the re-decoding.
"""
import concurrent.futures
import hashlib
import io
import os
import zipfile

from absl import logging
import numpy as np

from mixmo_jax.data import registry
from mixmo_jax.data.registry import DatasetUnavailableError

ARCHIVE = 'tiny-imagenet-200.zip'
FOLDER = 'tiny-imagenet-200'
URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
IMAGE_SIZE = 64
_WNIDS = 'wnids.txt'
_VAL_ANNOTATIONS = 'val/val_annotations.txt'


class _Folder:
  """Reads files relative to an extracted tiny-imagenet-200/ folder."""

  def __init__(self, root):
    self.root = root
    self.where = root

  def names(self):
    out = []
    for dirpath, _, files in os.walk(self.root):
      rel = os.path.relpath(dirpath, self.root).replace(os.sep, '/')
      out.extend(f if rel == '.' else f'{rel}/{f}' for f in files)
    return out

  def read(self, name):
    with open(os.path.join(self.root, name), 'rb') as fh:
      return fh.read()

  def close(self):
    pass


class _Zip:
  """Reads files relative to the tiny-imagenet-200/ folder inside the zip."""

  def __init__(self, path):
    self.zip = zipfile.ZipFile(path)
    self.where = f'{path}:{FOLDER}/'
    self.prefix = FOLDER + '/'

  def names(self):
    n = len(self.prefix)
    return [
        i.filename[n:]
        for i in self.zip.infolist()
        if i.filename.startswith(self.prefix) and not i.is_dir()
    ]

  def read(self, name):
    return self.zip.read(self.prefix + name)

  def close(self):
    self.zip.close()


def _open_source(manual_dir):
  """The folder or zip in manual_dir; DatasetUnavailableError when neither."""
  if not manual_dir:
    raise DatasetUnavailableError(
        f'Tiny ImageNet needs config.manual_dir (now empty): a folder holding '
        f'{ARCHIVE} (from {URL}) or its extracted folder {FOLDER}/.')
  manual_dir = os.path.abspath(manual_dir)
  for root in (os.path.join(manual_dir, FOLDER), manual_dir):
    if os.path.isfile(os.path.join(root, _WNIDS)):
      return _Folder(root)
  path = os.path.join(manual_dir, ARCHIVE)
  if os.path.isfile(path):
    return _Zip(path)
  raise DatasetUnavailableError(
      f'Tiny ImageNet not found: put {ARCHIVE} (from {URL}) or its extracted '
      f'folder {FOLDER}/ into manual_dir={manual_dir} (config.manual_dir).')


def _read_text(source, names, name):
  if name not in names:
    raise DatasetUnavailableError(
        f'Tiny ImageNet: missing file {name} in {source.where}; expected the '
        f'original {ARCHIVE} layout.')
  return source.read(name).decode('utf-8')


def list_split(source, names, split):
  """(file names [N], labels int32 [N], wnids sorted [C]) of a split."""
  wnids = sorted(w.strip()
                 for w in _read_text(source, names, _WNIDS).splitlines()
                 if w.strip())
  index = {w: i for i, w in enumerate(wnids)}
  if split == 'train':
    files = sorted(
        (index[parts[1]], p)
        for p, parts in ((p, p.split('/')) for p in names)
        if len(parts) == 4 and parts[0] == 'train' and parts[1] in index and
        parts[2] == 'images' and parts[3].endswith('.JPEG'))
    if not files:
      raise DatasetUnavailableError(
          f'Tiny ImageNet: no train/<wnid>/images/*.JPEG in {source.where}.')
    labels = [c for c, _ in files]
    files = [p for _, p in files]
  else:
    rows = [
        line.split('\t')
        for line in _read_text(source, names, _VAL_ANNOTATIONS).splitlines()
        if line.strip()
    ]
    rows = sorted((r[0], r[1]) for r in rows)
    files = [f'val/images/{f}' for f, _ in rows]
    unknown = sorted({w for _, w in rows} - set(index))
    missing = [f for f in files if f not in names]
    if unknown or missing:
      raise DatasetUnavailableError(
          f'Tiny ImageNet: {_VAL_ANNOTATIONS} in {source.where} names '
          f'unknown wnids {unknown[:3]} or missing files {missing[:3]}.')
    labels = [index[w] for _, w in rows]
  return files, np.asarray(labels, np.int32), wnids


def _decode(data):
  """JPEG bytes -> uint8 [64, 64, 3] (grey images repeated to RGB)."""
  from PIL import Image
  image = Image.open(io.BytesIO(data)).convert('RGB')
  if image.size != (IMAGE_SIZE, IMAGE_SIZE):
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
  return np.asarray(image, np.uint8)


def _decode_all(source, files):
  """uint8 [N, 64, 64, 3]; reads sequentially, decodes in a thread pool."""
  images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    blobs = (source.read(f) for f in files)
    for n, image in enumerate(pool.map(_decode, blobs)):
      images[n] = image
  return images


def _cache_path(cache_dir, split, files):
  digest = hashlib.sha1('\n'.join(files).encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f'{FOLDER}_{split}_{digest}.npz')


def _load_cache(path):
  if not os.path.isfile(path):
    return None
  with np.load(path) as data:
    return data['images'], data['labels']


def _save_cache(path, images, labels):
  """Atomic write; a failure (read-only folder) only logs a warning."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'wb') as fh:
      np.savez(fh, images=images, labels=labels)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('Could not write the Tiny ImageNet cache %s: %s', path, e)
    if os.path.exists(tmp):
      os.remove(tmp)


def load(split, manual_dir, cache_dir=''):
  """(uint8 [N, 64, 64, 3], int32 [N]); split 'train' or 'test' (= val)."""
  source = _open_source(manual_dir)
  try:
    names = set(source.names())
    files, labels, _ = list_split(source, names, split)
    cache = _cache_path(cache_dir, split, files) if cache_dir else None
    cached = _load_cache(cache) if cache else None
    if cached is not None:
      return cached
    logging.info('Decoding %d Tiny ImageNet %s images from %s', len(files),
                 split, source.where)
    images = _decode_all(source, files)
  finally:
    source.close()
  if cache:
    _save_cache(cache, images, labels)
  return images, labels


def _load(config, split):
  manual_dir = config.get('manual_dir', '')
  return load(split, manual_dir, cache_dir=config.get('data_dir', '') or
              manual_dir)


registry.register_dataset(
    'tiny_imagenet',
    registry.DatasetSpec(num_classes=200, image_size=IMAGE_SIZE,
                         num_train=100000, num_test=10000, load=_load))
