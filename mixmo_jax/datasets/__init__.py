"""Dataset readers behind `mixmo_jax.input_pipeline.load_split`.

- `digits`: scikit-learn's 8x8 digits, embedded, resized (offline test bed).
- `tfds_cifar`: CIFAR-10/100 through TFDS, with a fast offline fallback.
- `tiny_imagenet`: Tiny ImageNet from its standard zip/folder layout.

Heavy libraries (TensorFlow, TFDS, scikit-learn) are imported lazily inside
the readers, so that importing this package stays cheap.
"""
from mixmo_jax.datasets.common import DATASETS
from mixmo_jax.datasets.common import DatasetSpec
from mixmo_jax.datasets.common import DatasetUnavailableError

__all__ = ['DATASETS', 'DatasetSpec', 'DatasetUnavailableError']
