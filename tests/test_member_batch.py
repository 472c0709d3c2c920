"""Glue tests of the member batch and the train step, with planted inputs.

Image n of a step is filled with the value 10 n + 5 (crop padding 0, no flip),
so every pixel of a member input names the sample it came from; labels are a
permutation of the ids, so a target that follows the index instead of the
label is caught too.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_digits_config
from mixmo_jax import keys, models, optim, sharding, training
from mixmo_jax.data import augment, pipeline
from mixmo_jax.mixmo import batch as mixmo_batch
from mixmo_jax.mixmo import pixel_mix
from mixmo_jax.mixmo import schedule
from mixmo_jax.mixmo import registry

N, B_REP, M, C, HW = 8, 2, 2, 8, 8
LABELS = (3 * np.arange(N) + 1) % C  # A bijection id -> label, not identity.


def _planted():
  images = np.broadcast_to((10 * np.arange(N) + 5).astype(np.uint8)[:, None,
                                                                    None, None],
                           (N, HW, HW, 3)).copy()
  return jnp.asarray(images), jnp.asarray(LABELS, jnp.int32)


def _ids(pixels):
  """Sample id of every pixel of float [..., H, W, 3] planted images."""
  return np.rint((np.asarray(pixels)[..., 0] - 5) / 10).astype(int)


def _weights(batch):
  return jnp.full((batch, M, 4, 4), 1.0 / M)  # Linear mixing, kappa = 1/M.


def _member_batch(key, **kwargs):
  images, labels = _planted()
  crop = functools.partial(augment.random_crop_flip, padding=0, flip=False)
  kwargs.setdefault('augment', crop)
  return mixmo_batch.member_batch(key, images, labels, _weights(N * B_REP),
                                  num_members=M, repetitions=B_REP,
                                  num_classes=C, **kwargs)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_targets_are_the_labels_of_the_planted_samples(seed):
  xs, targets = _member_batch(jax.random.PRNGKey(seed))
  ids = _ids(xs)  # Shape: [B, M, H, W].
  assert xs.shape == (N * B_REP, M, HW, HW, 3)
  assert (ids == ids[..., :1, :1]).all()  # One sample per member input.
  np.testing.assert_array_equal(np.asarray(targets), LABELS[ids[..., 0, 0]])
  # Every member sees each sample b times (a permutation of the B rows).
  for m in range(M):
    np.testing.assert_array_equal(
        np.bincount(ids[:, m, 0, 0], minlength=N), np.full(N, B_REP))


@pytest.mark.parametrize('seed', [0, 1])
def test_in_pixel_cutmix_partner_and_soft_targets(seed):
  key = jax.random.PRNGKey(seed)
  own_xs, _ = _member_batch(key)
  own = _ids(own_xs)[..., 0, 0]  # The members' own samples, same key.
  xs, soft = _member_batch(key, pixel_mix='cutmix', pixel_mix_prob=1.0)
  ids = _ids(xs)
  soft = np.asarray(soft)
  mixed = 0
  for r in range(N * B_REP):
    for m in range(M):
      present = np.unique(ids[r, m])
      assert own[r, m] in present
      share_own = np.mean(ids[r, m] == own[r, m])
      assert share_own >= 0.5  # The member's own sample stays predominant.
      expected = np.zeros(C)
      expected[LABELS[own[r, m]]] += share_own
      others = [i for i in present if i != own[r, m]]
      assert len(others) <= 1
      if others:
        mixed += 1
        expected[LABELS[others[0]]] += 1.0 - share_own  # lambda' weighting.
      np.testing.assert_allclose(soft[r, m], expected, atol=1e-6)
  # With probability 1 almost every input gets a non-empty box of another
  # sample; a partner equal to the sample would leave none.
  assert mixed >= N * B_REP * M // 2


def test_partner_positions_never_the_own_sample():
  idx = mixmo_batch.member_indices(jax.random.PRNGKey(0), N * B_REP, M)
  q = mixmo_batch.partner_positions(jax.random.PRNGKey(1), idx, N, N * B_REP)
  assert (np.asarray(q) % N != np.asarray(idx) % N).all()


@pytest.mark.parametrize('per_copy', [True, False])
def test_augment_per_copy(per_copy):
  """The b copies of a sample get their own crop (per_copy) or share one."""
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randint(0, 256, (N, HW, HW, 3)), jnp.uint8)
  labels = jnp.asarray(LABELS, jnp.int32)
  key = jax.random.PRNGKey(3)
  crop = functools.partial(augment.random_crop_flip, padding=2, flip=True)
  xs, _ = mixmo_batch.member_batch(key, images, labels, _weights(N * B_REP),
                                   num_members=M, repetitions=B_REP,
                                   num_classes=C, augment=crop,
                                   augment_per_copy=per_copy)
  _, k_perm, _, _ = jax.random.split(key, 4)
  idx = np.asarray(mixmo_batch.member_indices(k_perm, N * B_REP, M))
  copies = np.zeros((N * B_REP, HW, HW, 3))
  for m in range(M):
    copies[idx[:, m]] = np.asarray(xs[:, m])
  same = [np.array_equal(copies[n], copies[n + N]) for n in range(N)]
  assert not any(same) if per_copy else all(same)


def test_pixel_augment_runs_on_uint8_member_inputs_and_partners():
  calls = []

  def marker(key, images, draws, num_draws):
    calls.append((images.shape, images.dtype))
    return images.astype(jnp.float32) + 1000.0

  xs, _ = _member_batch(
      jax.random.PRNGKey(0), pixel_mix='cutmix', pixel_mix_prob=1.0,
      pixel_augment=marker)
  assert calls == [((N * B_REP, M, HW, HW, 3), jnp.uint8)] * 2
  assert (np.asarray(xs) >= 1000.0).all()  # Own pixels and pasted partners.


@pytest.mark.parametrize('draws', ['per_sample', 'per_input'])
def test_pixel_augment_draws_of_inputs_and_partners(draws):
  """'per_sample' (the official code's seed batch_seed + 21 * sample +
  member): the draw of an input is (its sample, its member), and the partner
  pasted on it takes that same key and draw; 'per_input': all distinct."""
  calls = []

  def record(key, images, draw_ids, num_draws):
    calls.append(
        (np.asarray(jax.random.key_data(key)), np.asarray(draw_ids), num_draws,
         _ids(images.astype(jnp.float32))[..., 0, 0]))
    return images.astype(jnp.float32)

  _member_batch(
      jax.random.PRNGKey(4), pixel_mix='cutmix', pixel_mix_prob=1.0,
      pixel_augment=record, pixel_augment_draws=draws)
  (key_in, d_in, n_in, ids_in), (key_p, d_p, n_p, ids_p) = calls
  assert (ids_p != ids_in).all()  # The partners are other samples.
  if draws == 'per_sample':
    assert n_in == n_p == N * M
    np.testing.assert_array_equal(d_in, ids_in * M + np.arange(M))
    np.testing.assert_array_equal(d_p, d_in)
    np.testing.assert_array_equal(key_p, key_in)
  else:
    assert n_in == n_p == N * B_REP * M
    assert np.unique(d_in).size == d_in.size
    assert not np.array_equal(key_p, key_in)


@pytest.mark.parametrize('draws', ['per_sample', 'per_input'])
def test_augmix_copies_of_a_sample_share_its_chains(draws):
  """With crop and flip off, the b copies of a sample in one member's inputs
  are identical after AugMix when the draws are per sample, and not when
  they are per input; one sample in two members differs either way."""
  from mixmo_jax.data import augmix
  rng = np.random.RandomState(1)
  images = jnp.asarray(rng.randint(0, 256, (N, HW, HW, 3)), jnp.uint8)
  labels = jnp.asarray(LABELS, jnp.int32)
  key = jax.random.PRNGKey(5)
  fn = jax.jit(
      functools.partial(
          mixmo_batch.member_batch, num_members=M, repetitions=B_REP,
          num_classes=C,
          pixel_augment=functools.partial(augmix.augmix, as_float=True),
          pixel_augment_draws=draws))
  xs = np.asarray(fn(key, images, labels, _weights(N * B_REP))[0])
  _, k_perm, _, _ = jax.random.split(key, 4)
  sample = np.asarray(mixmo_batch.member_indices(k_perm, N * B_REP, M)) % N
  same_copies, same_members = [], []
  for n in range(N):
    rows = [np.flatnonzero(sample[:, m] == n) for m in range(M)]
    same_copies += [
        np.array_equal(xs[rows[m][0], m], xs[r, m])
        for m in range(M)
        for r in rows[m][1:]
    ]
    same_members.append(np.array_equal(xs[rows[0][0], 0], xs[rows[1][0], 1]))
  assert len(same_copies) == N * M * (B_REP - 1)
  assert all(same_copies) if draws == 'per_sample' else not any(same_copies)
  assert not any(same_members)


def test_train_step_gradient_is_eq4_plus_l2():
  """The step's update, inverted (plain SGD), equals grad of eq. 4 + l2."""
  config = tiny_digits_config('cut_mixmo+cutmix')
  opt = config.optimizer
  opt.momentum, opt.nesterov, opt.weight_decay = 0.0, False, 0.0
  opt.warmup_epochs, opt.warmup_steps_per_repetition = 0.0, 0
  opt.l2 = 1e-3
  mesh = sharding.make_mesh()
  model = models.get_model(config)
  spe = 10
  state = training.create_train_state(config, model, spe, mesh)
  step_fn = training.make_train_step(config, model, spe, mesh)
  from mixmo_jax import data, feed
  train_x, train_y = data.load_split(config, 'train')
  batch = feed.Feeder(config, train_x, train_y, mesh).batch(0)
  assert len(batch) == 4  # In-pixel CutMix ships partners.
  images, labels, p_images, p_labels = jax.device_get(batch)
  params0 = jax.device_get(state.params)
  stats0 = jax.device_get(state.batch_stats)
  new_state, _ = step_fn(state, *batch)
  lr = float(optim.learning_rate_schedule(config, spe)(0))
  applied = jax.tree.map(lambda a, b: (a - b) / lr, params0,
                         jax.device_get(new_state.params))

  # Independent assembly of the loss on the step's own inputs.
  k_data, k_mix = keys.step_keys(config.seed, 0)
  mix = config.mixing
  p = schedule.patch_probability(1, config.num_epochs, mix.p,
                                 mix.p_decay_fraction)
  # One jit each (op-by-op, the ~100 small ops each compile on a cold cache).
  weights, kappa = jax.jit(lambda k: registry.sample_mixing_weights(
      k, config.batch_size, config.num_members, *models.stem_resolution(config),
      method=mix.method, alpha=mix.alpha, p=p))(
          k_mix)
  xs, targets = jax.jit(lambda *a: training.member_inputs(
      a[0], a[1], a[2], a[3], config, a[4], a[5]))(k_data, jnp.asarray(images),
                                                   jnp.asarray(labels), weights,
                                                   jnp.asarray(p_images),
                                                   jnp.asarray(p_labels))
  root = np.asarray(kappa, np.float64)**(1.0 / mix.r)
  w = config.num_members * root / root.sum(-1, keepdims=True)  # Eq. 5.

  def loss(params):
    logits, _ = model.apply({
        'params': params,
        'batch_stats': stats0
    }, xs, mix_weights=weights, train=True, mutable=['batch_stats'])
    ce = -jnp.sum(targets * jax.nn.log_softmax(logits), -1)  # [B, M]
    total = jnp.sum(jnp.asarray(w, jnp.float32) * ce) / xs.shape[0]
    sq = sum(jnp.sum(x**2) for x in jax.tree.leaves(params))
    return total + opt.l2 * sq

  expected = jax.jit(jax.grad(loss))(params0)  # jit: eager op-by-op is slow.
  for got, want in zip(jax.tree.leaves(applied), jax.tree.leaves(expected)):
    scale = max(float(np.abs(want).max()), 1e-3)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), atol=2e-3 * scale, rtol=2e-3)


