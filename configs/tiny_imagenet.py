"""Tiny ImageNet, PreActResNet-18-w (Table 5).

  python -m mixmo_jax.main --config=configs/tiny_imagenet.py[:VARIANT] --workdir=DIR

The config itself is `mixmo_jax/configs/tiny_imagenet.py` (from Python:
`mixmo_jax.configs.get('tiny_imagenet:VARIANT')`); variants `method[+modifier...]`
are listed in `mixmo_jax/configs/base.py`.
"""
from mixmo_jax.configs.tiny_imagenet import get_config  # noqa: F401
