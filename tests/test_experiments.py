"""Tests for experiments/: the row registry, the command planner, the summary."""
import csv
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from experiments import run as run_lib  # noqa: E402
from experiments import summarize  # noqa: E402
from experiments import tables  # noqa: E402

RESULTS_CSV = summarize.DEFAULT_RESULTS_CSV  # The paper's numbers, in the repo.
PAPER_TABLES = ('1', '2', '5', '6', '8', '9')
needs_csv = pytest.mark.skipif(not os.path.exists(RESULTS_CSV),
                               reason='experiments/paper_results.csv missing')

# What each method must resolve to (config.mixing.method, pixel_mix, M, b).
EXPECTED_MIXING = {'mimo': 'sum', 'linear_mixmo': 'linear', 'cut_mixmo': 'cut'}


def _find(table, dataset, method, cutmix=False, b=1, n=1, width=None, m=None):
  width = width if width is not None else (
      1 if dataset == 'tiny_imagenet' else 10)
  hits = [
      e for e in tables.ENTRIES
      if (e.table, e.dataset, e.method, e.cutmix, e.b, e.n_networks,
          e.width) == (table, dataset, method, cutmix, b, n,
                       width) and (m is None or e.num_members == m)
  ]
  assert len(hits) == 1, hits
  return hits[0]


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------


def test_every_entry_config_loads_validates_and_matches_its_row():
  from mixmo_jax import config_validation
  for entry in tables.ENTRIES:
    config = tables.load_config(entry, seed=1)
    config_validation.validate(config, num_devices=1)
    assert config.seed == 1
    # CIFAR-100-C rows (Table 4, 'ub') train on CIFAR-100.
    assert config.dataset == (
        entry.dataset[:-2] if entry.corruptions else entry.dataset)
    assert config.model.width == entry.width
    assert config.batch_repetitions == entry.b
    assert config.num_members == entry.num_members
    if entry.network == 'wrn28':
      assert (config.model.name, config.model.depth) == ('wide_resnet', 28)
    else:
      assert config.model.name == 'preact_resnet18'
    pixel = ('cutmix' if entry.cutmix or entry.method == 'cutmix' else
             'mixup' if entry.method == 'mixup' else 'none')
    assert config.augment.pixel_mix == pixel, entry.label
    if entry.method in EXPECTED_MIXING:
      assert config.mixing.method == EXPECTED_MIXING[entry.method]
    if entry.method in ('vanilla', 'mixup', 'cutmix', 'deep_ensemble'):
      assert (config.num_members, config.batch_repetitions) == (1, 1)
    if entry.table == '5':
      assert config.dataset == 'tiny_imagenet' and config.num_epochs == 1200
    # The paper's protocol (Appendix 6.5): the test set after every epoch.
    assert config.eval_every_epochs == 1, entry.label


def test_table2_blocks_use_the_registry_names():
  for method, block in tables.TABLE2_BLOCKS.items():
    entry = _find('2', 'cifar100', method, b=2)
    assert ('mixing.method', block) in entry.overrides
    assert tables.load_config(entry).mixing.method == block
  assert set(tables.TABLE2_BLOCKS.values()) == {
      'linear', 'top_bottom_concat', 'left_right_concat', 'patchup', 'fmix',
      'cowmask', 'cut'
  }