# ----------------------------------------------------------------------------
# Single-network Mixup / CutMix as the authors ran them (pixel_mix_rule).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('fn', [pixel_mix.mixup, pixel_mix.cutmix])
def test_per_sample_rule_distribution(fn):
  """Mixed with probability 0.5 per sample, lambda ~ Beta(1, 1) per sample."""
  from scipy import stats
  size, hw = 4000, 16
  images = jnp.zeros((size, hw, hw, 3))
  partners = jnp.ones((size, hw, hw, 3))
  onehot = jax.nn.one_hot(jnp.zeros(size, jnp.int32), 2)
  other = jax.nn.one_hot(jnp.ones(size, jnp.int32), 2)
  x, soft = fn(
      jax.random.PRNGKey(0), images, onehot, 1.0, prob=0.5, per_sample=True,
      partner_images=partners, partner_onehot=other)
  share = 1.0 - np.asarray(x).mean(axis=(1, 2, 3))  # Kept share of x_i.
  np.testing.assert_allclose(share, np.asarray(soft)[:, 0], atol=1e-5)
  mixed = share < 1.0
  assert abs(mixed.mean() - 0.5) < 4 * np.sqrt(0.25 / size)
  if fn is pixel_mix.mixup:  # CutMix's lambda' is a clipped box share.
    assert stats.kstest(share[mixed], 'uniform').pvalue > 1e-3


