"""MixMo training: state, schedules, the jitted train step (Algorithm 1).

`train_step` is a pure function `(state, images, labels) -> (state, metrics)`
jitted over the device mesh with the state donated. Everything random about a
batch happens inside it, from `fold_in(train_key, step)` (DESIGN.md 1.3-1.4):
batch repetition, pad-crop-flip, member permutations, in-pixel CutMix/Mixup,
kappa and masks, the mixing itself, the reweighted loss and the update.
"""
import functools
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mixmo_jax import augment, losses, mixing, models, sharding


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


def create_train_state(config, model, steps_per_epoch: int, mesh) -> TrainState:
  """Initialises parameters from the seed, replicated on `mesh`."""
  init_key, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  size = config.image_size
  tx = make_optimizer(config, steps_per_epoch)

  def init():
    variables = model.init(init_key, jnp.zeros((1, size, size, 3)), train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                              batch_stats=variables['batch_stats'], tx=tx)
    # A strongly typed int32 step, like a restored one: a fresh and a resumed
    # run then share one compiled train step.
    return state.replace(step=jnp.asarray(0, jnp.int32))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))()


def state_to_tree(state: TrainState) -> Dict[str, Any]:
  """The checkpointed part of the state (a plain dict of arrays)."""
  return {'step': state.step, 'params': state.params,
          'batch_stats': state.batch_stats, 'opt_state': state.opt_state}


def tree_to_state(state: TrainState, tree: Dict[str, Any]) -> TrainState:
  return state.replace(**tree)


def _partner_positions(key, idx, num_unique: int, batch: int):
  """Positions of another training image for each member input.

  The partner is another sample of this step (never a copy of the member's
  own sample): q = idx + N * U{0..b-1} + U{1..N-1} (mod B). The reference
  code draws x_k from the whole training set; the step's samples are
  themselves a uniform random subset of it, and drawing among them keeps the
  host shipping only the step's unique samples (DESIGN.md 1.4).
  """
  k1, k2 = jax.random.split(key)
  reps = jax.random.randint(k1, idx.shape, 0, batch // num_unique)
  shift = jax.random.randint(k2, idx.shape, 1, max(num_unique, 2))
  return (idx + reps * num_unique + shift) % batch


def member_batch(key, images, labels, config, weights):
  """Builds the member inputs and targets of Algorithm 1 step 1.

  Args:
    key: the step's key for data randomness.
    images: uint8 [N, H, W, 3], the step's unique samples.
    labels: int32 [N].
    config: the run config.
    weights: [B, M, h, w] mixing weights (for in-pixel CutMix's lambda').

  Returns:
    xs float32 [B, M, H, W, 3] (normalised), targets int32 [B, M] or soft
    float32 [B, M, C], with B = N * b.
  """
  b, num_members = config.batch_repetitions, config.num_members
  aug = config.augment
  k_aug, k_perm, k_pix, k_partner = jax.random.split(key, 4)
  crop = functools.partial(augment.random_crop_flip, padding=aug.crop_padding,
                           flip=aug.flip)
  if aug.per_copy:  # MixMo code: each of the b copies augmented on its own.
    x = crop(k_aug, mixing.repeat_batch(images, b))
  else:  # MIMO code: augment the unique samples, then repeat.
    x = mixing.repeat_batch(crop(k_aug, images), b)
  y = mixing.repeat_batch(labels, b)
  batch = x.shape[0]
  idx = mixing.member_indices(k_perm, batch, num_members,
                              config.mixing.input_repetition)  # [B, M]
  xs = x[idx].astype(jnp.float32)  # Shape: [B, M, H, W, 3].
  targets = y[idx]  # Shape: [B, M].
  if aug.pixel_mix == 'cutmix' and num_members > 1:
    q = _partner_positions(k_partner, idx, images.shape[0], batch)
    xs, targets = augment.cutmix_for_mixmo(
        k_pix, xs, targets, x[q].astype(jnp.float32), y[q], weights,
        config.num_classes, prob=aug.pixel_mix_prob, alpha=aug.cutmix_alpha)
  elif aug.pixel_mix in ('cutmix', 'mixup'):  # Single-network baselines.
    onehot = jax.nn.one_hot(targets[:, 0], config.num_classes)
    fn, alpha = ((augment.cutmix, aug.cutmix_alpha) if aug.pixel_mix == 'cutmix'
                 else (augment.mixup, aug.mixup_alpha))
    x0, soft = fn(k_pix, xs[:, 0], onehot, alpha)
    xs, targets = x0[:, None], soft[:, None]
  xs = augment.normalize(xs, tuple(config.image_mean), tuple(config.image_std))
  return xs, targets


def train_step(state: TrainState, images, labels, *, config, steps_per_epoch,
               stem_hw, mesh) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One MixMo update (Algorithm 1 lines 3-34), everything on device.

  Args:
    state: replicated TrainState.
    images: uint8 [N, H, W, 3], the step's N = batch_size / b unique samples,
      sharded over 'data'.
    labels: int32 [N].

  Returns:
    The new state and scalar metrics.
  """
  _, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  key = jax.random.fold_in(train_key, state.step)
  k_data, k_mix = jax.random.split(key)
  epoch = state.step // steps_per_epoch + 1  # 1-indexed, Algorithm 1.
  p = mixing.patch_probability(epoch, config.num_epochs, config.mixing.p,
                               config.mixing.p_decay_fraction)
  batch = config.batch_size
  weights, kappa = mixing.sample_mixing_weights(
      k_mix, batch, config.num_members, *stem_hw, method=config.mixing.method,
      alpha=config.mixing.alpha, p=p)
  xs, targets = member_batch(k_data, images, labels, config, weights)
  xs = jax.lax.with_sharding_constraint(xs, sharding.data_sharded(mesh))
  member_w = losses.member_weights(kappa, config.mixing.r)  # Eq. 5.

  def loss_fn(params):
    logits, new_vars = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, xs,
        mix_weights=weights, train=True, mutable=['batch_stats'])
    ce = losses.mixmo_loss(logits, targets, member_w)  # Eq. 4.
    l2 = losses.l2_penalty(params)
    return ce + config.optimizer.l2 * l2, (ce, l2, logits, new_vars)

  grads, (ce, l2, logits, new_vars) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=new_vars['batch_stats'])
  hard = targets if targets.ndim == 2 else jnp.argmax(targets, -1)
  metrics = {
      'loss': ce + config.optimizer.l2 * l2, 'cross_entropy': ce, 'l2': l2,
      'learning_rate': learning_rate_schedule(config, steps_per_epoch)(
          state.step - 1),
      'patch_probability': p,
      'train_top1': jnp.mean(jnp.argmax(logits, -1) == hard),
  }
  return state, metrics


def make_train_step(config, model, steps_per_epoch: int, mesh) -> Callable:
  """`train_step` jitted over `mesh`, state replicated and donated."""
  step = functools.partial(train_step, config=config,
                           steps_per_epoch=steps_per_epoch,
                           stem_hw=tuple(models.stem_resolution(config)),
                           mesh=mesh)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data, data),
                 out_shardings=(rep, rep), donate_argnums=0)
