"""CIFAR-100, WRN-28-10, the paper's main recipe (Table 1, Appendix 6.4).

  python -m mixmo_jax.main --config=configs/cifar100.py --workdir=/tmp/c100
  python -m mixmo_jax.main --config=configs/cifar100.py:mimo+b4 --workdir=DIR

Variants (`:name`, see mixmo_jax/configs/base.py): cut_mixmo (default), linear_mixmo,
mimo, vanilla, mixup, cutmix; modifiers +cutmix, +augmix, +b1/+b2/+b4, +m3,
+local.

The plain command trains Table 1's Cut-MixMo, b = 2, without CutMix (paper:
84.38% top-1 at the best epoch, 84.07% final, Table 8); the paper's best
CIFAR-100 number, 85.77% (Cut-MixMo + CutMix, b = 4), is
`configs/cifar100.py:cut_mixmo+cutmix+b4`.
"""
from mixmo_jax.configs import base


def get_config(arg=None):
  """CIFAR-100 is the default recipe itself."""
  return base.get_config(arg)
