"""Console lines and TensorBoard contents of `progress.Reporter`."""
import glob
import io
import os
import sys

import numpy as np
import pytest

from mixmo_jax import configs, progress


def _events(workdir):
  """{tag: [(step, value or plugin name)]} of every event file under workdir."""
  import tensorflow as tf
  tags = {}
  for path in glob.glob(
      os.path.join(workdir, '**', 'events.out.tfevents.*'), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        if plugin in ('scalars', '') and value.HasField('tensor'):
          item = float(tf.make_ndarray(value.tensor))
        else:
          item = plugin
        tags.setdefault(value.tag, []).append((event.step, item))
  return tags


def _fake_step(loss, member_ce, lr=0.1, p=0.5, top1=0.75):
  return {
      'loss': np.float32(loss),
      'cross_entropy': np.float32(loss),
      'l2': np.float32(1.0),
      'learning_rate': np.float32(lr),
      'patch_probability': np.float32(p),
      'train_top1': np.float32(top1),
      progress.MEMBER_CE: np.asarray(member_ce, np.float32)
  }


def test_format_duration():
  assert progress.format_duration(0) == '0:00:00'
  assert progress.format_duration(3 * 3600 + 62.4) == '3:01:02'
  assert progress.format_duration(float('inf')) == '?'


def test_scalar_eval_metrics_drop_bookkeeping():
  record = {
      'step': 10,
      'epoch': 1,
      'num_examples': 100,
      'num_members': 2,
      'num_classes': 10,
      'ensemble_mode': 'logits',
      'ensemble': {
          'top1': 0.9,
          'nll': 0.3
      },
      'members': [{
          'top1': 0.8
      }, {
          'top1': 0.85
      }],
      'calibration': {
          'seed': 0,
          'split_sizes': [50, 50],
          'temperatures': [1.2, 1.3],
          'separable': [False, False]
      }
  }
  scalars = progress.scalar_eval_metrics(record)
  assert scalars == {
      'eval/ensemble/top1': 0.9,
      'eval/ensemble/nll': 0.3,
      'eval/members/0/top1': 0.8,
      'eval/members/1/top1': 0.85,
      'eval/calibration/temperatures/0': 1.2,
      'eval/calibration/temperatures/1': 1.3
  }


def test_hparams_flatten_nested_config():
  config = configs.get('digits:mimo')
  flat = progress.hparams(config)
  assert flat['num_members'] == config.num_members
  assert flat['optimizer.base_learning_rate'] == (
      config.optimizer.base_learning_rate)
  assert flat['optimizer.decay_epochs'] == str(config.optimizer.decay_epochs)
  assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_console_lines_and_member_scalars(tmp_path):
  config = configs.get('digits:mimo')
  config.num_epochs = 4
  out = io.StringIO()
  reporter = progress.Reporter(
      str(tmp_path), total_steps=40, config=config, steps_per_epoch=10,
      stream=out, images=False)
  # Planted values: member 0 always 1.0, member 1 2.0 / 4.0 alternately.
  for step in range(1, 11):
    reporter.step(step, _fake_step(3.0, [1.0, 2.0 if step % 2 else 4.0]),
                  data_wait=0.0)
  reporter.flush(10, 'none')
  record = {
      'step': 10,
      'epoch': 1,
      'ensemble': {
          'top1': 0.5,
          'nll': 1.5,
          'nll_c': 1.4
      },
      'members': [{
          'top1': 0.4,
          'nll': 1.7
      }, {
          'top1': 0.45,
          'nll': 1.6
      }]
  }
  reporter.evaluation(record)
  reporter.close()
  lines = out.getvalue().splitlines()
  assert lines[0].startswith('step 1/40 | loss 3.0000 | first step')
  train = lines[1]
  # Steps 1..10: member 1 has five 2.0 and five 4.0 -> 3.0; mean of 1 and 3.
  assert train.startswith('epoch 1/4 step 10/40 | train ce 2.0000 '
                          '(members 1.000 3.000) top1 0.750 | lr 0.1 p 0.5')
  assert 'steps/s' in train and 'img/s' in train and 'data-wait' in train
  assert 'ETA ' in train
  assert lines[2] == ('eval epoch 1 step 10 | ensemble top1 0.5000 nll 1.5000 '
                      'nll_c 1.4000 | members top1 0.4000 0.4500 nll 1.7000 '
                      '1.6000')
  assert any(line.startswith('final: epoch 1 step 10') for line in lines)
  assert any(str(tmp_path) in line and 'tensorboard' in line for line in lines)
  tags = _events(str(tmp_path))
  assert tags[f'train/{progress.MEMBER_CE}/0'] == [(10, 1.0)]
  assert tags[f'train/{progress.MEMBER_CE}/1'] == [(10, 3.0)]
  assert tags['train/learning_rate'] == [(10, pytest.approx(0.1))]
  assert tags['eval/ensemble/nll_c'] == [(10, pytest.approx(1.4))]


def test_non_finite_loss_raises_with_last_good(tmp_path):
  reporter = progress.Reporter(
      str(tmp_path), total_steps=10, stream=io.StringIO(), images=False)
  reporter.step(1, _fake_step(1.0, [1.0]))
  reporter.step(2, _fake_step(float('nan'), [1.0]))
  with pytest.raises(progress.NonFiniteLossError, match='step 2.*step 0 here'):
    reporter.flush(2, 'step 0 here')


def test_member_ce_absent_falls_back_to_mixmo_loss(tmp_path):
  out = io.StringIO()
  reporter = progress.Reporter(
      str(tmp_path), total_steps=4, stream=out, images=False)
  step = _fake_step(2.5, [1.0])
  del step[progress.MEMBER_CE]
  reporter.step(1, step)
  reporter.step(2, step)
  reporter.flush(2, 'none')
  reporter.abort()
  assert 'train loss (mixmo ce) 2.5000' in out.getvalue()


def test_tiny_run_event_files(digits_workdir):
  """After a real run: hparams, train and eval scalars, figures; no
  bookkeeping scalars."""
  tags = _events(digits_workdir)
  assert any(v == 'hparams' for vals in tags.values() for _, v in vals)
  for tag in ('train/loss', 'train/learning_rate', 'train/patch_probability',
              'train/steps_per_second', 'eval/ensemble/top1',
              'eval/ensemble/nll_c', 'eval/members/1/top1'):
    assert tag in tags, (tag, sorted(tags))
  assert [s for s, _ in tags['eval/ensemble/top1']] == [10, 20]
  for tag in tags:
    parts = set(tag.split('/'))
    assert not parts & {
        'seed', 'split_sizes', 'num_classes', 'num_examples', 'num_members'
    }, tag
  assert tags['eval/reliability'][0][1] == 'images'
  assert tags['eval/member_vs_ensemble'][0][1] == 'images'


def test_training_curves_read_train_scalars(digits_workdir, tmp_path):
  from mixmo_jax.evaluation import curves
  tags = ('train/cross_entropy', 'train/learning_rate')
  scalars = curves.train_scalars(digits_workdir, tags)
  assert set(scalars) == set(tags)
  steps, values = scalars['train/cross_entropy']
  assert steps == sorted(steps) and steps[-1] == 20 and 10 in steps
  assert all(np.isfinite(values))
  path = curves.training_curves(digits_workdir, tmp_path / 'curves.png')
  assert os.path.getsize(path) > 0


def test_quiet_logs_drop_only_closed_loop_reports(monkeypatch):
  """Unraisable exceptions from objects that really fail in `__del__`: the
  'Event loop is closed' report tensorstore leaves after a failed write is
  dropped; any other reaches the previous hook."""
  from mixmo_jax import cli
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  cli.quiet_orbax_logs()
  assert sys.unraisablehook is not seen.append

  class Fails:

    def __init__(self, error):
      self.error = error

    def __del__(self):
      raise self.error

  Fails(RuntimeError('Event loop is closed'))
  Fails(RuntimeError('something else'))
  Fails(ValueError('Event loop is closed'))
  assert [(type(u.exc_value), str(u.exc_value)) for u in seen
         ] == [(RuntimeError, 'something else'),
               (ValueError, 'Event loop is closed')]
  cli.quiet_orbax_logs()  # Idempotent: not chained to itself.
  assert cli._chained_unraisable_hook == seen.append


def test_quiet_logs_drop_only_orbax_abandoned_tasks(tmp_path, caplog,
                                                    monkeypatch):
  """asyncio's "Task exception was never retrieved" for real tasks that
  failed unawaited: one whose coroutine lives under an 'orbax' folder is
  dropped, another is still reported."""
  import asyncio
  import gc
  from mixmo_jax import cli
  for folder in ('orbax', 'other'):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / f'{folder}_writer.py').write_text(
        'async def write():\n  raise ValueError("RESOURCE_EXHAUSTED")\n')
  monkeypatch.syspath_prepend(str(tmp_path / 'orbax'))
  monkeypatch.syspath_prepend(str(tmp_path / 'other'))
  import orbax_writer
  import other_writer
  cli.quiet_orbax_logs()

  async def abandon(coroutine):
    asyncio.ensure_future(coroutine)
    await asyncio.sleep(0.01)  # It fails; nobody awaits it.

  with caplog.at_level('ERROR', logger='asyncio'):
    for writer in (orbax_writer, other_writer):
      loop = asyncio.new_event_loop()
      loop.run_until_complete(abandon(writer.write()))
      loop.close()
      gc.collect()  # The task is collected: asyncio reports it now.
  reports = [
      r.getMessage()
      for r in caplog.records
      if r.getMessage().startswith('Task exception was never')
  ]
  assert len(reports) == 1 and 'other_writer' in reports[0], reports
