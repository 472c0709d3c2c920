"""The optimizer and its learning-rate schedule (paper Appendix 6.4).

SGD with Nesterov momentum, the learning rate scaled with the unique
batch (lr = base * (B / b) / reference), a linear warm-up and step decays;
the l2 term is in the loss (`mixmo.loss.l2_penalty`), or optax's coupled
weight decay with `optimizer.weight_decay`.
"""
from collections.abc import Callable

import jax.numpy as jnp
import optax


def peak_learning_rate(config) -> float:
  """lr = base * (batch_size / b) / reference (0.1 / b * bs / 128, App. 6.4)."""
  opt = config.optimizer
  unique = config.batch_size / config.batch_repetitions
  return opt.base_learning_rate * unique / opt.reference_batch_size


def warmup_steps(config, steps_per_epoch: int) -> int:
  """Linear warm-up length: `warmup_epochs` epochs, or 1000 * b steps (TIN)."""
  per_rep = config.optimizer.warmup_steps_per_repetition
  if per_rep > 0:
    return per_rep * config.batch_repetitions
  return int(round(config.optimizer.warmup_epochs * steps_per_epoch))


def learning_rate_schedule(config, steps_per_epoch: int) -> Callable:
  """lr(step) = peak * min(1, step / warmup) * factor^(#decay epochs passed).

  Step decay after each epoch of `optimizer.decay_epochs` (x0.1 after 100,
  200 and 225 of 300 on CIFAR); an epoch is |D| * b / batch_size steps.
  """
  peak = peak_learning_rate(config)
  warmup = warmup_steps(config, steps_per_epoch)
  boundaries = jnp.asarray(
      [e * steps_per_epoch for e in config.optimizer.decay_epochs], jnp.int32)
  factor = config.optimizer.decay_factor

  def schedule(step):
    step = jnp.asarray(step)
    warm = jnp.minimum(1.0, step / warmup) if warmup > 0 else 1.0
    num_decays = jnp.sum(step >= boundaries)
    return peak * warm * factor**num_decays

  return schedule


def make_optimizer(config,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; optional coupled weight decay first."""
  opt = config.optimizer
  sgd = optax.sgd(
      learning_rate_schedule(config, steps_per_epoch), momentum=opt.momentum,
      nesterov=opt.nesterov)
  if opt.weight_decay > 0:
    return optax.chain(optax.add_decayed_weights(opt.weight_decay), sgd)
  return sgd
