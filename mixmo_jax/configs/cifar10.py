"""CIFAR-10, WRN-28-10 (Table 1, Table 8).

  python -m mixmo_jax.main --config=configs/cifar10.py --workdir=/tmp/c10

Variants as in mixmo_jax/configs/base.py (cut_mixmo, linear_mixmo, mimo, vanilla,
mixup, cutmix; +cutmix, +augmix, +b1/+b2/+b4, +m3, +local).
The plain command trains Table 1's Cut-MixMo, b = 2, without CutMix (paper:
97.31% best epoch, 97.26% final); `:cut_mixmo+cutmix+b4` is 97.73%.
"""
from mixmo_jax.configs import base


def get_config(arg=None):
  config = base.base_config()
  config.dataset = 'cifar10'
  config.num_classes = 10
  return base.apply_variant(config, arg)
