"""CIFAR-10, WRN-28-10 (Table 1, Table 8).

  python -m mixmo_jax.main --config=configs/cifar10.py[:VARIANT] --workdir=/tmp/c10

The config itself is `mixmo_jax/configs/cifar10.py` (from Python:
`mixmo_jax.configs.get('cifar10:VARIANT')`); variants `method[+modifier...]`
are listed in `mixmo_jax/configs/base.py`.
"""
from mixmo_jax.configs.cifar10 import get_config  # noqa: F401
