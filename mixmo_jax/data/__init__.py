"""Data: the dataset registry, the built-in datasets, the host pipeline, pixel ops.

    registry.py       name -> DatasetSpec (facts + loader); load_split
    digits.py         scikit-learn's 8x8 digits, embedded, resized (offline)
    digits_inverted.py  255 - the digits images (an offline OOD set)
    svhn.py           SVHN cropped through TFDS (an OOD set for CIFAR)
    cifar.py          CIFAR-10 / CIFAR-100 through TFDS, with a fast offline path
    tiny_imagenet.py  Tiny ImageNet from its zip or folder
    cifar_c.py        CIFAR-10-C / CIFAR-100-C files (evaluation only)
    pipeline.py       which samples each step uses; test-set batches
    augment.py        on-device normalisation and pad-crop-flip

Importing this package registers the built-in datasets; heavy libraries
(TensorFlow, TFDS, scikit-learn, PIL) are imported only when a split is read.
This package imports neither the method nor training nor evaluation.
"""
from mixmo_jax.data import cifar  # noqa: F401  Registers cifar10, cifar100.
from mixmo_jax.data import digits  # noqa: F401  Registers digits.
from mixmo_jax.data import digits_inverted  # noqa: F401  Registers it.
from mixmo_jax.data import svhn  # noqa: F401  Registers svhn_cropped.
from mixmo_jax.data import tiny_imagenet  # noqa: F401  Registers it.
from mixmo_jax.data.registry import (DatasetSpec, DatasetUnavailableError,
                                     dataset_names, get_dataset, load_split,
                                     register_dataset)

__all__ = [
    'DatasetSpec',
    'DatasetUnavailableError',
    'dataset_names',
    'get_dataset',
    'load_split',
    'register_dataset',
]
