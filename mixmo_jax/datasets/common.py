"""Shared dataset metadata and the error raised when data cannot be found.

`DATASETS[name]` gives the facts the rest of the code (config validation,
docs) may rely on without loading anything. Sizes here are the standard ones;
the training loop still counts the arrays it receives (DESIGN 2b: never trust
TFDS split metadata, which is empty under `tfds.testing.mock_data`).
"""
import dataclasses


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither prepared nor provided nor downloadable.

  Raised within seconds (never after minutes of download retries), with a
  one-line message that names the file to provide and the folder to put it in.
  """


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset.

  Attributes:
    num_classes: C.
    image_size: H = W of the images `load_split` returns by default (digits
      are resized to `config.image_size`; the others must match it).
    num_train: N of the 'train' split.
    num_test: N of the 'test' split (Tiny ImageNet: its labelled 'val' split).
    resizable: whether `load_split` resizes to any `config.image_size`.
  """
  num_classes: int
  image_size: int
  num_train: int
  num_test: int
  resizable: bool = False


DATASETS = {
    'digits': DatasetSpec(num_classes=10, image_size=32, num_train=1437,
                          num_test=360, resizable=True),
    'cifar10': DatasetSpec(num_classes=10, image_size=32, num_train=50000,
                           num_test=10000),
    'cifar100': DatasetSpec(num_classes=100, image_size=32, num_train=50000,
                            num_test=10000),
    'tiny_imagenet': DatasetSpec(num_classes=200, image_size=64,
                                 num_train=100000, num_test=10000),
}