def test_table2_blocks_registered_for_main():
  """What `python -m mixmo_jax.main` sees: the registry after importing
  config_validation and the method package alone, in a fresh process."""
  code = ('from mixmo_jax import config_validation, mixmo; '
          'print(",".join(mixmo.mixing_names()))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  names = set(proc.stdout.strip().split(','))
  assert set(tables.TABLE2_BLOCKS.values()) <= names


def _csv_rows():
  with open(RESULTS_CSV, newline='') as f:
    return list(csv.DictReader(f))


@needs_csv
def test_every_paper_row_is_covered_and_nothing_invented():
  rows = [r for r in _csv_rows() if r['table'] in PAPER_TABLES]
  csv_keys = {(r['table'], r['dataset'], r['network'], int(r['width']),
               r['method'], int(r['cutmix']), int(r['b']), int(r['n_networks']))
              for r in rows}
  entry_keys = {e.key for e in tables.ENTRIES if e.table in PAPER_TABLES}
  assert csv_keys - entry_keys == set()
  assert entry_keys - csv_keys == set()
  assert len(entry_keys) == len(
      [e for e in tables.ENTRIES if e.table in PAPER_TABLES])
  best = {
      (r['table'],) + tuple(r[k] for k in ('dataset', 'method')):
          int(r['best_epoch']) for r in rows
  }
  for e in tables.ENTRIES:
    if e.table in PAPER_TABLES:
      assert best[(e.table, e.dataset, e.method)] == e.best_epoch


@needs_csv
def test_table4_rows_cover_the_csv_and_train_with_augmix():
  rows = [r for r in _csv_rows() if r['table'] == '4']
  csv_keys = {(r['table'], r['dataset'], r['network'], int(r['width']),
               r['method'], int(r['cutmix']), int(r['b']), int(r['n_networks']))
              for r in rows}
  entries = tables.TABLE4_ENTRIES
  keys = {e.key for e in entries}
  assert len(keys) == len(entries) == 10
  assert keys == csv_keys  # Every reconstructed column has some number.
  assert {r['metric'] for r in rows} == {'top1', 'top5', 'nll'}
  # 27 cells: 10 columns x 3 metrics, less the 3 unassignable Top1 cells.
  assert len(rows) == 27
  top1 = {r['method'] for r in rows if r['metric'] == 'top1'}
  assert top1.isdisjoint({'deep_ensemble', 'deep_ensemble_augmix', 'mimo'})
  clean = {
      e.row_key[1:]: e
      for e in tables.ENTRIES
      if e.table == '1' and e.dataset == 'cifar100'
  }
  for e in entries:
    config = tables.load_config(e, seed=0)
    augmix = e.method.endswith(tables.AUGMIX_SUFFIX)
    assert e.corruptions and config.augment.augmix == augmix
    assert config.dataset == 'cifar100'
    if not augmix:  # The same training as Table 1's row.
      same = clean[e.row_key[1:]]
      assert (tables.training_key(config) == tables.training_key(
          tables.load_config(same, seed=0)))
  assert set(entries) == {e for e in tables.ENTRIES if e.table == '4'}


def test_table4_plan_evaluates_on_the_corruptions_into_its_own_file():
  entries = [
      e for e in tables.TABLE4_ENTRIES
      if e.method in ('cut_mixmo', 'cut_mixmo_augmix', 'deep_ensemble')
  ]
  entries = [dataclasses.replace(e, seeds=(0,)) for e in entries]
  trains, singles, later = run_lib.plan(entries, '/r', 'PY',
                                        corruptions_dir='/data/c100c')
  # One clean eval.json per training, paired with it (the jobs mode zips).
  assert len(singles) == len(trains)
  for train, single in zip(trains, singles):
    assert single.output == os.path.join(train.output, 'eval.json')
    assert not any(a.startswith('--corruptions') for a in single.argv)
  outputs = {job.output: job.argv for job in later}
  cut = [e for e in entries if e.method == 'cut_mixmo'][0]
  de = [e for e in entries if e.method == 'deep_ensemble'][0]
  cut_out = run_lib.eval_path('/r', cut, 0)
  de_out = run_lib.eval_path('/r', de, 0)
  assert os.path.basename(cut_out) == 'eval_cifar_c.json'
  assert os.path.basename(de_out) == 'eval_ensemble2_cifar_c.json'
  # Table 4's Cut-MixMo without AugMix is Table 1's training.
  assert cut_out.startswith('/r/1/cifar100_wrn28-10_cut_mixmo_b4/seed0/')
  assert '--corruptions=/data/c100c' in outputs[cut_out]
  assert '--corruptions=/data/c100c' in outputs[de_out]
  assert any(a.startswith('--ensemble=') for a in outputs[de_out])
  # Without --corruptions_dir, the printed command names a placeholder.
  argv = run_lib.eval_argv(cut, 0, '/r')
  assert f'--corruptions={run_lib.CORRUPTIONS_PLACEHOLDER}' in argv


@needs_csv
def test_table4_summary_reads_the_corruption_mean(tmp_path):
  root = str(tmp_path / 'runs')
  (cut,) = [e for e in tables.TABLE4_ENTRIES if e.method == 'cut_mixmo']
  # The clean eval.json of the same training must not be read for Table 4.
  _write_eval(
      run_lib.eval_path(root, dataclasses.replace(cut, corruptions=False), 0),
      0.9, best=(0.91, 0.5))
  path = run_lib.eval_path(root, cut, 0)
  with open(path, 'w') as f:
    json.dump(
        {
            'corruptions': {
                'mean': {
                    'top1': 0.571,
                    'top5': 0.8,
                    'nll': 1.9,
                    'ece': 0.1
                },
                'pooled': {
                    'top1': 0.2
                }
            }
        }, f)
  sections = _parse_markdown(summarize.summarize(root, ['4'], RESULTS_CSV))
  row = _row(sections, 'Table 4', dataset='cifar100_c', method='cut_mixmo')
  assert row['Top-1 % ours (best epoch)'] == '57.10 (f)'
  assert row['NLL ours (best epoch)'] == '1.900 (f)'
  assert row['Top-1 % paper (best epoch)'] == '57.00'


def test_figure9_rows():
  fig9 = [e for e in tables.ENTRIES if e.table == 'fig9']
  assert sorted((e.method, e.num_members) for e in fig9) == [('cut_mixmo', 2),
                                                             ('cut_mixmo', 3),
                                                             ('mimo', 2),
                                                             ('mimo', 3)]
  for e in fig9:
    config = tables.load_config(e)
    assert (config.dataset, config.model.width,
            config.batch_repetitions) == ('cifar100', 10, 2)


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_command_line_flags_give_the_same_config(monkeypatch):
  """entry.config_args() parsed by ml_collections == tables.load_config."""
  from absl import flags
  from ml_collections import config_flags
  monkeypatch.chdir(REPO)
  picks = [
      _find('1', 'cifar10', 'cut_mixmo', cutmix=True, b=4),
      _find('2', 'cifar100', 'mixmo_block_cowmask', b=2),
      _find('5', 'tiny_imagenet', 'linear_mixmo', b=4, width=3),
      _find('9', 'cifar100', 'vanilla', cutmix=True, width=7),
      _find('fig9', 'cifar100', 'cut_mixmo', b=2, m=3)
  ]
  for entry in picks:
    argv = ['prog'] + entry.config_args() + ['--config.seed=4']
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
    values(argv)
    parsed = values.config
    assert parsed.to_dict() == tables.load_config(entry, seed=4).to_dict()


def test_shared_trainings_have_equal_configs():
  by_workdir = {}
  for entry in tables.ENTRIES:
    wd = run_lib.workdir('/r', entry, 0)
    key = tables.training_key(tables.load_config(entry))
    assert by_workdir.setdefault(wd, key) == key, entry.label
  # Different configs never share a workdir, equal ones always do.
  assert len(set(by_workdir.values())) == len(by_workdir)
  t1 = _find('1', 'cifar100', 'mimo', b=4)
  t8 = _find('8', 'cifar100', 'mimo', b=4)
  assert run_lib.workdir('/r', t8, 2) == run_lib.workdir(
      '/r', t1, 2) == ('/r/1/cifar100_wrn28-10_mimo_b4/seed2')
  de = _find('9', 'cifar100', 'deep_ensemble', cutmix=True, n=2, width=10)
  assert run_lib.workdir('/r', de,
                         3) == '/r/1/cifar100_wrn28-10_cutmix_b1/seed3'
  assert tables.owner(de).n_networks == 1


# ----------------------------------------------------------------------------
# run.py
# ----------------------------------------------------------------------------


def _train_lines(text):
  return [l for l in text.splitlines() if ' -m mixmo_jax.main ' in l]


def test_print_mode_one_train_command_per_seed(capsys):
  code = run_lib.main([
      '--table=1', '--dataset=cifar100', '--method=cut_mixmo', '--seeds=0,1,2',
      '--root=/runs'
  ])
  assert code == 0
  out = capsys.readouterr().out
  lines = _train_lines(out)
  assert len(lines) == 4 * 3  # (cutmix 0/1) x (b 2/4) x 3 seeds.
  b4 = [shlex.split(l) for l in lines if 'cut_mixmo+cutmix+b4' in l]
  assert len(b4) == 3
  for k, argv in enumerate(b4):
    assert argv[:3] == ['python', '-m', 'mixmo_jax.main']
    assert '--config=configs/cifar100.py:cut_mixmo+cutmix+b4' in argv
    assert '--config.model.width=10' in argv
    assert f'--config.seed={k}' in argv
    wd = f'/runs/1/cifar100_wrn28-10_cut_mixmo_cutmix_b4/seed{k}'
    assert f'--workdir={wd}' in argv
    assert (f'python -m mixmo_jax.evaluate --workdir={wd} '
            f'--output={wd}/eval.json') in out


def test_ensemble_rows_train_disjoint_members_and_evaluate_together():
  de = _find('5', 'tiny_imagenet', 'deep_ensemble', n=3, width=2)
  trains, singles, ensembles = run_lib.plan([de], '/r')
  base = '/r/5/tiny_imagenet_preact_resnet18-2_vanilla_b1'
  assert [j.output for j in trains] == [f'{base}/seed{s}' for s in range(9)]
  assert len(singles) == 9
  assert [j.argv[3:] for j in ensembles] == [[
      f'--workdir={base}/seed{3 * k}',
      f'--ensemble={base}/seed{3 * k + 1},{base}/seed{3 * k + 2}',
      f'--output={base}/seed{3 * k}/eval_ensemble3.json'
  ] for k in range(3)]


def test_jobs_mode_files(tmp_path):
  jobs = tmp_path / 'jobs.txt'
  code = run_lib.main([
      '--table=6', f'--root={tmp_path}/runs', '--mode=jobs',
      f'--jobs_file={jobs}'
  ])
  assert code == 0
  first = jobs.read_text().splitlines()
  second = (tmp_path / 'jobs_ensembles.txt').read_text().splitlines()
  # N = 1, 2, 3 with 3 repetitions: seeds 0..8 of one config.
  assert len(first) == 9 and len(second) == 3 + 3
  for s, line in enumerate(first):
    train, evaluate = line.split(' && ')
    assert f'--config.seed={s} ' in train and train.endswith(f'/seed{s}')
    assert evaluate.endswith(f'/seed{s}/eval.json')
  assert all('--ensemble=' in line for line in second)


def test_run_mode_skips_done_and_orders(tmp_path, monkeypatch):
  root = tmp_path / 'runs'
  entry = _find('1', 'cifar10', 'vanilla')
  done = root / '1' / 'cifar10_wrn28-10_vanilla_b1' / 'seed1'
  done.mkdir(parents=True)
  (done / 'eval.json').write_text('{}')
  calls = []

  class Result:
    returncode = 0

  monkeypatch.setattr(run_lib.subprocess, 'run',
                      lambda argv, **kw: calls.append(argv) or Result())
  assert run_lib.run_plan([entry], str(root), python='PY') == 0
  kinds = [argv[2] for argv in calls]
  assert kinds == ['mixmo_jax.main'] * 2 + ['mixmo_jax.evaluate'] * 2
  assert all(not any('seed1' in a for a in argv) for argv in calls)


def test_cli_subprocess_and_bad_table():
  proc = subprocess.run([
      sys.executable, '-m', 'experiments.run', '--table=fig9', '--seeds=0',
      '--root=/x'
  ], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert len(_train_lines(proc.stdout)) == 4
  assert run_lib.main(['--table=7']) == 2


# ----------------------------------------------------------------------------
# summarize.py
# ----------------------------------------------------------------------------


def _write_eval(path, top1, top5=0.9, nll_c=0.5, nll=0.6, ece=0.02,
                members=(0.8, 0.81), best=None, num_members=2):
  """An eval.json; best = (top1, nll_c) adds a best_on_test record."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  result = {
      'step': 100,
      'num_members': num_members,
      'ensemble': {
          'top1': top1,
          'top5': top5,
          'nll': nll,
          'ece': ece,
          'brier': 0.2,
          'nll_c': nll_c,
          'ece_c': 0.01,
          'top1_c': top1,
          'temperature': 1.1
      },
      'members': [{
          'top1': m,
          'nll': 1.0
      } for m in members],
      'diversity': {
          'ratio_error': 0.8,
          'disagreement': 0.1
      }
  }
  if best is not None:
    result['best_on_test'] = {
        'epoch': 7,
        'step': 70,
        'top1': best[0],
        'nll': 0.7,
        'nll_c': best[1],
        'ece': 0.03,
        'ece_c': 0.015,
        'note': 'paper protocol'
    }
  with open(path, 'w') as f:
    json.dump(result, f)


def _parse_markdown(text):
  """{section title: [ {column: cell} per row ]}."""
  sections, title, header = {}, None, None
  for line in text.splitlines():
    if line.startswith('## '):
      title, header = line[3:], None
      sections[title] = []
    elif line.startswith('|') and title:
      cells = [c.strip() for c in line.strip('|').split('|')]
      if header is None:
        header = cells
      elif set(line) - set('|-'):
        sections[title].append(dict(zip(header, cells)))
  return sections


def _row(sections, table_prefix, **match):
  (title,) = [t for t in sections if t.startswith(table_prefix)]
  hits = [
      r for r in sections[title] if all(r[k] == v for k, v in match.items())
  ]
  assert len(hits) == 1, (match, hits)
  return hits[0]


@needs_csv
def test_summary_means_and_hand_checked_paper_numbers(tmp_path):
  root = str(tmp_path / 'runs')
  # Table 1 / 8 share runs: Cut-MixMo b=4 CIFAR-100, three seeds.
  # Final checkpoint: tops / nlls; best epoch on test: best_tops / best_nlls.
  tops = [0.851, 0.853, 0.858]
  nlls = [0.52, 0.55, 0.53]
  best_tops = [0.855, 0.856, 0.861]
  best_nlls = [0.51, 0.54, 0.50]
  for k, (t, n) in enumerate(zip(tops, nlls)):
    _write_eval(f'{root}/1/cifar100_wrn28-10_cut_mixmo_b4/seed{k}/eval.json', t,
                nll_c=n, best=(best_tops[k], best_nlls[k]))
  # Table 5, w=3 Cut-MixMo b=4: a single seed.
  _write_eval(
      run_lib.eval_path(root,
                        _find('5', 'tiny_imagenet', 'cut_mixmo', b=4, width=3),
                        0), 0.7)
  # A deep ensemble of 2 (repetition 1 only).
  de = _find('1', 'cifar100', 'deep_ensemble', n=2)
  path = run_lib.eval_path(root, de, 1)
  assert path == f'{root}/1/cifar100_wrn28-10_vanilla_b1/seed2/eval_ensemble2.json'
  _write_eval(path, 0.831)
  # Figure 9 Cut-MixMo M=3: members' mean top-1.
  _write_eval(
      run_lib.eval_path(root, _find('fig9', 'cifar100', 'cut_mixmo', b=2, m=3),
                        0), 0.8, members=(0.79, 0.80, 0.81))

  out = tmp_path / 'summary.md'
  code = summarize.main([
      f'--root={root}', '--table=1,5,8,fig9', f'--output={out}',
      f'--results_csv={RESULTS_CSV}'
  ])
  assert code == 0
  sections = _parse_markdown(out.read_text())

  t1 = _row(sections, 'Table 1', dataset='cifar100', method='cut_mixmo',
            CutMix='-', b='4', N='1')
  # Hand-checked against the paper: Table 1 Cut-MixMo b=4 CIFAR-100 85.40.
  assert t1['Top-1 % paper (best epoch)'] == '85.40'
  assert t1['Top-1 % paper (final, T8)'] == '85.32'
  assert t1['runs'] == '3/3'
  # Beside best-epoch tables: our best_on_test (top-5 has none: final, (f)).
  mean = statistics.mean(100 * t for t in best_tops)
  std = statistics.stdev(100 * t for t in best_tops)
  assert t1['Top-1 % ours (best epoch)'] == f'{mean:.2f} ± {std:.2f}'
  assert t1['NLL_c ours (best epoch)'] == (
      f'{statistics.mean(best_nlls):.3f} ± {statistics.stdev(best_nlls):.3f}')
  assert t1['Top-5 % ours (best epoch)'] == '90.00 ± 0.00 (f)'

  t5 = _row(sections, 'Table 5', network='PreActResNet-18-3',
            method='cut_mixmo', b='4')
  assert t5['Top-1 % paper (best epoch)'] == '70.24'  # Hand-checked.
  assert t5['Top-1 % ours (best epoch)'] == '70.00 (f)'  # No history.
  assert t5['runs'] == '1/3'

  t8 = _row(sections, 'Table 8', dataset='cifar10', method='cut_mixmo',
            CutMix='yes', b='4')
  assert t8['ECE paper (final)'] == '0.0098'  # Paper: 0.98 x 10^-2.
  assert t8['ECE ours (final)'] == '-' and t8['runs'] == '0/3'
  t8_ours = _row(sections, 'Table 8', dataset='cifar100', method='cut_mixmo',
                 CutMix='-', b='4')
  # Beside Table 8 (final epoch): our final checkpoint.
  mean = statistics.mean(100 * t for t in tops)
  std = statistics.stdev(100 * t for t in tops)
  assert t8_ours['Top-1 % ours (final)'] == f'{mean:.2f} ± {std:.2f}'
  assert t8_ours['NLL_c ours (final)'] == (
      f'{statistics.mean(nlls):.3f} ± {statistics.stdev(nlls):.3f}')
  assert t8_ours['ECE ours (final)'] == '0.0200 ± 0.0000'

  de_row = _row(sections, 'Table 1', dataset='cifar100', method='deep_ensemble',
                CutMix='-')
  assert de_row['runs'] == '1/3'
  assert de_row['Top-1 % ours (best epoch)'] == '83.10 (f)'
  assert de_row['Top-1 % paper (best epoch)'] == '83.17'

  fig9 = _row(sections, 'Figure 9', method='cut_mixmo (M=3)')
  assert fig9['member Top-1 % ours (final)'] == '80.00'
  assert fig9['member Top-1 % paper (text)'] == '79.5'

  missing = _row(sections, 'Table 1', dataset='cifar10', method='mixup')
  assert missing['Top-1 % ours (best epoch)'] == '-'
  assert missing['Top-1 % paper (best epoch)'] == '97.07'


def test_mean_std_and_units():
  assert summarize.mean_std([1.0]) == (1.0, None)
  mean, std = summarize.mean_std([1.0, 2.0, 4.0])
  assert mean == pytest.approx(7 / 3)
  assert std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
  result = {
      'ensemble': {
          'top1': 0.5,
          'ece': 0.03
      },
      'members': [{
          'top1': 0.4
      }, {
          'top1': 0.6
      }, {
          'top1': 0.5
      }]
  }
  assert summarize.our_value(result, 'top1') == (pytest.approx(50.0), True)
  assert summarize.our_value(result, 'ece') == (pytest.approx(0.03), True)
  assert summarize.our_value(result, 'member_top1')[0] == pytest.approx(50.0)
  assert summarize.our_value(result, 'nll')[0] is None
  result['best_on_test'] = {'top1': 0.6, 'ece': None}
  assert summarize.our_value(result, 'top1',
                             best=True) == (pytest.approx(60.0), False)
  assert summarize.our_value(result, 'top1') == (pytest.approx(50.0), True)
  assert summarize.our_value(result, 'ece',
                             best=True) == (pytest.approx(0.03), True)


def test_summary_of_runs_matching_no_paper_row(tmp_path):
  root = tmp_path / 'mine'
  _write_eval(
      str(root / 'a' / 'eval.json'), 0.5, nll=1.25, nll_c=1.125, ece=0.0625,
      best=(0.625, 1.0))
  _write_eval(
      str(root / 'b' / 'c' / 'eval_ensemble2.json'), 0.75, num_members=4)
  (root / 'a' / 'config.json').write_text(
      json.dumps({
          'variant': 'mimo+b4',
          'num_members': 2,
          'batch_repetitions': 4,
          'mixing': {
              'method': 'sum'
          }
      }))
  text = summarize.summarize(str(root), results_csv=RESULTS_CSV)
  assert 'No run under' in text and 'Table 1' not in text
  (title,) = _parse_markdown(text)
  rows = {r['run']: r for r in _parse_markdown(text)[title]}
  assert set(rows) == {'a', os.path.join('b', 'c', 'eval_ensemble2.json')}
  a = rows['a']
  assert (a['method'], a['M'], a['b']) == ('mimo+b4', '2', '4')
  assert a['Top-1 % (final)'] == '50.00' and a['NLL (final)'] == '1.250'
  assert a['NLL_c (final)'] == '1.125' and a['ECE (final)'] == '0.0625'
  assert a['ratio-error'] == '0.800'
  assert a['best epoch'] == '7' and a['Top-1 % (best epoch)'] == '62.50'
  assert a['NLL_c (best epoch)'] == '1.000'
  ens = rows[os.path.join('b', 'c', 'eval_ensemble2.json')]
  assert ens['M'] == '4' and ens['method'] == '-' and ens['b'] == '-'
  assert ens['Top-1 % (final)'] == '75.00' and ens['best epoch'] == '-'
  # Nothing at all: says so.
  empty = summarize.summarize(str(tmp_path / 'none'), results_csv=RESULTS_CSV)
  assert 'No eval.json or eval_ensemble<N>.json found' in empty
  # One matching paper row: the paper tables as before.
  _write_eval(f'{root}/1/cifar100_wrn28-10_cut_mixmo_b4/seed0/eval.json', 0.8)
  assert '## Table 1' in summarize.summarize(str(root), ['1'], RESULTS_CSV)


@pytest.mark.parametrize(
    'path,table,dataset,width',
    [('configs/cifar100.py', '1', 'cifar100', 10),
     ('configs/cifar10.py', '1', 'cifar10', 10),
     ('configs/tiny_imagenet.py', '5', 'tiny_imagenet', 1)])
def test_default_config_trains_the_cut_mixmo_b2_row(path, table, dataset,
                                                    width):
  """The README quotes, for each plain command, this row's paper number."""
  from mixmo_jax import configs
  default = configs.load(os.path.join(REPO, path))
  row = _find(table, dataset, 'cut_mixmo', b=2, width=width)
  assert tables.training_key(default) == tables.training_key(
      tables.load_config(row))


@needs_csv
def test_ub_mimo_rows_and_their_summary(tmp_path):
  rows = [r for r in _csv_rows() if r['table'] == 'ub']
  assert {
      (r['dataset'], r['metric']): r['value'] for r in rows
  } == {
      ('cifar10', 'top1'): '96.4',
      ('cifar10', 'nll'): '0.123',
      ('cifar10', 'ece'): '0.010',
      ('cifar100', 'top1'): '82.0',
      ('cifar100', 'nll'): '0.690',
      ('cifar100', 'ece'): '0.022',
      ('cifar100_c', 'top1'): '53.7',
      ('cifar100_c', 'nll'): '2.28',
      ('cifar100_c', 'ece'): '0.129'
  }
  entries = [e for e in tables.ENTRIES if e.table == 'ub']
  assert {e.dataset for e in entries} == {'cifar100', 'cifar10', 'cifar100_c'}
  assert [e.corruptions for e in entries] == [False, False, True]
  for e in entries:
    config = tables.load_config(e)
    assert (config.num_members, config.batch_repetitions) == (3, 4)
    assert config.model.stem == 'mimo' and config.seed == 42
  root = str(tmp_path / 'runs')
  (entry,) = [e for e in entries if e.dataset == 'cifar100']
  _write_eval(
      run_lib.eval_path(root, entry, 0), 0.815, nll=0.7, best=(0.83, 0.6))
  sections = _parse_markdown(summarize.summarize(root, ['ub'], RESULTS_CSV))
  row = _row(sections, 'uncertainty-baselines', dataset='cifar100')
  # Published numbers are final-epoch ones: ours final beside them.
  assert row['Top-1 % paper (final)'] == '82.00'
  assert row['Top-1 % ours (final)'] == '81.50'
  assert row['NLL ours (final)'] == '0.700'
  assert row['NLL paper (final)'] == '0.690'
