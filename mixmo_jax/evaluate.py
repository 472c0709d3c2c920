"""Evaluate trained runs: eval.json, ensembles of runs, CIFAR-C, plots.

  python -m mixmo_jax.evaluate --workdir=DIR [--step=N|best]
      [--ensemble=DIR2,DIR3]
      [--corruptions=CIFAR_C_DIR] [--ood=NAME[,NAME]] [--plots] [--output=PATH]
      [--eval_batch_size=B]

Each run is read from its workdir alone (config.json and the verified
checkpoint; no --config flag). The whole test set is predicted (the last
batch padded and masked out, `inference.predict_with_config`), giving the
members' logits [N, M, C]; with --ensemble the members of all runs are
concatenated along the member axis, [N, sum_r M_r, C], so a deep ensemble
of M = 1 networks and an ensemble of N MixMo networks (paper section 4.6)
average all N x M predictions. The metrics (`metrics.evaluation_metrics`:
top-1/5, NLL, ECE, Brier, temperature-scaled NLL_c/ECE_c, member accuracies,
diversity) use the first run's `evaluation.ensemble` ('logits' | 'probs') and
`evaluation.calibration_seed`.

eval.json (written to the first workdir, or --output) holds
metrics only, no timings or dates, written with sorted keys, so two identical
evaluations give byte-identical files:

  step                the evaluated checkpoint (the first run's for ensembles)
  steps, members_per_run
                      (ensembles only) per run, in --workdir, --ensemble order
  workdirs            absolute paths of the runs
  num_params          the parameters of the evaluated network(s), summed over
                      runs
  ensemble            {every registered metric (evaluation/registry.py: top1,
                       top5, nll, ece, brier, auc, tace_mixmo (the official
                       MixMo code's TACE), tace_um (uncertainty-metrics'),
                       ...), nll_c, ece_c, top1_c, brier_c, temperature}
  members             [{top1, nll}, ...]; diversity {ratio_error,
                      disagreement, average_kl, cosine_similarity}
  calibration, num_examples, num_members, num_classes, ensemble_mode
  best_on_test        (single run with eval_history.jsonl) {epoch, step, top1,
                       nll, nll_c, ece, ece_c, note}: the epoch of best test
                       top-1, latest on ties (the paper's protocol, Appendix
                       6.5, an optimistic number); the
                       headline metrics above are the evaluated checkpoint's
  corruptions         (with --corruptions) CIFAR-10-C / CIFAR-100-C results,
                      in eval.json itself; see `evaluate_corruptions`
  ood                 (with --ood) {name: {auroc_msp, aupr_in_msp, ...}}: OOD
                      detection, see `evaluation/ood.py`

--plots writes reliability.png (ensemble, before temperature scaling),
member_vs_ensemble.png and, for a single run with eval_history.jsonl,
training_curves.png in the folder of eval.json; `--plot_formats=png,pdf`
adds a PDF (or svg) copy of each beside its PNG.

Accuracies and ECE are fractions in [0, 1]. Exit codes: 0 success; 2 a
missing or unusable input (workdir, config.json, checkpoint or step, runs
that do not share a test set, a malformed corruption folder), with a
one-line `error: ...` on stderr; 1 when the dataset itself is unavailable.
Evaluation runs on the local devices of one process (any count: the eval
batch size is rounded up to a multiple of it).
"""
import os
import sys
from typing import Any
from collections.abc import Sequence

from absl import app, flags
import jax
import numpy as np

from mixmo_jax import checkpointing, cli, data, sharding, storage
from mixmo_jax import workdir as wd
from mixmo_jax.data import cifar_c
from mixmo_jax.evaluation import corruptions, metrics, report
from mixmo_jax.evaluation import ood as ood_lib
from mixmo_jax.evaluation import runs as runs_lib
from mixmo_jax.evaluation.runs import EvaluationError

EXIT_USAGE, EXIT_DATA = 2, 1


