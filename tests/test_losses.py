"""Tests for mixmo_jax.losses against NumPy computations written here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixmo_jax.mixmo import loss


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def random_kappa(seed, batch, members):
  return np.random.default_rng(seed).dirichlet([2.0] * members, batch)


class TestMemberWeights:

  @pytest.mark.parametrize('members', [2, 3, 4])
  @pytest.mark.parametrize('r', [1.0, 2.0, 3.0, 10.0])
  def test_formula(self, members, r):
    kappa = random_kappa(members, 32, members)
    root = kappa**(1 / r)
    want = members * root / root.sum(axis=1, keepdims=True)  # eq. 5
    got = loss.member_weights(jnp.asarray(kappa, jnp.float32), r)
    assert got.shape == (32, members) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(got).sum(axis=1), members, rtol=1e-5)

  def test_two_members_eq3(self):
    k = np.linspace(0.01, 0.99, 50)
    kappa = np.stack([k, 1 - k], axis=1)
    w = np.asarray(loss.member_weights(jnp.asarray(kappa, jnp.float32), 3.0))
    want = 2 * k**(1 / 3) / (k**(1 / 3) + (1 - k)**(1 / 3))
    np.testing.assert_allclose(w[:, 0], want, rtol=2e-5)
    np.testing.assert_allclose(w[:, 1], 2 - w[:, 0], atol=2e-5)  # Alg. 1 l.31

  def test_limits(self):
    kappa = jnp.asarray(random_kappa(0, 64, 3), jnp.float32)
    np.testing.assert_allclose(
        loss.member_weights(kappa, 1.0), 3 * kappa, rtol=1e-5)
    mask = np.asarray(kappa).min(axis=1) > 1e-3
    large = np.asarray(loss.member_weights(kappa, 1e5))[mask]
    np.testing.assert_allclose(large, 1.0, atol=1e-3)
    np.testing.assert_allclose(loss.member_weights(kappa, jnp.inf), 1.0)
    equal = jnp.full((4, 2), 0.5)
    np.testing.assert_allclose(loss.member_weights(equal, 3.0), 1.0)

  def test_safe_at_zero(self):
    kappa = jnp.asarray([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.25, 0.75]])
    w = loss.member_weights(kappa, 3.0)
    np.testing.assert_allclose(w[:2], [[0.0, 2.0], [2.0, 0.0]])
    np.testing.assert_allclose(w[2], [1.0, 1.0])  # degenerate row
    grad = jax.grad(
        lambda k: jnp.sum(loss.member_weights(k, 3.0) * jnp.arange(1.0, 3.0)))(
            kappa)
    assert np.isfinite(np.asarray(grad)).all()

  def test_traced_r_under_jit(self):
    kappa = jnp.asarray(random_kappa(1, 8, 2), jnp.float32)
    fn = jax.jit(loss.member_weights)
    for r in (1.0, 3.0):
      np.testing.assert_allclose(
          fn(kappa, jnp.float32(r)), loss.member_weights(kappa, r), rtol=1e-6)


class TestCrossEntropy:

  def test_integer_targets(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3, 7)) * 3
    labels = rng.integers(0, 7, size=(5, 3))
    got = loss.cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    want = -np.take_along_axis(
        np_log_softmax(logits), labels[..., None], axis=-1)[..., 0]
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_soft_targets_and_one_hot_agree(self):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 2, 5))
    soft = rng.dirichlet(np.ones(5), size=(6, 2))
    got = loss.cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(soft, jnp.float32))
    want = -(soft * np_log_softmax(logits)).sum(axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    labels = rng.integers(0, 5, size=(6, 2))
    one_hot = np.eye(5)[labels]
    np.testing.assert_allclose(
        loss.cross_entropy(jnp.asarray(logits), jnp.asarray(one_hot)),
        loss.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), rtol=1e-6)

  def test_bad_targets(self):
    logits = jnp.zeros((4, 3))
    with pytest.raises(TypeError):
      loss.cross_entropy(logits, jnp.zeros((4,), jnp.float32))
    with pytest.raises(ValueError):
      loss.cross_entropy(logits, jnp.zeros((4, 3, 2)))


def np_mixmo_loss(logits, targets, weights):
  """(1/B) sum_b sum_i w_bi CE_bi, written out with loops (eq. 4)."""
  log_probs = np_log_softmax(logits)
  batch, members, classes = logits.shape
  total = 0.0
  for b in range(batch):
    for i in range(members):
      if targets.ndim == 2:
        ce = -log_probs[b, i, targets[b, i]]
      else:
        ce = -sum(targets[b, i, c] * log_probs[b, i, c] for c in range(classes))
      total += weights[b, i] * ce
  return total / batch


def np_mixmo_grad(logits, targets, weights):
  """d loss / d logits = w_bi / B * (softmax_bi - y_bi)."""
  probs = np.exp(np_log_softmax(logits))
  classes = logits.shape[-1]
  y = np.eye(classes)[targets] if targets.ndim == 2 else targets
  return weights[..., None] / logits.shape[0] * (probs - y)


class TestMixmoLoss:

  @pytest.mark.parametrize('soft', [False, True])
  def test_value_and_gradient(self, soft):
    rng = np.random.default_rng(2 + soft)
    batch, members, classes = 8, 3, 6
    logits = rng.normal(size=(batch, members, classes)) * 2
    if soft:
      targets = rng.dirichlet(np.ones(classes), size=(batch, members))
    else:
      targets = rng.integers(0, classes, size=(batch, members))
    kappa = random_kappa(4, batch, members)
    weights = np.asarray(
        loss.member_weights(jnp.asarray(kappa), 3.0), np.float64)
    args = (jnp.asarray(logits, jnp.float32),
            jnp.asarray(targets, jnp.float32 if soft else jnp.int32),
            jnp.asarray(weights, jnp.float32))
    value, grad = jax.jit(jax.value_and_grad(loss.mixmo_loss))(*args)
    assert value.shape == ()
    np.testing.assert_allclose(value, np_mixmo_loss(logits, targets, weights),
                               rtol=1e-5)
    np.testing.assert_allclose(grad, np_mixmo_grad(logits, targets, weights),
                               atol=1e-6)
    np.testing.assert_allclose(loss.mixmo_loss(*args), value, rtol=1e-6)

  def test_weight_shape_checked(self):
    with pytest.raises(ValueError):
      loss.mixmo_loss(
          jnp.zeros((4, 2, 3)), jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 3)))


class TestL2Penalty:

  def test_sum_of_squares_of_all_leaves(self):
    rng = np.random.default_rng(5)
    params = {
        'stems': {
            'kernel': rng.normal(size=(2, 3, 3, 3, 4))
        },
        'core': [{
            'scale': rng.normal(size=(4,)),
            'bias': rng.normal(size=(4,))
        }],
        'heads': {
            'kernel': rng.normal(size=(2, 4, 5)),
            'bias': rng.normal(size=(2, 5))
        },
    }
    want = sum(np.sum(np.square(x)) for x in jax.tree.leaves(params))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    np.testing.assert_allclose(loss.l2_penalty(params), want, rtol=1e-5)
    np.testing.assert_allclose(
        jax.jit(loss.l2_penalty)(params), want, rtol=1e-5)
    # Gradient 2 * params (no 1/2 factor).
    grads = jax.grad(loss.l2_penalty)(params)
    jax.tree.map(lambda g, x: np.testing.assert_allclose(g, 2 * x, rtol=1e-6),
                 grads, params)

  def test_empty_tree(self):
    assert float(loss.l2_penalty({})) == 0.0
