"""A custom mixing block trained from a script (the README's recipe).

    python examples/stripes_block.py --workdir=/tmp/stripes --members=3

`stripes` splits the h x w map into M vertical stripes of (nearly) equal
width, stripe i going to member i, so it works for any M; kappa_i is the
share of columns member i holds.
"""
import argparse

import jax.numpy as jnp

import mixmo_jax
from mixmo_jax import mixmo


@mixmo.register_mixing('stripes', overwrite=True)
def stripes(key, batch_size, num_members, height, width, *, alpha, p):
  """weights [B, M, h, w] (one-hot over members, summing to 1), kappa [B, M]."""
  del key, alpha, p  # Deterministic: no random ratios, always binary.
  owner = jnp.arange(width) * num_members // width  # Column -> member.
  onehot = (owner[None, :] == jnp.arange(num_members)[:, None])  # [M, w].
  weights = jnp.broadcast_to(onehot[None, :, None, :].astype(jnp.float32),
                             (batch_size, num_members, height, width))
  return weights, weights.mean(axis=(2, 3))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--members', type=int, default=2)
  parser.add_argument('--epochs', type=int, default=5)
  args = parser.parse_args()
  config = mixmo_jax.configs.get('digits:mimo')
  config.mixing.method = 'stripes'
  config.num_members = args.members
  config.num_epochs = args.epochs
  config.optimizer.decay_epochs = ()
  mixmo_jax.train(config, args.workdir)


if __name__ == '__main__':
  main()