def run_evaluation(
    workdirs: Sequence[str], step: checkpointing.Step = None, *,
    corruptions_dir: str | None = None, eval_batch_size: int | None = None,
    ood: Sequence[str] = ()
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """`evaluate_workdirs`, also returning the test logits [N, sum M, C] and
  labels [N] (for plots)."""
  workdirs = list(workdirs)
  if corruptions_dir is not None:  # A bad folder fails before any restore.
    config = runs_lib.read_configs(workdirs)[0]
    cifar_c.check_folder(corruptions_dir, config.num_classes, config.image_size,
                         cifar_c.find_corruptions(corruptions_dir)[0])
  if ood:  # Bad names fail before any restore.
    ood_lib.check_names(ood, runs_lib.read_configs(workdirs)[0])
  runs = runs_lib.load_runs(workdirs, step)
  mesh = sharding.local_mesh()
  result, logits, labels = report.evaluate_test_set(runs, mesh, eval_batch_size)
  if corruptions_dir is not None:
    result['corruptions'] = corruptions.evaluate_corruptions(
        runs, corruptions_dir, mesh, eval_batch_size)
  if ood:
    result['ood'] = ood_lib.evaluate_ood(runs, ood, mesh, logits,
                                         eval_batch_size)
  return result, logits, labels


def evaluate_workdirs(
    workdirs: Sequence[str], step: checkpointing.Step = None, *,
    corruptions_dir: str | None = None, eval_batch_size: int | None = None,
    ood: Sequence[str] = ()) -> dict[str, Any]:
  """Evaluates one run, or the ensemble of several, on the whole test set.

  Args:
    workdirs: training workdirs (the first one's evaluation settings are used).
    step: checkpoint step of every run, or 'best' (each run's checkpoint of
      best test top-1, `checkpointing.BEST`); default: each run's latest.
    corruptions_dir: optional CIFAR-10-C / CIFAR-100-C folder.
    eval_batch_size: override of config.eval_batch_size (rounded up to a
      multiple of the local device count).
    ood: registered dataset names to detect as out-of-distribution
      (`ood_lib.evaluate_ood`).

  Returns:
    the eval.json dict (see the module docstring); nothing is written.
  """
  return run_evaluation(workdirs, step, corruptions_dir=corruptions_dir,
                        eval_batch_size=eval_batch_size, ood=ood)[0]


def output_path(output: str | None, workdir: str) -> str:
  """--output as a file path; a folder (existing, or ending in '/') gets
  eval.json inside; default WORKDIR/eval.json."""
  if not output:
    return wd.path(workdir, wd.EVAL)
  if output.endswith('/') or storage.isdir(output):
    return storage.join(output, wd.EVAL)
  return output


def write_plots(result: dict[str, Any], logits: np.ndarray, labels: np.ndarray,
                out_dir: str, history_workdir: str | None = None) -> list[str]:
  """reliability.png, member_vs_ensemble.png and (when `history_workdir` has
  an eval_history.jsonl) training_curves.png in `out_dir`."""
  # matplotlib only when asked for.
  from mixmo_jax.evaluation import curves, plots
  log_probs = metrics.ensemble_log_probs(
      np.asarray(logits, np.float64), result['ensemble_mode'])
  paths = plots.write_evaluation_plots(result, log_probs, labels, out_dir)
  if history_workdir is not None:
    if storage.isfile(wd.path(history_workdir, wd.HISTORY)):
      paths.append(
          curves.training_curves(history_workdir,
                                 os.path.join(out_dir, 'training_curves.png')))
  return paths


# ---------------------------------------------------------------- CLI


def define_flags() -> None:
  """Defines the CLI flags (only when run as a script: importing the module
  as a library defines none, so it coexists with `mixmo_jax.main`)."""
  flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.')
  flags.DEFINE_string(
      'step', None, 'Checkpoint step of every run: a number, '
      'or best (the checkpoint of best ensemble test top-1, '
      'kept by keep_best_checkpoint); default: the latest.')
  flags.DEFINE_list(
      'ensemble', [], 'More workdirs whose members join the '
      'ensemble (comma separated).')
  flags.DEFINE_string(
      'corruptions', None, 'CIFAR-10-C / CIFAR-100-C folder '
      '(<corruption>.npy + labels.npy).')
  flags.DEFINE_list(
      'ood', [], 'Registered datasets to detect as out-of-'
      'distribution, e.g. svhn_cropped,cifar10 (their test '
      'split); writes eval.json["ood"][name].')
  flags.DEFINE_bool('plots', False, 'Write PNG figures next to eval.json.')
  flags.DEFINE_list(
      'plot_formats', ['png'], 'With --plots: formats of each '
      'figure, png plus pdf and/or svg (e.g. png,pdf).')
  flags.DEFINE_string(
      'output', None, 'eval.json path (or folder); default '
      'WORKDIR/eval.json.')
  flags.DEFINE_integer('eval_batch_size', None, 'Override of '
                       'config.eval_batch_size.')


def parse_step(value: str | None) -> checkpointing.Step:
  """--step as an int, `checkpointing.BEST` or None; anything else exits
  with one line."""
  if value is None or value == checkpointing.BEST:
    return value
  if value.isdigit():
    return int(value)
  cli.fail(f'--step={value}: must be a checkpoint step (an integer >= 0) or '
           f'{checkpointing.BEST}')


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:
    cli.fail(f'{type(e).__name__}: {e}')


def main(argv):
  cli.quiet_orbax_logs()
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}')
  args = flags.FLAGS
  if not args.workdir:
    cli.fail('--workdir is required')
  cli.start_backend()
  if args.plots:  # Checked before any work; matplotlib only when asked for.
    from mixmo_jax.evaluation import plots
    try:
      extra = plots.check_formats(args.plot_formats)
    except ValueError as e:
      cli.fail(f'--plot_formats={",".join(args.plot_formats)}: {e}')
  workdirs = [args.workdir] + [w for w in args.ensemble if w]
  for workdir in workdirs:
    if wd.url_problem(workdir):
      cli.fail(wd.url_problem(workdir))
  step = parse_step(args.step)
  if args.eval_batch_size is not None and args.eval_batch_size < 1:
    cli.fail(f'--eval_batch_size={args.eval_batch_size}: must be an integer '
             '>= 1')
  path = output_path(args.output, workdirs[0])
  owned = wd.owned_input(workdirs, path)
  if owned is not None:  # Before any work: never replace what runs read.
    cli.fail(f'--output={args.output}: {path} would overwrite {owned}, '
             'which the workdir reads; write eval.json elsewhere')
  try:
    result, logits, labels = run_evaluation(
        workdirs, step, corruptions_dir=args.corruptions,
        eval_batch_size=args.eval_batch_size, ood=[n for n in args.ood if n])
  except (EvaluationError, cifar_c.CorruptionDataError,
          checkpointing.CheckpointError) as e:
    cli.fail(e)
  except data.DatasetUnavailableError as e:
    cli.fail(e, EXIT_DATA)
  if jax.process_index() == 0:
    try:
      wd.write_json(result, path)
    except wd.WorkdirError as e:  # E.g. disk full: no partial file is left.
      cli.fail(e, EXIT_DATA)
    print(report.format_table(result))
    print(f'wrote {path}')
    if args.plots:
      history = workdirs[0] if len(workdirs) == 1 else None
      with plots.extra_formats(extra):
        for png in write_plots(result, logits, labels,
                               os.path.dirname(storage.absolute(path)),
                               history):
          print(f'wrote {png}' +
                ''.join(f' and {os.path.splitext(png)[0]}.{e}' for e in extra))
  # Done, every file closed: exit now, as cli.fail does, so that what a
  # failed restore of a skipped checkpoint left in tensorstore's event loop
  # cannot print "Event loop is closed" tracebacks at interpreter shutdown.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
