"""What a run reports: train metrics, evaluations, progress, to the console
and TensorBoard (`events.EventWriter`; only process 0 prints and writes
event files).

Console (stdout, process 0):
  * a line at the first step (compile time) and then every
    `log_every_steps` and at each epoch end:
      epoch 3/10 step 150/500 | train ce 0.512 (members 0.49 0.53) top1 0.861
      | lr 0.1 p 0.5 | 12.3 steps/s 1574 img/s data-wait 3% | ETA 0:01:23
    `train ce` is the members' cross-entropy averaged over the members
    (step metric 'member_cross_entropy' [M] when the train step returns it,
    else the weighted MixMo loss 'cross_entropy' of eq. 4), `img/s` counts
    the `batch_size` images each step feeds the network, `data-wait` is the
    share of the interval spent waiting for host batches;
  * one line per evaluation (ensemble and member top-1, NLL, NLL_c);
  * a summary at the end (best and final evaluation, where the files are).
  When stdout is a terminal a tqdm progress bar runs under these lines.

TensorBoard: the resolved config as hparams, train/* scalars (loss, cross
entropy, per-member cross-entropy, top-1, learning rate, p, throughput),
eval/* scalars without bookkeeping entries (BOOKKEEPING), and the reliability
and member-vs-ensemble figures as images at each evaluation.
"""
import logging as pylogging
import os
import sys
import tempfile
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from mixmo_jax import events
from mixmo_jax.evaluation import metrics

