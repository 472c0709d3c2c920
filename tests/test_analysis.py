"""Tests for mixmo_jax.analysis: stem filter norms and active core filters."""
import json

import numpy as np
import pytest

from mixmo_jax import analysis


def _kernel_with_norms(rng, shape, norms):
  """A [kh,kw,in,out] kernel whose output filter j has l1 norm norms[j].

  Filter j is +-norms[j] / 2 at two distinct random positions and zero
  elsewhere, so that the l1 sums are exact in floating point (the tests probe
  the boundary f_j == t_a * max f).
  """
  kh, kw, n_in, n_out = shape
  assert len(norms) == n_out
  kernel = np.zeros(shape)
  for j, norm in enumerate(norms):
    flat = rng.choice(kh * kw * n_in, size=2, replace=False)
    for index in flat:
      a, b, c = np.unravel_index(index, (kh, kw, n_in))
      kernel[a, b, c, j] = rng.choice([-1.0, 1.0]) * norm / 2
  return kernel


@pytest.fixture
def fabricated_params():
  """Stems, two residual-style modules, a zero layer, heads and BN leaves.

  Layer norms: conv_a [10, 5, 4.5, 3.9, 2, 1, 0.5, 0] (8 filters),
  shortcut [2, 2, 2, 2] (1x1, 4 filters), conv_zero all zero (2 filters).
  """
  rng = np.random.default_rng(0)
  return {
      'stems': {
          'kernel': rng.normal(size=(2, 3, 3, 3, 16))
      },
      'stage1_block0': {
          'conv1': {
              'kernel':
                  _kernel_with_norms(rng, (3, 3, 4, 8),
                                     [10, 5, 4.5, 3.9, 2, 1, 0.5, 0])
          },
          'shortcut_conv': {
              'kernel': _kernel_with_norms(rng, (1, 1, 6, 4), [2, 2, 2, 2])
          },
          'bn1': {
              'scale': np.ones(8),
              'bias': np.zeros(8)
          },
      },
      'stage2_block0': {
          'conv2': {
              'kernel': np.zeros((3, 3, 2, 2))
          }
      },
      'heads': {
          'kernel': rng.normal(size=(2, 8, 10)),
          'bias': np.zeros((2, 10))
      },
  }


def _expected_share(norm_lists, t, average):
  """Independent computation: loops over layers and filters."""
  active, total, per_layer = 0, 0, []
  for norms in norm_lists:
    top = max(norms)
    layer_active = sum(1 for n in norms if top > 0 and n >= t * top)
    active += layer_active
    total += len(norms)
    per_layer.append(layer_active / len(norms))
  return 100.0 * (
      active / total if average == 'filter' else sum(per_layer) /
      len(per_layer))


NORMS = [[10, 5, 4.5, 3.9, 2, 1, 0.5, 0], [2, 2, 2, 2], [0, 0]]


class TestStemFilterNorms:

  def test_matches_loop(self):
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 3, 3, 5))
    norms = analysis.stem_filter_norms({'stems': {'kernel': kernel}})
    assert norms.shape == (3, 5)
    for i in range(3):
      for c in range(5):
        expected = sum(
            abs(kernel[i, a, b, d, c])
            for a in range(3)
            for b in range(3)
            for d in range(3))
        assert norms[i, c] == pytest.approx(expected)

  def test_separated_encoders(self):
    # Member 0 owns filters 0..7, member 1 filters 8..15 (Figure 4a pattern).
    kernel = np.zeros((2, 3, 3, 3, 16))
    kernel[0, ..., :8] = 1.0
    kernel[1, ..., 8:] = -2.0
    norms = analysis.stem_filter_norms({'stems': {'kernel': kernel}})
    np.testing.assert_allclose(norms[0], [27.0] * 8 + [0.0] * 8)
    np.testing.assert_allclose(norms[1], [0.0] * 8 + [54.0] * 8)

  def test_rejects_non_stacked_kernel(self):
    with pytest.raises(ValueError):
      analysis.stem_filter_norms({'stems': {'kernel': np.zeros((3, 3, 3, 16))}})


