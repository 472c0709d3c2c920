"""Every random key of a run, derived from its seeds in one place.

Randomness is a pure function of (config.seed, step) so that a resumed run
continues the uninterrupted one bit for bit:

    root        = PRNGKey(config.seed)
    init_key,
    train_key   = split(root)                       parameters; train steps
    step_key    = fold_in(train_key, step)          one training step, split
                                                    inside the step into its
                                                    data key (augmentation,
                                                    permutations, in-pixel
                                                    mixing, AugMix) and its
                                                    mixing key (kappa, masks)
    k_data, the step's data key, in `mixmo.batch.member_batch`:
      split(k_data, 4)                              crop / flip, member
                                                    permutations, in-pixel
                                                    mixing, partner positions
      fold_in(k_data, PIXEL_AUGMENT_KEY = 4)        AugMix (members, partners)
      fold_in(k_data, PARTNER_CROP_KEY = 5)         crop of the host's partners
    data_key    = fold_in(key(config.seed), 0x5EEDDA7A)
    epoch_key   = fold_in(data_key, epoch)          the data order of an epoch

and, on the host, the two calibration halves of the test set come from
`np.random.default_rng(config.evaluation.calibration_seed)`.
"""
import jax
import numpy as np

# Salt of the data-order key: data_key = fold_in(key(seed), DATA_KEY_SALT).
DATA_KEY_SALT = 0x5EEDDA7A


def init_key(seed: int) -> jax.Array:
  """The key of the parameter initialisation."""
  return jax.random.split(jax.random.PRNGKey(seed))[0]


def step_keys(seed, step):
  """(data key, mixing key) of training step `step` (may be traced)."""
  train_key = jax.random.split(jax.random.PRNGKey(seed))[1]
  key = jax.random.fold_in(train_key, step)
  return tuple(jax.random.split(key))


def data_key(seed: int) -> jax.Array:
  """The data-order key: fold_in(key(seed), DATA_KEY_SALT)."""
  return jax.random.fold_in(jax.random.key(seed), DATA_KEY_SALT)


def epoch_key(seed: int, epoch: int) -> jax.Array:
  """The key of epoch `epoch`'s permutation of the training set."""
  return jax.random.fold_in(data_key(seed), epoch)


def calibration_rng(seed: int) -> np.random.Generator:
  """The host generator of the test set's two calibration halves."""
  return np.random.default_rng(seed)