@pytest.mark.parametrize('pixel_mix', ['mixup', 'cutmix'])
def test_per_sample_rule_member_batch_partners(pixel_mix):
  images, labels = _planted()
  key = jax.random.PRNGKey(5)
  own_xs, _ = mixmo_batch.member_batch(key, images, labels,
                                       jnp.ones(
                                           (N * B_REP, 1, 4, 4)), num_members=1,
                                       repetitions=B_REP, num_classes=C)
  own = _ids(own_xs)[:, 0, 0, 0]
  xs, soft = mixmo_batch.member_batch(key, images, labels,
                                      jnp.ones(
                                          (N * B_REP, 1, 4, 4)), num_members=1,
                                      repetitions=B_REP, num_classes=C,
                                      pixel_mix=pixel_mix, pixel_mix_prob=1.0)
  soft = np.asarray(soft)[:, 0]
  label_to_id = np.argsort(LABELS)
  values = 10 * label_to_id + 5  # Pixel value of the sample of each label.
  pixels = np.asarray(xs)[:, 0, ..., 0]  # [B, H, W].
  for r in range(N * B_REP):
    assert soft[r, LABELS[own[r]]] > 0
    assert np.count_nonzero(soft[r] > 1e-6) <= 2
    np.testing.assert_allclose(pixels[r].mean(), soft[r] @ values, atol=1e-3)
  partner_share = 1.0 - soft[np.arange(N * B_REP), LABELS[own]]
  assert (partner_share > 1e-6).mean() > 0.5  # A different sample pasted.


