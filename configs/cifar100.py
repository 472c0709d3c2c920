"""CIFAR-100, WRN-28-10: the paper's main recipe (Table 1, Appendix 6.4).

  python -m mixmo_jax.main --config=configs/cifar100.py[:VARIANT] --workdir=/tmp/c100

The config itself is `mixmo_jax/configs/cifar100.py` (from Python:
`mixmo_jax.configs.get('cifar100:VARIANT')`); variants `method[+modifier...]`
are listed in `mixmo_jax/configs/base.py`.
"""
from mixmo_jax.configs.cifar100 import get_config  # noqa: F401
