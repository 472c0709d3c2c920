"""scikit-learn's handwritten digits: the embedded offline dataset.

  python -m mixmo_jax.main --config=configs/digits.py[:VARIANT] --workdir=/tmp/digits

The config itself is `mixmo_jax/configs/digits.py` (from Python:
`mixmo_jax.configs.get('digits:VARIANT')`); variants `method[+modifier...]`
are listed in `mixmo_jax/configs/base.py`.
"""
from mixmo_jax.configs.digits import get_config  # noqa: F401
