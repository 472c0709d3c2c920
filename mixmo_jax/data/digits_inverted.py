"""Inverted digits: 255 - x of the `digits` images, an offline OOD test set.

The same split, size and labels as `digits` (`digits.load` with the config's
image_size and data_seed), with every pixel value x replaced by 255 - x
(white digits on black become black on white), so that
`python -m mixmo_jax.evaluate --ood=digits_inverted` exercises OOD detection
of a digits run without any download.
"""
from mixmo_jax.data import digits, registry


def _load(config, split):
  images, labels = digits.load(split, config.image_size,
                               config.get('data_seed', 0))
  return 255 - images, labels


registry.register_dataset(
    'digits_inverted',
    registry.DatasetSpec(num_classes=10, image_size=32, num_train=1437,
                         num_test=360, load=_load, resizable=True,
                         test_set_fields=('data_seed',)))
