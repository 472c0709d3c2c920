"""Tests for mixmo_jax.mixmo: registry, blocks, schedules and member batches.

Statistics use fixed keys and tolerances of a few standard errors; the
reference numbers for the Cut-MixMo box are derived here independently
(exact enumeration and a NumPy simulation of the rule).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixmo_jax import mixmo
from mixmo_jax.mixmo import batch, blocks
from mixmo_jax.mixmo import schedule
from mixmo_jax.mixmo import masks as masks_lib

METHODS = ('sum', 'linear', 'cut')
# One batch shape for the whole file (each compiled Dirichlet sampler costs
# seconds): B = 64 samples on the 32 x 32 map of the CIFAR WRN stems.
B, H, W = 64, 32, 32

# One jitted sampler for the whole file: B, M, h, w and the method are
# static, alpha and p traced.
_sample_jit = jax.jit(mixmo.sample_mixing_weights, static_argnums=(1, 2, 3, 4),
                      static_argnames=('method',))


def sample(seed, num_members, method, alpha=2.0, p=0.5):
  """(weights [B, M, H, W], kappa [B, M]) as NumPy arrays."""
  weights, kappa = _sample_jit(
      jax.random.key(seed), B, num_members, H, W, method=method,
      alpha=jnp.float32(alpha), p=jnp.float32(p))
  return np.asarray(weights), np.asarray(kappa)


def sample_many(seed, num, num_members, method, alpha=2.0, p=0.5):
  """kappa [num, M] float64 from repeated calls on the compiled shape."""
  calls = -(-num // B)
  kappas = [
      sample(seed * 100_003 + i, num_members, method, alpha=alpha, p=p)[1]
      for i in range(calls)
  ]
  return np.concatenate(kappas).astype(np.float64)[:num]


def is_rectangle(masks):
  """[N, h, w] bool -> [N] bool: the True region is one axis-aligned box.

  The empty region counts as a (degenerate) box.
  """
  masks = np.asarray(masks, bool)
  rows, cols = masks.any(axis=2), masks.any(axis=1)
  filled = rows[:, :, None] & cols[:, None, :]

  def contiguous(v):
    edges = np.diff(v.astype(np.int8), axis=1, prepend=0, append=0)
    return (edges == 1).sum(axis=1) <= 1

  return (masks
          == filled).all(axis=(1, 2)) & contiguous(rows) & contiguous(cols)


def box_member_of_batch(weights):
  """The member whose region is a box in every sample (M = 2), else None."""
  rect = [
      is_rectangle(np.asarray(weights[:, i]) == 1).all()
      for i in range(weights.shape[1])
  ]
  if sum(rect) != 1:
    return None
  return int(np.argmax(rect))


# ----------------------------------------------------------------------------
# Reference numbers for the boxed share, derived independently.
# ----------------------------------------------------------------------------


def exact_boxed_share_moments(size=32):
  """Mean and variance of the clipped box's area ratio, kappa ~ Beta(2, 2).

  half = floor(floor(size * sqrt(kappa)) / 2) = j for kappa in
  [(2j/size)^2, ((2j+2)/size)^2); Beta(2, 2)'s CDF is 3x^2 - 2x^3.  Given j
  the two clipped side lengths are i.i.d. over the uniform integer centre.
  """
  cdf = lambda x: 3 * x**2 - 2 * x**3
  halves = np.arange(size // 2 + 1)
  lo = np.clip(2 * halves / size, 0, 1)**2
  hi = np.clip((2 * halves + 2) / size, 0, 1)**2
  prob = cdf(hi) - cdf(lo)
  centres = np.arange(size)
  lengths = (
      np.clip(centres[None] + halves[:, None], 0, size) -
      np.clip(centres[None] - halves[:, None], 0, size))
  m1 = (prob * lengths.mean(1)**2).sum() / size**2
  m2 = (prob * (lengths**2).mean(1)**2).sum() / size**4
  return m1, m2 - m1**2


def simulate_boxed_share(num, size=32, alpha=2.0, seed=0):
  """Direct NumPy simulation of the reference box rule."""
  rng = np.random.default_rng(seed)
  kappa = rng.beta(alpha, alpha, num)
  half = np.floor(size * np.sqrt(kappa)).astype(int) // 2
  cy, cx = rng.integers(0, size, num), rng.integers(0, size, num)
  height = np.clip(cy + half, 0, size) - np.clip(cy - half, 0, size)
  width = np.clip(cx + half, 0, size) - np.clip(cx - half, 0, size)
  return height * width / size**2


class TestReferenceNumbers:

  def test_exact_and_simulated_moments_agree(self):
    mean, var = exact_boxed_share_moments()
    share = simulate_boxed_share(200_000)
    se = share.std() / np.sqrt(share.size)
    assert abs(share.mean() - mean) < 4 * se
    assert abs(share.var() - var) < 0.0005
    # The numbers quoted in the design notes: not Beta(2, 2)'s 0.5 / 0.05.
    assert abs(mean - 0.307) < 0.0015 and abs(var - 0.0235) < 0.0002


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


@mixmo.register_mixing('test_stripes', overwrite=True)
def stripes_block(key, batch_size, num_members, height, width, *, alpha, p):
  """A user block: column j belongs to member j % M."""
  del key, alpha, p
  owner = jnp.arange(width) % num_members  # [w]
  mask = (owner[None, :] == jnp.arange(num_members)[:, None])  # [M, w]
  weights = jnp.broadcast_to(mask[None, :, None, :].astype(jnp.float32),
                             (batch_size, num_members, height, width))
  return weights, weights.mean(axis=(2, 3))


class TestRegistry:

  def test_builtin_names(self):
    assert set(METHODS) <= set(mixmo.mixing_names())

  def test_user_block_by_name(self):
    assert 'test_stripes' in mixmo.mixing_names()
    assert mixmo.get_mixing('test_stripes') is stripes_block
    weights, kappa = sample(0, 2, 'test_stripes')
    np.testing.assert_array_equal(weights[:, 0, :, 0::2], 1.0)
    np.testing.assert_array_equal(weights[:, 1, :, 0::2], 0.0)
    np.testing.assert_allclose(kappa, 0.5)

  def test_unknown_name_lists_known(self):
    with pytest.raises(KeyError) as excinfo:
      mixmo.get_mixing('no_such_block')
    for name in METHODS:
      assert name in str(excinfo.value)
    with pytest.raises(ValueError):
      mixmo.sample_mixing_weights(
          jax.random.key(0), 2, 2, 4, 4, method='no_such_block', alpha=2.0,
          p=0.5)

  def test_duplicate_registration_refused(self):
    with pytest.raises(ValueError):
      mixmo.register_mixing('cut')(stripes_block)
    assert mixmo.get_mixing('cut') is blocks.cut_mixing

  def test_wrong_shapes_rejected(self):

    @mixmo.register_mixing('test_bad_shape', overwrite=True)
    def bad(key, batch_size, num_members, height, width, *, alpha, p):
      return jnp.ones((batch_size, num_members, 1, 1)), jnp.ones((batch_size,))

    with pytest.raises(ValueError, match='expected'):
      mixmo.sample_mixing_weights(
          jax.random.key(0), 2, 2, 4, 4, method='test_bad_shape', alpha=2.0,
          p=0.5)


# ----------------------------------------------------------------------------
# The built-in blocks.
# ----------------------------------------------------------------------------


class TestAllBlocks:

  @pytest.mark.parametrize('method', METHODS)
  @pytest.mark.parametrize('num_members', [1, 2, 3])
  def test_partition_of_unity_and_kappa(self, method, num_members):
    for seed in range(3):
      weights, kappa = sample(seed, num_members, method,
                              p=0.5 + 0.5 * (seed == 0))
      assert weights.shape == (B, num_members, H, W)
      assert weights.dtype == np.float32 and kappa.dtype == np.float32
      assert kappa.shape == (B, num_members)
      np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
      assert (weights >= 0).all()
      np.testing.assert_allclose(kappa, weights.mean(axis=(2, 3)), atol=1e-6)

  @pytest.mark.parametrize('method', METHODS)
  def test_deterministic_and_key_dependent(self, method):
    w1, k1 = sample(3, 2, method, p=1.0)
    w2, k2 = sample(3, 2, method, p=1.0)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(k1, k2)
    if method != 'sum':
      w3, _ = sample(4, 2, method, p=1.0)
      assert not np.array_equal(w1, w3)

  def test_jit_agrees_with_eager(self):
    # Cut with M = 3 exercises every part: kappa, the box, the shares.
    key = jax.random.key(11)
    eager = mixmo.sample_mixing_weights(key, B, 3, H, W, method='cut',
                                        alpha=2.0, p=1.0)
    jitted = _sample_jit(key, B, 3, H, W, method='cut', alpha=jnp.float32(2.0),
                         p=jnp.float32(1.0))
    for a, b in zip(eager, jitted):
      np.testing.assert_allclose(a, b, atol=1e-6)

  def test_changing_p_and_alpha_does_not_recompile(self):
    key = jax.random.key(0)
    sample(0, 2, 'cut')  # compiled (or already cached)
    before = _sample_jit._cache_size()  # shared by all jit wrappers of fn
    results = []
    for p, alpha in [(0.0, 2.0), (0.5, 1.0), (1.0, 2.0), (0.3, 0.5)]:
      results.append(
          _sample_jit(key, B, 2, H, W, method='cut', alpha=jnp.float32(alpha),
                      p=jnp.float32(p)))
    assert _sample_jit._cache_size() == before
    # p really is used: p = 0 gives linear (constant) and p = 1 binary weights.
    w_linear, w_cut = np.asarray(results[0][0]), np.asarray(results[2][0])
    assert (w_linear == w_linear[..., :1, :1]).all()
    assert np.isin(w_cut, [0.0, 1.0]).all()


class TestSum:

  @pytest.mark.parametrize('num_members', [1, 2, 3])
  def test_weights_are_one_over_m(self, num_members):
    weights, kappa = sample(0, num_members, 'sum')
    np.testing.assert_array_equal(weights, np.float32(1.0 / num_members))
    np.testing.assert_array_equal(kappa, np.float32(1.0 / num_members))


class TestLinear:

  def test_beta_moments_m2(self):
    kappa = sample_many(1, 20_000, 2, 'linear', alpha=2.0)
    k0 = kappa[:, 0]
    # Beta(2, 2): mean 1/2, variance 1/20, fourth central moment 3/280.
    n = k0.size
    assert abs(k0.mean() - 0.5) < 4 * np.sqrt(0.05 / n)
    assert abs(k0.var() - 0.05) < 4 * np.sqrt((3 / 280 - 0.05**2) / n)
    np.testing.assert_allclose(kappa.sum(axis=1), 1.0, atol=1e-6)

  def test_dirichlet_marginal_m3(self):
    kappa = sample_many(2, 20_000, 3, 'linear', alpha=2.0)
    # Dir_3(2, 2, 2) marginal: Beta(2, 4), mean 1/3, variance 8 / 252.
    se = np.sqrt(8 / 252 / kappa.shape[0])
    np.testing.assert_allclose(kappa.mean(axis=0), 1 / 3, atol=4 * se)
    np.testing.assert_allclose(kappa.var(axis=0), 8 / 252, atol=0.0015)

  def test_constant_over_space(self):
    weights, kappa = sample(5, 3, 'linear')
    np.testing.assert_array_equal(
        weights,
        np.broadcast_to(np.asarray(kappa)[:, :, None, None], weights.shape))


class TestCut:

  def test_p0_never_cuts_p1_always_cuts(self):
    for seed in range(20):
      w0, _ = sample(seed, 2, 'cut', p=0.0)
      w0 = np.asarray(w0)
      assert (w0 == w0[..., :1, :1]).all()  # linear: constant over space
      w1, _ = sample(seed, 2, 'cut', p=1.0)
      assert np.isin(np.asarray(w1), [0.0, 1.0]).all()

  def test_cut_frequency_is_p(self):
    num = 200
    cut = 0
    for seed in range(num):
      w, _ = sample(100 + seed, 2, 'cut', p=0.3)
      w = np.asarray(w)
      cut += int(not (w == w[..., :1, :1]).all())
    assert abs(cut / num - 0.3) < 4 * np.sqrt(0.3 * 0.7 / num)

  def test_m2_box_or_complement_and_swap_half_the_time(self):
    num = 200
    box_member = []
    for seed in range(num):
      w, kappa = sample(1000 + seed, 2, 'cut', p=1.0)
      w = np.asarray(w)
      assert np.isin(w, [0.0, 1.0]).all()
      np.testing.assert_array_equal(w[:, 0] + w[:, 1], 1.0)
      np.testing.assert_allclose(kappa, w.mean(axis=(2, 3)), atol=1e-7)
      k = box_member_of_batch(w)
      assert k is not None, 'one member must hold a box in every sample'
      box_member.append(k)
    frac = np.mean(box_member)  # fraction of batches where member 1 holds it
    assert abs(frac - 0.5) < 4 * np.sqrt(0.25 / num)

  def test_boxed_share_matches_reference_rule(self):
    exact_mean, exact_var = exact_boxed_share_moments(32)
    reference = simulate_boxed_share(200_000, seed=1)
    fourth = np.mean((reference - reference.mean())**4)
    shares = []
    for seed in range(20_000 // B):
      w, kappa = sample(7_000 + seed, 2, 'cut', alpha=2.0, p=1.0)
      k = box_member_of_batch(w)
      assert k is not None
      shares.append(kappa[:, k].astype(np.float64))
    shares = np.concatenate(shares)
    n = shares.size
    se_mean = np.sqrt(exact_var / n)
    se_var = np.sqrt((fourth - exact_var**2) / n)
    assert abs(shares.mean() - exact_mean) < 4 * se_mean, shares.mean()
    assert abs(shares.var() - exact_var) < 4 * se_var, shares.var()

  def test_m3_box_member_and_shared_complement(self):
    members = []
    for seed in range(120):
      w, kappa = sample(5000 + seed, 3, 'cut', p=1.0)
      w = np.asarray(w)
      np.testing.assert_allclose(kappa, w.mean(axis=(2, 3)), atol=1e-6)
      # The box member: weights in {0, 1}, a box in every sample.
      candidates = [
          i for i in range(3)
          if np.isin(w[:, i], [0.0, 1.0]).all() and is_rectangle(
              w[:, i] == 1).all()
      ]
      assert len(candidates) >= 1
      k = candidates[0]
      members.append(k)
      box = w[:, k] == 1
      others = [i for i in range(3) if i != k]
      for i in others:
        assert (w[:, i][box] == 0).all()
        # On the complement each other member has one constant weight.
        outside = np.where(box, np.nan, w[:, i])
        spread = np.nanmax(outside, axis=(1, 2)) - np.nanmin(
            outside, axis=(1, 2))
        valid = ~box.all(axis=(1, 2))
        assert (spread[valid] < 1e-6).all()
    counts = np.bincount(members, minlength=3) / len(members)
    assert (np.abs(counts - 1 / 3) < 4 * np.sqrt(2 / 9 / len(members))).all()

  def test_m3_marginal_mean_under_linear_branch(self):
    # p = 0: 'cut' is Linear-MixMo with Dir_3(alpha) ratios.
    kappa = sample_many(9, 20_000, 3, 'cut', alpha=2.0, p=0.0)
    se = np.sqrt(8 / 252 / kappa.shape[0])
    np.testing.assert_allclose(kappa.mean(axis=0), 1 / 3, atol=4 * se)


class TestBoxMasks:

  def test_side_rule_and_clipping(self):
    height, width = 24, 32  # non-square: each side follows its own axis
    area = np.random.default_rng(0).beta(2.0, 2.0, 2000).astype(np.float32)
    masks = np.asarray(
        jax.jit(masks_lib.random_box_masks,
                static_argnums=(2, 3))(jax.random.key(1), area, height,
                                       width)) == 1
    assert masks.shape == (2000, height, width)
    assert is_rectangle(masks).all()
    root = np.sqrt(area.astype(np.float64))
    sides = {
        size: 2 * (np.floor(size * root).astype(int) // 2)
        for size in (height, width)
    }
    # A box is empty exactly when one of its sides rounds down to 0.
    empty = ~masks.any(axis=(1, 2))
    np.testing.assert_array_equal(empty,
                                  (sides[height] == 0) | (sides[width] == 0))
    masks, sides = masks[~empty], {k: v[~empty] for k, v in sides.items()}
    rows = masks.any(axis=2).sum(axis=1)
    cols = masks.any(axis=1).sum(axis=1)
    for length, size in ((rows, height), (cols, width)):
      side = sides[size]
      assert (length <= side).all()
      assert (length >= side // 2).all()  # the centre lies inside the map
      # Boxes away from both borders keep their full even side.
      covered = masks.any(axis=2) if size == height else masks.any(axis=1)
      inner = ~covered[:, 0] & ~covered[:, -1]
      assert inner.sum() > 100
      np.testing.assert_array_equal(length[inner], side[inner])
    # Centres are uniform over the whole map: boxes touch every border.
    assert masks[:, 0].any() and masks[:, -1].any()
    assert masks[:, :, 0].any() and masks[:, :, -1].any()


# ----------------------------------------------------------------------------
# Schedule and batches.
# ----------------------------------------------------------------------------


def piecewise_reference(epoch, num_epochs, p, decay_fraction):
  """Algorithm 1 lines 8-11, in plain Python."""
  if epoch > (1 - decay_fraction) * num_epochs:
    return p * (num_epochs - epoch) / (decay_fraction * num_epochs)
  return p


class TestPatchProbability:

  def test_named_epochs(self):
    fn = schedule.patch_probability
    np.testing.assert_allclose(fn(1, 300, 0.5), 0.5)
    np.testing.assert_allclose(fn(275, 300, 0.5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(fn(276, 300, 0.5), 0.96 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(fn(300, 300, 0.5), 0.0, atol=1e-7)
    np.testing.assert_allclose(fn(11, 12, 0.5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(fn(12, 12, 0.5), 0.0, atol=1e-7)

  @pytest.mark.parametrize('num_epochs,decay_fraction', [(300, 1 / 12),
                                                         (12, 1 / 12),
                                                         (50, 0.2)])
  def test_matches_algorithm_under_jit(self, num_epochs, decay_fraction):
    fn = jax.jit(schedule.patch_probability, static_argnums=(1,))
    call = lambda e: float(
        fn(jnp.int32(e), num_epochs, jnp.float32(0.6), decay_fraction))
    call(1)
    cached = fn._cache_size()  # the cache is shared by all jit wrappers
    got = [call(e) for e in range(1, num_epochs + 1)]
    want = [
        piecewise_reference(e, num_epochs, 0.6, decay_fraction)
        for e in range(1, num_epochs + 1)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert fn._cache_size() == cached  # a traced epoch does not recompile

  def test_no_decay(self):
    np.testing.assert_allclose(
        schedule.patch_probability(300, 300, 0.5, 0.0), 0.5)


class TestMemberIndices:

  @pytest.mark.parametrize('rho', [0.0, 0.5, 1.0])
  def test_columns_are_permutations(self, rho):
    idx = np.asarray(batch.member_indices(jax.random.key(0), 64, 3, rho))
    assert idx.shape == (64, 3) and idx.dtype == np.int32
    for i in range(3):
      np.testing.assert_array_equal(np.sort(idx[:, i]), np.arange(64))

  def test_identical_row_fraction(self):
    size = 1000
    for seed in range(3):
      key = jax.random.key(seed)
      idx0 = np.asarray(batch.member_indices(key, size, 2, 0.0))
      idx5 = np.asarray(batch.member_indices(key, size, 2, 0.5))
      same0 = np.mean(idx0[:, 0] == idx0[:, 1])
      same5 = np.mean(idx5[:, 0] == idx5[:, 1])
      assert same0 < 0.01  # about 1 fixed point expected
      assert 0.5 <= same5 < 0.51
      # The columns are not identical copies when rho < 1.
      assert not np.array_equal(idx5[:, 0], idx5[:, 1])
    idx1 = np.asarray(batch.member_indices(jax.random.key(0), 64, 3, 1.0))
    assert (idx1 == idx1[:, :1]).all()

  def test_members_differ_and_deterministic(self):
    key = jax.random.key(3)
    a = np.asarray(batch.member_indices(key, 64, 2))
    b = np.asarray(batch.member_indices(key, 64, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, 0], a[:, 1])

  def test_invalid_rho(self):
    with pytest.raises(ValueError):
      batch.member_indices(jax.random.key(0), 8, 2, 1.5)


class TestRepeatBatch:

  def test_tiling_order(self):
    x = np.arange(12, dtype=np.int32).reshape(3, 2, 2)
    y = np.asarray(batch.repeat_batch(x, 4))
    assert y.shape == (12, 2, 2)
    for n in range(3):
      for rep in range(4):
        np.testing.assert_array_equal(y[n + 3 * rep], x[n])

  def test_b1_is_identity(self):
    x = np.arange(5)
    np.testing.assert_array_equal(batch.repeat_batch(x, 1), x)