# Flattened eval-record entries that are not results (never TensorBoard
# scalars): matched against every '/'-separated part of the key.
BOOKKEEPING = frozenset({
    'step', 'epoch', 'seed', 'split_sizes', 'num_classes', 'num_examples',
    'num_members'
})
MEMBER_CE = 'member_cross_entropy'


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def setup_logging() -> None:
  """Quiet console for a training run (idempotent; `main` and `train`).

  TensorFlow / oneDNN / libtpu C++ INFO and WARNING lines are silenced
  through TF_CPP_MIN_LOG_LEVEL=2 and TF_ENABLE_ONEDNN_OPTS=0 (unless the
  user set them; `import mixmo_jax` sets them too, since they only act
  before TensorFlow is imported), orbax's INFO chatter is filtered and absl
  logs at INFO.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  from mixmo_jax import cli
  cli.quiet_orbax_logs()
  # At least INFO; --verbosity=1 also logs the parameter table (training).
  logging.set_verbosity(max(logging.get_verbosity(), logging.INFO))
  # "Unable to initialize backend 'tpu'" and similar probes at INFO.
  pylogging.getLogger('jax._src.xla_bridge').setLevel(pylogging.WARNING)


def format_duration(seconds: float) -> str:
  """h:mm:ss (hours unbounded); '?' for a non-finite value."""
  if not np.isfinite(seconds):
    return '?'
  seconds = int(round(max(seconds, 0.0)))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def scalar_eval_metrics(record: dict[str, Any]) -> dict[str, float]:
  """The eval/* TensorBoard scalars of an evaluation record (no BOOKKEEPING)."""
  return {
      f'eval/{k}': v
      for k, v in metrics.flatten_metrics(record).items()
      if isinstance(v, (int,
                        float)) and not BOOKKEEPING.intersection(k.split('/'))
  }


def hparams(config) -> dict[str, Any]:
  """The config flattened to {'optimizer.decay_epochs': '(3, 4)', ...}:
  numbers, str and bool as they are, everything else as its str."""
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if hasattr(value, 'items'):
        walk(value, name + '.')
      elif isinstance(value, (bool, int, float, str)):
        out[name] = value
      else:
        out[name] = str(value)

  walk(config, '')
  return out


def _figure_images(record, member_logits, labels) -> dict[str, np.ndarray]:
  """The evaluation figures as uint8 [1, H, W, 3] arrays (TensorBoard)."""
  from PIL import Image
  from mixmo_jax.evaluation import plots
  images = {}
  with tempfile.TemporaryDirectory() as tmp:
    paths = {
        'eval/member_vs_ensemble':
            plots.member_vs_ensemble(record, os.path.join(tmp, 'members.png'))
    }
    if member_logits is not None:
      lp = np.asarray(
          metrics.ensemble_log_probs(
              np.asarray(member_logits, np.float32),
              record.get('ensemble_mode', 'logits')))
      paths['eval/reliability'] = plots.reliability_diagram(
          lp, labels, os.path.join(tmp, 'reliability.png'),
          title=f'step {record["step"]}')
    for name, path in paths.items():
      with Image.open(path) as image:
        images[name] = np.asarray(image.convert('RGB'))[None]
  return images


def _fmt(value, spec='.4f'):
  return '-' if value is None else format(value, spec)


def format_evaluation(record: dict[str, Any]) -> str:
  """One console line of an evaluation record."""
  ens = record['ensemble']
  members = record.get('members', [])
  return (f'eval epoch {record["epoch"]} step {record["step"]} | ensemble '
          f'top1 {_fmt(ens.get("top1"))} nll {_fmt(ens.get("nll"))} nll_c '
          f'{_fmt(ens.get("nll_c"))} | members top1 ' +
          ' '.join(_fmt(m.get('top1')) for m in members) + ' nll ' +
          ' '.join(_fmt(m.get('nll')) for m in members))


class Reporter:
  """Collects the step metrics; prints and writes them every flush.

  Args:
    workdir: the run's folder (TensorBoard event files).
    total_steps: the run's number of steps (for the progress and ETA).
    config: the run's config (hparams, batch size, epochs); optional.
    steps_per_epoch: for the epoch column; optional.
    start_step: the step training starts (resumes) from.
    stream: where console lines go (default sys.stdout).
    progress_bar: None: a tqdm bar when `stream` is a terminal.
    images: write the evaluation figures to TensorBoard.
  """

  def __init__(self, workdir: str, total_steps: int, config=None,
               steps_per_epoch: int | None = None, start_step: int = 0,
               stream=None, progress_bar: bool | None = None,
               images: bool = True):
    self.workdir = workdir
    self.total = total_steps
    self.spe = steps_per_epoch
    self.config = config
    self.lead = jax.process_index() == 0
    # Event files only, nothing on processes > 0.
    self.writer = events.EventWriter(workdir if self.lead else None)
    self.stream = sys.stdout if stream is None else stream
    self.images = images
    self.pending: list[dict[str, Any]] = []
    self.waits: list[float] = []
    self.evaluations: list[dict[str, Any]] = []
    self.start = start_step
    self.last_step = start_step
    self.last_time = time.perf_counter()
    if progress_bar is None:
      progress_bar = bool(getattr(self.stream, 'isatty', lambda: False)())
    self.bar = None
    if self.lead and progress_bar:
      import tqdm
      self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                           file=self.stream, dynamic_ncols=True, leave=False)
    if config is not None and self.lead:
      self.writer.write_hparams(hparams(config))

  def _print(self, line: str) -> None:
    if not self.lead:
      return
    if self.bar is not None:
      self.bar.write(line, file=self.stream)
    else:
      print(line, file=self.stream, flush=True)

  def step(self, step: int, step_metrics: dict[str, Any],
           data_wait: float = 0.0) -> None:
    """Records the (device) metrics of the step that ends at `step`.

    `data_wait` is the seconds the loop waited for this step's host batch
    (for the data-wait fraction).
    """
    self.pending.append(step_metrics)
    self.waits.append(float(data_wait))
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
    if step == self.start + 1:  # A first line as soon as the step ran.
      loss = float(jax.device_get(step_metrics['loss']))
      now = time.perf_counter()
      self._print(f'step {step}/{self.total} | loss {loss:.4f} | first step '
                  f'(compiling) {now - self.last_time:.1f} s')
      self.last_step, self.last_time = step, now  # Rates exclude compiling.
      self.waits.clear()

  def flush(self, step: int, last_good: str) -> None:
    """Writes and prints the mean train metrics of the pending steps.

    Raises:
      NonFiniteLossError: a pending loss is NaN or infinite (`last_good`
        describes the newest checkpoint, for the message).
    """
    if not self.pending:
      return
    host = jax.device_get(self.pending)
    now = time.perf_counter()
    first = step - len(host)
    losses = np.array([m['loss'] for m in host])
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      raise NonFiniteLossError(
          f'non-finite loss {losses[bad[0]]} at step {first + bad[0] + 1}; '
          f'training stopped, nothing saved after it; last good checkpoint: '
          f'{last_good}')
    elapsed = max(now - self.last_time, 1e-9)
    rate = max(step - self.last_step, 1) / elapsed
    wait = min(sum(self.waits) / elapsed, 1.0)
    scalars = {}
    member_ce = None
    for key in host[0]:
      values = np.asarray([np.asarray(m[key], np.float64) for m in host])
      if key == MEMBER_CE:
        member_ce = values.mean(axis=0).reshape(-1)
        for i, v in enumerate(member_ce):
          scalars[f'train/{MEMBER_CE}/{i}'] = float(v)
      elif values.ndim == 1:
        scalars[f'train/{key}'] = float(values.mean())
    batch = self.config.batch_size if self.config is not None else None
    scalars['train/steps_per_second'] = rate
    if batch:
      scalars['train/images_per_second'] = rate * batch
    scalars['train/data_wait_fraction'] = wait
    self.writer.write_scalars(step, scalars)
    self._print(self._train_line(step, scalars, member_ce, rate, wait))
    if self.bar is not None:
      self.bar.set_postfix_str(f'loss {scalars.get("train/loss", 0.0):.3f}',
                               refresh=False)
    self.pending.clear()
    self.waits.clear()
    self.last_step, self.last_time = step, now

  def _train_line(self, step, scalars, member_ce, rate, wait) -> str:
    parts = []
    if self.spe:
      epochs = self.config.num_epochs if self.config is not None else '?'
      parts.append(f'epoch {-(-step // self.spe)}/{epochs} '
                   f'step {step}/{self.total}')
    else:
      parts.append(f'step {step}/{self.total}')
    train = []
    if member_ce is not None:
      train.append(f'train ce {member_ce.mean():.4f} (members ' +
                   ' '.join(f'{v:.3f}' for v in member_ce) + ')')
    elif 'train/cross_entropy' in scalars:
      train.append(f'train loss (mixmo ce) '
                   f'{scalars["train/cross_entropy"]:.4f}')
    if 'train/train_top1' in scalars:
      train.append(f'top1 {scalars["train/train_top1"]:.3f}')
    if train:
      parts.append(' '.join(train))
    sched = []
    if 'train/learning_rate' in scalars:
      sched.append(f'lr {scalars["train/learning_rate"]:.4g}')
    if 'train/patch_probability' in scalars:
      sched.append(f'p {scalars["train/patch_probability"]:.3g}')
    if sched:
      parts.append(' '.join(sched))
    speed = f'{rate:.2f} steps/s'
    if 'train/images_per_second' in scalars:
      speed += f' {scalars["train/images_per_second"]:.0f} img/s'
    parts.append(f'{speed} data-wait {100 * wait:.0f}%')
    parts.append(f'ETA {format_duration((self.total - step) / rate)}')
    return ' | '.join(parts)

  def evaluation(self, record: dict[str, Any], member_logits=None,
                 labels=None) -> None:
    """Writes an evaluation record (`training.evaluate_epoch`'s) to
    TensorBoard and the console; with the [N, M, C] `member_logits` and [N]
    `labels` also the reliability diagram (the member-vs-ensemble figure
    needs only the record)."""
    self.evaluations.append(record)
    self.writer.write_scalars(record['step'], scalar_eval_metrics(record))
    if self.images and self.lead:
      try:
        self.writer.write_images(record['step'],
                                 _figure_images(record, member_logits, labels))
      except Exception as e:
        logging.warning('Evaluation figures not written to TensorBoard: %s', e)
    self._print(format_evaluation(record))

  def summary(self, history: list[dict[str, Any]] | None = None) -> str:
    """The end-of-run lines: best and final evaluation, where files are."""
    records = [
        r for r in (history if history is not None else self.evaluations)
        if 'ensemble' in r
    ]
    lines = [f'done: {self.last_step}/{self.total} steps']
    if records:
      best = max(records, key=lambda r: r['ensemble'].get('top1') or -1.0)
      final = records[-1]
      for name, r in (('final', final), ('best (on test: optimistic)', best)):
        ens = r['ensemble']
        lines.append(f'{name}: epoch {r["epoch"]} step {r["step"]} ensemble '
                     f'top1 {_fmt(ens.get("top1"))} nll '
                     f'{_fmt(ens.get("nll"))} nll_c '
                     f'{_fmt(ens.get("nll_c"))}')
    lines.append(f'files: {self.workdir} (config.json, eval_history.jsonl, '
                 f'checkpoints/); TensorBoard: tensorboard --logdir='
                 f'{self.workdir}; test metrics: python -m mixmo_jax.evaluate '
                 f'--workdir={self.workdir}')
    return '\n'.join(lines)

  def abort(self, upload: bool = True) -> None:
    """Closes the progress bar and the event file without the summary (a
    run that failed; `upload`: see `events.EventWriter.close`)."""
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    self.writer.close(upload=upload)

  def close(self, history: list[dict[str, Any]] | None = None) -> None:
    """Flushes the writers and prints the summary (`history`: every
    evaluation record of the run, also those before a resume)."""
    self.abort()
    self._print(self.summary(history))