# ----------------------------------------------------------------------------
# MixMo with in-pixel Mixup (M > 1).
# ----------------------------------------------------------------------------


def test_mixup_for_mixmo_distribution():
  """Mixed with probability 0.5 per input, lambda = max(u, 1 - u), u ~ U."""
  from scipy import stats
  shape = (2000, 2)
  own = jnp.zeros(shape + (4, 4, 3))
  other = jnp.ones(shape + (4, 4, 3))
  x, soft = pixel_mix.mixup_for_mixmo(
      jax.random.PRNGKey(0), own, jnp.zeros(shape, jnp.int32), other,
      jnp.ones(shape, jnp.int32), 2, prob=0.5, alpha=1.0)
  lam = 1.0 - np.asarray(x).mean(axis=(2, 3, 4)).ravel()
  np.testing.assert_allclose(lam, np.asarray(soft)[..., 0].ravel(), atol=1e-5)
  mixed = lam < 1.0
  assert abs(mixed.mean() - 0.5) < 4 * np.sqrt(0.25 / lam.size)
  assert stats.kstest(lam[mixed], stats.uniform(0.5, 0.5).cdf).pvalue > 1e-3


def test_mixup_with_mixmo_member_batch_partners():
  key = jax.random.PRNGKey(7)
  own_xs, _ = _member_batch(key)
  own = _ids(own_xs)[..., 0, 0]  # [B, M]
  xs, soft = _member_batch(key, pixel_mix='mixup', pixel_mix_prob=1.0)
  soft = np.asarray(soft)
  values = 10 * np.argsort(LABELS) + 5  # Pixel value of each label's sample.
  pixels = np.asarray(xs)[..., 0].mean(axis=(-2, -1))  # [B, M]
  np.testing.assert_allclose(pixels, soft @ values, atol=1e-3)
  own_share = np.take_along_axis(soft, LABELS[own][..., None], -1)[..., 0]
  assert (own_share >= 0.5 - 1e-6).all()  # Own sample predominant.
  assert (np.count_nonzero(soft > 1e-6, axis=-1) <= 2).all()
  assert (own_share < 1.0 - 1e-6).mean() > 0.9  # Another sample mixed in.


# ----------------------------------------------------------------------------
# Partners from the whole training set (host side).
# ----------------------------------------------------------------------------


def test_partner_indices_uniform_never_own_and_pure():
  from scipy import stats
  num_train, own = 50, np.arange(0, 40, 4)
  draws = np.concatenate([
      pipeline.partner_indices(0, s, num_train, own, 2, 3) for s in range(200)
  ])
  assert draws.shape == (200 * 20, 3)
  own_rep = np.tile(own, 2)[:, None]
  assert (np.tile(own_rep, (200, 1)) != draws).all()
  assert draws.min() >= 0 and draws.max() < num_train
  # Given own sample o, uniform over the other N - 1 samples.
  counts = np.bincount(draws[np.tile(own_rep, (200, 1))[:, 0] == 0].ravel(),
                       minlength=num_train)
  assert counts[0] == 0
  assert stats.chisquare(counts[1:]).pvalue > 1e-3
  np.testing.assert_array_equal(
      pipeline.partner_indices(0, 7, num_train, own, 2, 3),
      pipeline.partner_indices(0, 7, num_train, own, 2, 3))


