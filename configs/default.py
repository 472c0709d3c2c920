"""The defaults of every config: Cut-MixMo, WRN-28-10, the CIFAR-100 recipe.

  python -m mixmo_jax.main --config=configs/default.py[:VARIANT] --workdir=DIR

The config itself is `mixmo_jax/configs/base.py`; every hyperparameter is a
field there, overridable on the command line (`--config.mixing.p=0.6`).
"""
from mixmo_jax.configs.base import get_config  # noqa: F401
