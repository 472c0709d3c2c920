"""Batches of member inputs (Algorithm 1 step 1).

The pieces of a MixMo training batch, from the step's N unique samples to
the M member inputs and their targets:

  repeat_batch        batch repetition b (Algorithm 1 line 5): B = N * b,
                      in G groups of rows (uncertainty-baselines' per-core
                      batches; G = 1, the whole batch, by default)
  member_indices      each member's own permutation of the rows of each
                      group, with MIMO's input repetition rho (line 6)
  partner_positions   the partner x_k of in-pixel CutMix, never a copy of
                      the member's own sample
  take_rows           x[idx] group by group (no all-gather when the
                      groups are the devices' rows)
  member_batch        all of the above in the order of Algorithm 1, with
                      the in-pixel mixing of `pixel_mix` (CutMix / Mixup
                      with MixMo, or the single-network baselines')

Pixel augmentation (crop, flip) is passed in as a function, so this package
does not depend on the data pipeline.  Everything is vectorised over samples
and jit-able; probabilities and Beta concentrations may be traced.

Shapes: N unique samples, B = N * b batch, M members, C classes, H, W image
size, h, w the mixing map (stem output), G groups of R = B / G rows.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mixmo_jax.mixmo import pixel_mix as pixel_mixing
from mixmo_jax.mixmo.pixel_mix import PIXEL_MIX_RULES, PIXEL_MIXES

Array = jax.Array
# The keys of `member_batch`, from its key k: split(k, 4) gives crop / flip,
# member permutations, in-pixel mixing and partner positions; fold_in(k,
# PIXEL_AUGMENT_KEY) the pixel augmentation's (split in two: member inputs,
# partners) and fold_in(k, PARTNER_CROP_KEY) the crop of partners shipped
# by the host. Fixed numbers: a run's randomness must not change between
# releases (mixmo_jax/keys.py lists every key of a run).
PIXEL_AUGMENT_KEY = 4
PARTNER_CROP_KEY = 5
# `pixel_augment(key, images uint8 [..., H, W, 3], draws int [...],
# num_draws) -> float32 [..., H, W, 3]`: inputs with equal draw ids in
# [0, num_draws) get the same random draw (e.g. the same AugMix chains).
PixelAugment = Callable[[Array, Array, Array, int], Array]
# How the random draws of `pixel_augment` (AugMix) are shared: 'per_sample'
# (the official MixMo code: one draw per (unique sample, member), shared by
# the b copies of the sample in that member's inputs and by the in-pixel
# partner pasted on it) or 'per_input' (an independent draw per member
# input and per partner).
PIXEL_AUGMENT_DRAWS = ('per_sample', 'per_input')

# ----------------------------------------------------------------------------
# Repetition, permutations, partners.
# ----------------------------------------------------------------------------


def repeat_batch(x: Array, b: int, groups: int = 1) -> Array:
  """Batch repetition: [N, ...] -> [N * b, ...] (Algorithm 1 line 5).

  The N samples form G groups of n = N / G consecutive samples, and group g
  fills the R = n b rows [g R, (g + 1) R) with its samples tiled b times:
  row g R + k holds sample g n + (k mod n). G = 1: sample s at rows s,
  s + N, s + 2N, ... G = the device count of uncertainty-baselines' run
  (8): each core's 64 rows repeat its own 16 samples 4 times.

  Args:
    x: [N, ...]; b: repetitions (config.batch_repetitions); groups: G, a
      divisor of N.

  Returns:
    [N * b, ...].
  """
  x = jnp.asarray(x)
  n = x.shape[0]
  if n % groups:
    raise ValueError(f'{n} samples do not split into {groups} groups.')
  x = x.reshape((groups, n // groups) + x.shape[1:])
  x = jnp.tile(x, (1, int(b)) + (1,) * (x.ndim - 2))  # [G, R, ...].
  return x.reshape((n * int(b),) + x.shape[2:])


def member_indices(key: Array, batch_size: int, num_members: int,
                   input_repetition: float = 0.0, groups: int = 1) -> Array:
  """Indices of each member's inputs in a (repeated) batch of size B.

  With G > 1 groups each group of R = B / G consecutive rows is permuted
  within itself, from its own key `split(key, G)[g]` (uncertainty-
  baselines permutes each TPU core's rows), so the result does not depend
  on how many devices share the batch. G = 1:

  MIMO's input repetition (uncertainty-baselines): a main random
  permutation pi of range(B); member i takes pi with its first
  n = round(B * (1 - rho)) positions shuffled by its own permutation and the
  last B - n kept, so a fraction of about rho of the rows is identical for
  all members.  rho = 0: independent uniform permutations.

  Args:
    key: PRNG key.
    batch_size: B (static).
    num_members: M (static).
    input_repetition: rho in [0, 1], a Python float (static).
    groups: G, a divisor of B (static).

  Returns:
    int32 [B, M]; column i is a permutation of range(B) (of each group's
    rows), member i's inputs.
  """
  if groups > 1:
    if batch_size % groups:
      raise ValueError(f'batch {batch_size} does not split into {groups} '
                       'groups.')
    rows = batch_size // groups
    per_group = jax.vmap(
        lambda k: member_indices(k, rows, num_members, input_repetition))(
            jax.random.split(key, groups))
    offsets = (jnp.arange(groups, dtype=jnp.int32) * rows)[:, None, None]
    return (per_group + offsets).reshape(batch_size, num_members)
  rho = float(input_repetition)
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f'input_repetition must lie in [0, 1], got {rho}.')
  num_shuffled = int(round(batch_size * (1.0 - rho)))
  key_main, key_members = jax.random.split(key)
  main = jax.random.permutation(key_main, batch_size).astype(jnp.int32)
  if num_shuffled <= 1:
    return jnp.tile(main[:, None], (1, num_members))

  def member_permutation(member_key):
    head = main[:num_shuffled]
    head = head[jax.random.permutation(member_key, num_shuffled)]
    return jnp.concatenate([head, main[num_shuffled:]])

  keys = jax.random.split(key_members, num_members)
  perms = jax.vmap(member_permutation)(keys)  # Shape: [M, B].
  return perms.T.astype(jnp.int32)  # Shape: [B, M].


def partner_positions(key: Array, idx: Array, num_unique: int, batch: int,
                      groups: int = 1) -> Array:
  """Positions in the repeated batch of another sample for each member input.

  Within the group of R = B / G rows of the input (n = N / G samples),
  q = g R + ((idx - g R) + n * U{0..b-1} + U{1..n-1} mod R): a copy of a
  *different* unique sample of this step (never the member's own sample),
  any of its b copies (the layout of `repeat_batch`).

  Args:
    key: PRNG key.
    idx: int [B, M], the member inputs' positions (`member_indices`).
    num_unique: N.
    batch: B = N * b.
    groups: G of `repeat_batch`.

  Returns:
    int32 [B, M].
  """
  rows, unique = batch // groups, num_unique // groups
  k1, k2 = jax.random.split(key)
  reps = jax.random.randint(k1, idx.shape, 0, batch // num_unique)
  shift = jax.random.randint(k2, idx.shape, 1, max(unique, 2))
  start = idx - idx % rows
  return start + (idx - start + reps * unique + shift) % rows


def take_rows(x: Array, idx: Array, groups: int = 1,
              cols: Array | None = None) -> Array:
  """x[idx] (or x[idx, cols]) where each row's indices lie in its group.

  The same values as the plain gather, taken group by group: x's G groups
  of R = B / G rows against idx's, with indices local to the group. A
  batch sharded over devices by groups (G a multiple of the device count)
  then gathers on each device from its own rows; the plain gather's
  indices could point anywhere, so the compiled program first collects
  the whole batch on every device (an all-gather per step).

  Args:
    x: [B, ...], or [B, M', ...] with cols.
    idx: int [B, M'], every entry of row r in r's group of rows.
    groups: G, a divisor of B (static).
    cols: int [1, M'] or None: take x[idx, cols].

  Returns:
    [B, M', ...] (x's trailing dimensions after idx's).
  """
  if groups == 1:
    return x[idx] if cols is None else x[idx, cols]
  rows = x.shape[0] // groups
  grouped = x.reshape((groups, rows) + x.shape[1:])
  local = (idx % rows).reshape((groups, rows) + idx.shape[1:])
  if cols is None:
    out = jax.vmap(lambda a, i: a[i])(grouped, local)
  else:
    out = jax.vmap(lambda a, i: a[i, cols])(grouped, local)
  return out.reshape(idx.shape + out.shape[1 + idx.ndim:])


# ----------------------------------------------------------------------------
# The member batch of a training step.
# ----------------------------------------------------------------------------


def member_batch(key: Array, images: Array, labels: Array, weights: Array, *,
                 num_members: int, repetitions: int, num_classes: int,
                 input_repetition: float = 0.0, groups: int = 1,
                 augment: Callable[[Array, Array], Array] | None = None,
                 augment_per_copy: bool = True, pixel_augment: PixelAugment
                 | None = None, pixel_augment_draws: str = 'per_sample',
                 pixel_mix: str = 'none', pixel_mix_rule: str = 'per_sample',
                 pixel_mix_prob=0.5, cutmix_alpha=1.0, mixup_alpha=1.0,
                 partner_images: Array | None = None,
                 partner_labels: Array | None = None) -> tuple[Array, Array]:
  """The M member inputs and targets of a step (Algorithm 1 step 1).

  1. Batch repetition: the N unique samples become B = N * b rows in G
     groups (`repeat_batch`); `augment(key, images)` (pad-crop-flip) runs on
     each of the b copies (`augment_per_copy`, the MixMo code) or once
     before repeating (the MIMO code).
  2. Each member i takes its own permutation of the rows of each group
     (`member_indices`, with input repetition rho): member i's input at
     row r is copy idx[r, i] and its target that copy's label.
     `pixel_augment` (AugMix, a `PixelAugment`) then runs on the member
     inputs, with its own key `fold_in(key, PIXEL_AUGMENT_KEY)`, and on the in-pixel
     partners x_k before pasting (as the MixMo authors do). Its draws, by
     `pixel_augment_draws`: 'per_sample' (the official code seeds AugMix
     with batch_seed + 21 * sample index + member): one draw per (unique
     sample, member), so the b copies of a sample among member i's inputs
     get the same chains and the partner pasted on an input gets the
     chains of that input's sample; 'per_input': an independent draw per
     (row, member) and per partner.
  3. In-pixel mixing: for M > 1 CutMix (`cutmix_for_mixmo`) or Mixup
     (`mixup_for_mixmo`): per member input with probability
     `pixel_mix_prob`, partner from `partner_positions`, target
     lambda' y_i + (1 - lambda') y_k, own sample predominant; for M = 1
     the single-network Mixup / CutMix baselines (`mixup`, `cutmix`), by
     `pixel_mix_rule`: 'per_sample' (the MixMo authors' runs, App. 6.7):
     each sample mixed independently with probability `pixel_mix_prob`,
     its own lambda ~ Beta(alpha, alpha) and box, the partner another
     sample of the step (`partner_positions`, never the sample itself);
     'batch' (Zhang et al. 2018 / Yun et al. 2019): every sample mixed, one
     lambda (and box) and one permutation of the batch per step.

  Args:
    key: the step's key for data randomness.
    images: uint8 [N, H, W, 3], the step's unique samples.
    labels: int32 [N].
    weights: float [B, M, h, w], the step's mixing weights (for lambda').
    num_members: M.  repetitions: b.  num_classes: C.
    input_repetition: rho in [0, 1] (static).
    groups: G of `repeat_batch` and `member_indices` (static; 1: the whole
      batch is one group).
    augment: `(key, images [..., H, W, 3]) -> same`, or None.
    augment_per_copy: augment after (True) or before (False) repeating.
    pixel_augment: a `PixelAugment` returning float32 on [0, 255], applied
      to the member inputs after `augment`, or None.
    pixel_augment_draws: 'per_sample' or 'per_input' (see 2.).
    pixel_mix: 'none', 'mixup' or 'cutmix'.
    pixel_mix_rule: 'per_sample' or 'batch', for M = 1 (see 3.).
    pixel_mix_prob: probability of CutMix per member input (M > 1), of
      mixing per sample (M = 1, 'per_sample').
    cutmix_alpha, mixup_alpha: Beta concentrations of lambda.
    partner_images: uint8 [B, M, H, W, 3] or None, one partner x_k per
      (copy position p, member m) drawn from the whole training set by the
      host (`data.pipeline.partner_indices`); the input at (r, m) takes
      partner [idx[r, m], m], after `augment` and `pixel_augment` with
      their own keys.  None: partners are other samples of the step
      (`partner_positions`).
    partner_labels: int [B, M] with partner_images.

  Returns:
    xs float32 [B, M, H, W, 3] in [0, 255] (not normalised), and targets:
    int32 [B, M] labels, or float32 [B, M, C] soft targets with pixel mixing.
  """
  if pixel_mix not in PIXEL_MIXES:
    raise ValueError(f'pixel_mix must be one of {PIXEL_MIXES}, got '
                     f'{pixel_mix!r}.')
  if pixel_mix_rule not in PIXEL_MIX_RULES:
    raise ValueError(f'pixel_mix_rule must be one of {PIXEL_MIX_RULES}, got '
                     f'{pixel_mix_rule!r}.')
  if pixel_augment_draws not in PIXEL_AUGMENT_DRAWS:
    raise ValueError(f'pixel_augment_draws must be one of '
                     f'{PIXEL_AUGMENT_DRAWS}, got {pixel_augment_draws!r}.')
  k_aug, k_perm, k_pix, k_partner = jax.random.split(key, 4)
  crop = augment or (lambda k, x: x)
  num_unique = images.shape[0]
  if augment_per_copy:
    x = crop(k_aug, repeat_batch(images, repetitions, groups))
  else:
    x = repeat_batch(crop(k_aug, images), repetitions, groups)
  y = repeat_batch(labels, repetitions, groups)
  batch = x.shape[0]
  idx = member_indices(k_perm, batch, num_members, input_repetition,
                       groups)  # Shape: [B, M].
  k_member_aug, k_partner_aug = jax.random.split(
      jax.random.fold_in(key, PIXEL_AUGMENT_KEY))
  sample_of_row = repeat_batch(
      jnp.arange(num_unique, dtype=jnp.int32), repetitions,
      groups)  # Shape: [B].

  def draws_of(member_idx):
    """Draw ids [B, M'] of the member inputs idx [B, M'] and their number."""
    cols = jnp.arange(member_idx.shape[1], dtype=jnp.int32)[None, :]
    if pixel_augment_draws == 'per_sample':
      return (
          take_rows(sample_of_row, member_idx, groups) * member_idx.shape[1] +
          cols, num_unique * member_idx.shape[1])
    return (jnp.arange(member_idx.size,
                       dtype=jnp.int32).reshape(member_idx.shape),
            member_idx.size)

  def augment_pixels(k, v, member_idx):
    if pixel_augment is None:
      return v.astype(jnp.float32)
    return pixel_augment(k, v, *draws_of(member_idx)).astype(jnp.float32)

  xs = augment_pixels(k_member_aug, take_rows(x, idx, groups),
                      idx)  # Shape: [B, M, H, W, 3].
  targets = take_rows(y, idx, groups)  # Shape: [B, M].
  # The partners' draws: those of their input's sample ('per_sample'),
  # else their own key.
  k_partner_draw = (
      k_member_aug if pixel_augment_draws == 'per_sample' else k_partner_aug)

  def partners_of(member_idx):
    """(augmented x_k float, y_k) for member inputs idx [B, M']."""
    if partner_images is None:
      q = partner_positions(k_partner, member_idx, num_unique, batch, groups)
      px, py = take_rows(x, q, groups), take_rows(y, q, groups)
    else:
      cols = jnp.arange(member_idx.shape[1])[None, :]
      px = take_rows(partner_images, member_idx, groups, cols)
      py = take_rows(partner_labels, member_idx, groups, cols)
      px = crop(jax.random.fold_in(key, PARTNER_CROP_KEY), px)
    return augment_pixels(k_partner_draw, px, member_idx), py

  if pixel_mix != 'none' and num_members > 1:
    partners, partner_y = partners_of(idx)
    if pixel_mix == 'cutmix':
      xs, targets = pixel_mixing.cutmix_for_mixmo(k_pix, xs, targets, partners,
                                                  partner_y, weights,
                                                  num_classes,
                                                  prob=pixel_mix_prob,
                                                  alpha=cutmix_alpha)
    else:
      xs, targets = pixel_mixing.mixup_for_mixmo(k_pix, xs, targets, partners,
                                                 partner_y, num_classes,
                                                 prob=pixel_mix_prob,
                                                 alpha=mixup_alpha)
  elif pixel_mix in ('cutmix', 'mixup'):
    onehot = jax.nn.one_hot(targets[:, 0], num_classes)
    fn, alpha = ((pixel_mixing.cutmix,
                  cutmix_alpha) if pixel_mix == 'cutmix' else
                 (pixel_mixing.mixup, mixup_alpha))
    if pixel_mix_rule == 'batch':
      x0, soft = fn(k_pix, xs[:, 0], onehot, alpha)
    else:
      partners, partner_y = partners_of(idx[:, :1])
      x0, soft = fn(k_pix, xs[:, 0], onehot, alpha, prob=pixel_mix_prob,
                    per_sample=True, partner_images=partners[:, 0],
                    partner_onehot=jax.nn.one_hot(partner_y[:, 0], num_classes))
    xs, targets = x0[:, None], soft[:, None]
  return xs, targets
