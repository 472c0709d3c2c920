"""The probability p of patch mixing over training (Algorithm 1, lines
8-11): p until the last twelfth of the epochs, then a linear descent to 0,
so the last epochs train with the blocks' linear fallback only."""
import jax.numpy as jnp


def patch_probability(epoch, num_epochs, p, decay_fraction=1.0 / 12.0):
  """Probability of patch mixing at a 1-indexed epoch (Algorithm 1, l. 8-11).

    p_e = p                                   if epoch <= (1 - d) * E,
    p_e = p * (E - epoch) / (d * E)           otherwise,

  with E = num_epochs and d = decay_fraction (1/12: a linear descent to 0
  over the last twelfth).  For E = 300: p up to epoch 275, 0.96 p at 276,
  0 at 300.  Values past E are clipped at 0; d = 0 means no decay.
  All arguments may be traced.  Returns a float32 scalar.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  num_epochs = jnp.asarray(num_epochs, jnp.float32)
  p = jnp.asarray(p, jnp.float32)
  decay_len = jnp.asarray(decay_fraction, jnp.float32) * num_epochs
  remaining = num_epochs - epoch
  safe_len = jnp.where(decay_len > 0, decay_len, 1.0)
  ramp = jnp.clip(p * remaining / safe_len, 0.0, p)
  in_decay = (decay_len > 0) & (remaining < decay_len)
  return jnp.where(in_decay, ramp, p)
