"""MixMo training: state, schedules, the jitted train step (Algorithm 1).

`train_step` is a pure function `(state, images, labels) -> (state, metrics)`
jitted over the device mesh with the state donated: a short piece of glue
that calls the method (`mixmo_jax.mixmo`).  Everything random about a batch
happens inside it, from the step's keys (`keys.step_keys(seed, step)`):
batch repetition, pad-crop-flip, AugMix, member permutations, in-pixel
CutMix/Mixup,
kappa and masks, the mixing itself, the reweighted loss and the update.  The
host only ships the step's unique samples, so resuming is exact.
"""
import functools
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mixmo_jax import keys, models, sharding
from mixmo_jax.data import augment
from mixmo_jax.data import augmix
from mixmo_jax.data import pipeline
from mixmo_jax.mixmo import batch as mixmo_batch
from mixmo_jax.mixmo import loss as mixmo_loss
from mixmo_jax.mixmo import registry


class TrainState(train_state.TrainState):
  """Flax TrainState with BatchNorm statistics."""
  batch_stats: Any = None


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
    return peak * warm * factor ** num_decays

  return schedule


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; optional coupled weight decay first."""
  opt = config.optimizer
  sgd = optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                  momentum=opt.momentum, nesterov=opt.nesterov)
  if opt.weight_decay > 0:
    return optax.chain(optax.add_decayed_weights(opt.weight_decay), sgd)
  return sgd


def _init_state(config, model, steps_per_epoch: int, mesh):
  """The jitted, argument-free initialisation of the state on `mesh`."""
  init_key = keys.init_key(config.seed)
  size = config.image_size
  tx = make_optimizer(config, steps_per_epoch)

  def init():
    variables = model.init(init_key, jnp.zeros((1, size, size, 3)), train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                              batch_stats=variables['batch_stats'], tx=tx)
    # A strongly typed int32 step, like a restored one: a fresh and a resumed
    # run then share one compiled train step.
    return state.replace(step=jnp.asarray(0, jnp.int32))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))


def create_train_state(config, model, steps_per_epoch: int, mesh) -> TrainState:
  """Initialises parameters from the seed, replicated on `mesh`."""
  return _init_state(config, model, steps_per_epoch, mesh)()


def abstract_train_state(config, model, steps_per_epoch: int,
                         mesh) -> TrainState:
  """The state's shapes, dtypes and shardings (`jax.ShapeDtypeStruct`
  leaves) without computing anything: what compiling the train step ahead
  of time for `mesh` needs, also for devices this process cannot run."""
  return jax.eval_shape(_init_state(config, model, steps_per_epoch, mesh))


def state_to_tree(state: TrainState) -> Dict[str, Any]:
  """The checkpointed part of the state (a plain dict of arrays)."""
  return {'step': state.step, 'params': state.params,
          'batch_stats': state.batch_stats, 'opt_state': state.opt_state}


def tree_to_state(state: TrainState, tree: Dict[str, Any]) -> TrainState:
  return state.replace(**tree)


def permutation_groups(config) -> int:
  """G = batch_size / mixing.permutation_group_rows (1 when 0: the global
  batch), the row groups of `mixmo.batch.member_batch`."""
  rows = config.mixing.permutation_group_rows
  return config.batch_size // rows if rows else 1


def member_batch(key, images, labels, weights, config, partner_images=None,
                 partner_labels=None):
  """`mixmo.batch.member_batch` with the config's settings, normalised.

  Returns:
    xs float32 [B, M, H, W, 3] (normalised) and targets int32 [B, M] or
    float32 [B, M, C].
  """
  aug = config.augment
  crop = functools.partial(augment.random_crop_flip, padding=aug.crop_padding,
                           flip=aug.flip)
  pixel_augment = None
  if aug.augmix:  # On the uint8 member inputs, after crop / flip.
    pixel_augment = functools.partial(
        augmix.augmix, rule=aug.augmix_rule, severity=aug.augmix_severity,
        width=aug.augmix_width, depth=aug.augmix_depth, as_float=True)
  xs, targets = mixmo_batch.member_batch(
      key, images, labels, weights, num_members=config.num_members,
      repetitions=config.batch_repetitions, num_classes=config.num_classes,
      input_repetition=config.mixing.input_repetition,
      groups=permutation_groups(config), augment=crop,
      augment_per_copy=aug.per_copy, pixel_augment=pixel_augment,
      pixel_augment_draws=aug.augmix_draws,
      pixel_mix=aug.pixel_mix, pixel_mix_rule=aug.pixel_mix_rule,
      pixel_mix_prob=aug.pixel_mix_prob, cutmix_alpha=aug.cutmix_alpha,
      mixup_alpha=aug.mixup_alpha, partner_images=partner_images,
      partner_labels=partner_labels)
  mean, std = tuple(config.image_mean), tuple(config.image_std)
  return augment.normalize(xs, mean, std), targets


def train_step(state: TrainState, images, labels, partner_images=None,
               partner_labels=None, *, config, steps_per_epoch, stem_hw,
               mesh) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One MixMo update (Algorithm 1 lines 3-34), everything on device.

  Args:
    state: replicated TrainState.
    images: uint8 [N, H, W, 3], the step's N = batch_size / b unique samples,
      sharded over 'data'.
    labels: int32 [N].
    partner_images: uint8 [B, M, H, W, 3], partner_labels: int32 [B, M],
      the pixel mix's partners from the whole training set when
      `pipeline.needs_partners(config)` (`feed.Feeder`), else None.

  Returns:
    The new state and scalar metrics.
  """
  k_data, k_mix = keys.step_keys(config.seed, state.step)
  epoch = state.step // steps_per_epoch + 1  # 1-indexed, Algorithm 1.
  mix = config.mixing
  p = mixmo_batch.patch_probability(epoch, config.num_epochs, mix.p,
                                    mix.p_decay_fraction)
  weights, kappa = registry.sample_mixing_weights(
      k_mix, config.batch_size, config.num_members, *stem_hw,
      method=mix.method, alpha=mix.alpha, p=p)
  xs, targets = member_batch(k_data, images, labels, weights, config,
                             partner_images, partner_labels)
  xs = jax.lax.with_sharding_constraint(xs, sharding.data_sharded(mesh))
  loss_weights = mixmo_loss.member_weights(kappa, mix.r)  # Eq. 5.
  l2 = config.optimizer.l2

  def loss_fn(params):
    logits, new_vars = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, xs,
        mix_weights=weights, train=True, mutable=['batch_stats'])
    ce = mixmo_loss.mixmo_loss(logits, targets, loss_weights)  # Eq. 4.
    penalty = mixmo_loss.l2_penalty(params)
    return ce + l2 * penalty, (ce, penalty, logits, new_vars)

  grads, (ce, penalty, logits, new_vars) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=new_vars['batch_stats'])
  hard = targets if targets.ndim == 2 else jnp.argmax(targets, -1)
  return state, {
      'loss': ce + l2 * penalty, 'cross_entropy': ce, 'l2': penalty,
      'learning_rate': learning_rate_schedule(config, steps_per_epoch)(
          state.step - 1),
      'patch_probability': p,
      'train_top1': jnp.mean(jnp.argmax(logits, -1) == hard),
  }


def make_train_step(config, model, steps_per_epoch: int, mesh) -> Callable:
  """`train_step` jitted over `mesh`, state replicated and donated."""
  step = functools.partial(train_step, config=config,
                           steps_per_epoch=steps_per_epoch,
                           stem_hw=tuple(models.stem_resolution(config)),
                           mesh=mesh)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  inputs = (data,) * (4 if pipeline.needs_partners(config) else 2)
  return jax.jit(step, in_shardings=(rep,) + inputs,
                 out_shardings=(rep, rep), donate_argnums=0)
