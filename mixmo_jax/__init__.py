"""mixmo_jax: MixMo (Ramé, Sun & Cord, ICCV 2021) in JAX/Flax.

    import mixmo_jax
    config = mixmo_jax.configs.get('digits:cut_mixmo')
    mixmo_jax.train(config, '/tmp/digits')

The method itself is `mixmo_jax.mixmo`; see the README's code map.
"""
from mixmo_jax import configs  # noqa: F401


def train(config, workdir, **kwargs):
  """Trains `config` in `workdir`: see `mixmo_jax.api.train`."""
  from mixmo_jax import api  # pylint: disable=import-outside-toplevel
  return api.train(config, workdir, **kwargs)