@pytest.mark.parametrize('pixel_mix', ['cutmix', 'mixup'])
def test_shipped_partners_land_in_their_member_inputs(pixel_mix):
  """Partner [idx[r, m], m] is the one mixed into input (r, m)."""
  key = jax.random.PRNGKey(11)
  own_xs, _ = _member_batch(key)
  own = _ids(own_xs)[..., 0, 0]
  rows = N * B_REP
  # Partners planted with ids >= N, none a sample of the step.
  pid = np.arange(rows * M).reshape(rows, M) % 17 + N  # Values <= 245.
  p_images = jnp.asarray(
      np.broadcast_to((10 * pid + 5).astype(np.uint8)[..., None, None, None],
                      (rows, M, HW, HW, 3)))
  p_labels = jnp.asarray(pid % C, jnp.int32)
  xs, soft = _member_batch(key, pixel_mix=pixel_mix, pixel_mix_prob=1.0,
                           partner_images=p_images, partner_labels=p_labels)
  _, k_perm, _, _ = jax.random.split(key, 4)
  idx = np.asarray(mixmo_batch.member_indices(k_perm, rows, M))
  expected_partner = pid[idx, np.arange(M)[None, :]]
  soft = np.asarray(soft)
  pixels = np.asarray(xs)[..., 0]
  for r in range(rows):
    for m in range(M):
      vals = {10 * own[r, m] + 5, 10 * expected_partner[r, m] + 5}
      if pixel_mix == 'cutmix':
        assert set(np.unique(np.rint(pixels[r, m]))) <= vals
      share_own = soft[r, m, LABELS[own[r, m]]]
      want = (
          share_own * (10 * own[r, m] + 5) + (1 - share_own) *
          (10 * expected_partner[r, m] + 5))
      if LABELS[own[r, m]] != expected_partner[r, m] % C:
        np.testing.assert_allclose(pixels[r, m].mean(), want, atol=1e-3)


def test_prefetcher_yields_the_synchronous_batches():
  from mixmo_jax import data, feed
  config = tiny_digits_config('cut_mixmo+cutmix')
  mesh = sharding.make_mesh()
  train_x, train_y = data.load_split(config, 'train')
  feeder = feed.Feeder(config, train_x, train_y, mesh)
  with feed.Prefetcher(feeder, 3, 8, depth=2) as pre:
    for step in range(3, 8):
      batch, wait = pre.get(step)
      assert wait >= 0.0
      for a, b in zip(
          jax.device_get(batch), jax.device_get(feeder.batch(step))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match='expected step 8'):
      pre.get(9)


def test_prefetcher_raises_the_thread_error_and_closes():
  from mixmo_jax import feed

  class Broken:

    def batch(self, step):
      raise RuntimeError(f'broken at {step}')

  pre = feed.Prefetcher(Broken(), 0, 5)
  with pytest.raises(RuntimeError, match='broken at 0'):
    pre.get(0)
  pre.close()
  assert not pre._thread.is_alive()


def test_step_loop_needs_no_host_device_transfer():
  """The train steps with prefetched batches run under jax's transfer guard:
  nothing inside the step (schedule, p, keys, mixing) goes through the host;
  the batches are explicit transfers, done by the prefetcher's thread."""
  from mixmo_jax import data, feed, models, training
  config = tiny_digits_config('cut_mixmo+cutmix')
  mesh = sharding.make_mesh()
  train_x, train_y = data.load_split(config, 'train')
  feeder = feed.Feeder(config, train_x, train_y, mesh)
  model = models.get_model(config)
  state = training.create_train_state(config, model, 10, mesh)
  step_fn = training.make_train_step(config, model, 10, mesh)
  state, _ = step_fn(state, *feeder.batch(0))  # Compiles outside the guard.
  with feed.Prefetcher(feeder, 1, 4, depth=2) as batches:
    with jax.transfer_guard('disallow'):
      for step in range(1, 4):
        batch, _ = batches.get(step)
        state, metrics = step_fn(state, *batch)
    assert np.isfinite(jax.device_get(metrics['loss']))
  # The guard is effective: a host batch (an implicit transfer) is refused.
  host_batch = jax.device_get(feeder.batch(4))
  with pytest.raises(Exception, match='[Dd]isallowed'):
    with jax.transfer_guard('disallow'):
      step_fn(state, *host_batch)