class TestActiveFilters:

  def test_core_kernels_exclude_stems_heads_bn(self, fabricated_params):
    kernels = analysis.core_kernels(fabricated_params)
    assert sorted(kernels) == [
        'stage1_block0/conv1/kernel', 'stage1_block0/shortcut_conv/kernel',
        'stage2_block0/conv2/kernel'
    ]

  def test_filter_norms(self, fabricated_params):
    kernels = analysis.core_kernels(fabricated_params)
    np.testing.assert_allclose(
        analysis.filter_l1_norms(kernels['stage1_block0/conv1/kernel']),
        NORMS[0])

  def test_exactly_three_of_eight_at_0_4(self, fabricated_params):
    layer = analysis.layer_shares(fabricated_params, 0.4)
    assert layer['stage1_block0/conv1/kernel'] == pytest.approx(100 * 3 / 8)
    assert layer['stage1_block0/shortcut_conv/kernel'] == pytest.approx(100.0)
    assert layer['stage2_block0/conv2/kernel'] == 0.0  # All-zero layer.

  @pytest.mark.parametrize('average', ['filter', 'layer'])
  def test_share_matches_independent_count(self, fabricated_params, average):
    thresholds = (0.2, 0.3, 0.4, 0.5)
    share = analysis.active_filter_share(fabricated_params, thresholds, average)
    assert list(share) == list(thresholds)
    for t in thresholds:
      assert share[t] == pytest.approx(_expected_share(NORMS, t, average))
    # Hand-checked: at t_a = 0.4, 3 + 4 + 0 active of 8 + 4 + 2 filters.
    if average == 'filter':
      assert share[0.4] == pytest.approx(50.0)
      assert share[0.2] == pytest.approx(100 * 9 / 14)  # 2 >= 0.2 * 10 counts.
    else:
      assert share[0.4] == pytest.approx(100 * (3 / 8 + 1 + 0) / 3)

  def test_invariant_to_layer_scale_and_filter_order(self, fabricated_params):
    base = analysis.active_filter_share(fabricated_params)
    changed = dict(fabricated_params)
    block = dict(changed['stage1_block0'])
    kernel = block['conv1']['kernel']
    block['conv1'] = {'kernel': 7.5 * kernel[..., ::-1]}
    changed['stage1_block0'] = block
    assert analysis.active_filter_share(changed) == pytest.approx(base)

  def test_monotone_in_threshold(self):
    rng = np.random.default_rng(3)
    params = {
        'a': {
            'kernel': rng.normal(size=(3, 3, 8, 32))
        },
        'b': {
            'kernel': rng.gamma(0.5, size=(3, 3, 32, 64))
        }
    }
    ts = np.linspace(0.0, 1.0, 11)
    share = analysis.active_filter_share(params, ts)
    values = [share[float(t)] for t in ts]
    assert values[0] == 100.0
    assert all(x >= y for x, y in zip(values, values[1:]))
    assert 0.0 < values[-1] < 100.0  # Only each layer's max filter(s).

  def test_bad_average_and_empty(self, fabricated_params):
    with pytest.raises(ValueError):
      analysis.active_filter_share(fabricated_params, average='mean')
    with pytest.raises(ValueError):
      analysis.active_filter_share({'stems': fabricated_params['stems']})


def test_real_wide_resnet_tree():
  """The model's own tree: stems [M,3,3,3,16]; core = all 4-D conv kernels."""
  import jax
  import jax.numpy as jnp
  from mixmo_jax.models import WideResNet
  model = WideResNet(depth=10, width=1, num_classes=10, num_members=2)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False))
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32),
                        variables['params'])
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  expected = {
      jax.tree_util.keystr(p)
      for p, x in leaves
      if x.ndim == 4 and 'stems' not in jax.tree_util.keystr(p)
  }
  assert len(analysis.core_kernels(params)) == len(expected) >= 6
  assert analysis.stem_filter_norms(params).shape == (2, 16)
  np.testing.assert_allclose(analysis.stem_filter_norms(params), 27.0)
  assert analysis.active_filter_share(params, (0.9,))[0.9] == 100.0


def test_report_plot_and_cli(fabricated_params, tmp_path, monkeypatch, capsys):
  rep = analysis.report(fabricated_params, (0.4,))
  json.dumps(rep)
  assert rep['num_core_filters'] == 14 and rep['num_core_layers'] == 3
  assert rep['active_share_percent']['filter']['0.4'] == pytest.approx(50.0)

  from mixmo_jax.evaluation import runs
  import ml_collections
  config = ml_collections.ConfigDict({
      'variant': 'cut_mixmo',
      'model': {
          'name': 'wide_resnet',
          'depth': 28,
          'width': 10
      }
  })
  calls = []

  def fake_restore(workdir, config=None, step=None):
    calls.append((workdir, step))
    return runs.Run(workdir, config_, {
        'params': fabricated_params,
        'batch_stats': {}
    }, 42)

  config_ = config
  monkeypatch.setattr(runs, 'restore_run', fake_restore)
  png = tmp_path / 'fig' / 'util.png'
  code = analysis.main(
      [f'--workdir={tmp_path}', '--thresholds=0.3,0.4', f'--plot={png}'])
  assert code == 0 and calls == [(str(tmp_path), None)]
  out = capsys.readouterr().out
  assert 't_a=0.40:  50.00 % of filters' in out
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(tmp_path / 'utilisation.json') as f:
    saved = json.load(f)
  assert saved['step'] == 42 and saved['thresholds'] == [0.3, 0.4]
  assert analysis.main([f'--workdir={tmp_path}', '--thresholds=a']) == 2


def test_labels_name_the_workdir():
  from mixmo_jax import analysis, configs
  config = configs.get('digits:cut_mixmo')
  labels = {
      analysis._label(config, f'/runs/{name}/')
      for name in ('seed0', 'seed1', 'seed2')
  }
  assert len(labels) == 3
  assert all(
      label.startswith('seed') and 'cut_mixmo' in label for label in labels)
