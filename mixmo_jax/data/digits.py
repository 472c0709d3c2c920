"""scikit-learn's digits as a tiny, embedded, offline image dataset .

1,797 grey 8x8 images with values 0..16 and 10 classes. We split them 80/20,
stratified by class and seeded by `data_seed` (1,437 train / 360 test), scale
them to 0..255, resize them bilinearly to S x S and copy the grey channel
three times, so that the CIFAR networks run on them unchanged.
"""
import functools

import numpy as np

from mixmo_jax.data import registry

_TEST_FRACTION = 0.2
_MAX_VALUE = 16.0  # sklearn's digits take integer values 0..16.


def resize_bilinear(images, size):
  """Bilinear resize of grey float images with PIL (pixel-centre aligned).

  Args:
    images: float [N, h, w].
    size: S.

  Returns:
    float32 [N, S, S].
  """
  from PIL import Image
  out = np.empty((images.shape[0], size, size), np.float32)
  for n, image in enumerate(images):
    pil = Image.fromarray(np.asarray(image, np.float32), mode='F')
    out[n] = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out


def to_uint8_rgb(images, size):
  """0..16 grey [N, 8, 8] -> uint8 [N, S, S, 3]: x * 255 / 16, resize, round."""
  scaled = np.asarray(images, np.float32) * (255.0 / _MAX_VALUE)
  resized = resize_bilinear(scaled, size)
  grey = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=4)
def _splits(image_size, data_seed):
  """Both splits at once, cached so train and test do not redo the work."""
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection
  digits = sk_datasets.load_digits()
  index = np.arange(len(digits.target))
  train_idx, test_idx = model_selection.train_test_split(
      index, test_size=_TEST_FRACTION, stratify=digits.target,
      random_state=data_seed, shuffle=True)
  result = {}
  for split, idx in (('train', train_idx), ('test', test_idx)):
    images = to_uint8_rgb(digits.images[idx], image_size)
    labels = digits.target[idx].astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    result[split] = (images, labels)
  return result


def load(split, image_size, data_seed):
  """Returns (uint8 [N, S, S, 3], int32 [N]) for split 'train' or 'test'.

  The result is a fresh copy of an in-memory cache keyed on
  (image_size, data_seed).
  """
  images, labels = _splits(int(image_size), int(data_seed))[split]
  return images.copy(), labels.copy()


def _load(config, split):
  return load(split, config.image_size, config.get('data_seed', 0))


registry.register_dataset(
    'digits',
    registry.DatasetSpec(num_classes=10, image_size=32, num_train=1437,
                         num_test=360, load=_load, resizable=True,
                         test_set_fields=('data_seed',)))
