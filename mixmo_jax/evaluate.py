"""Evaluate trained runs: eval.json, ensembles of runs, CIFAR-C, plots.

  python -m mixmo_jax.evaluate --workdir=DIR [--step=N] [--ensemble=DIR2,DIR3]
      [--corruptions=CIFAR_C_DIR] [--plots] [--output=PATH]
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

eval.json (DESIGN 2b; written to the first workdir, or --output) holds
metrics only, no timings or dates, written with sorted keys, so two identical
evaluations give byte-identical files:

  step                the evaluated checkpoint (the first run's for ensembles)
  steps, members_per_run
                      (ensembles only) per run, in --workdir, --ensemble order
  workdirs            absolute paths of the runs
  ensemble            {top1, top5, nll, ece, brier, nll_c, ece_c, top1_c,
                       brier_c, temperature}
  members             [{top1, nll}, ...]; diversity {ratio_error, disagreement}
  calibration, num_examples, num_members, num_classes, ensemble_mode
  best_epoch_on_test  (single run with eval_history.jsonl) {epoch, step, top1,
                       note}: the epoch of best test top-1 (the paper's
                       protocol, Appendix 6.5, an optimistic number); the
                       headline metrics above are the evaluated checkpoint's
  corruptions         (with --corruptions) CIFAR-10-C / CIFAR-100-C results,
                      in eval.json itself; see `evaluate_corruptions`

--plots writes reliability.png (ensemble, before temperature scaling),
member_vs_ensemble.png and, for a single run with eval_history.jsonl,
training_curves.png in the folder of eval.json.

Accuracies and ECE are fractions in [0, 1]. Exit codes: 0 success; 2 a
missing or unusable input (workdir, config.json, checkpoint or step, runs
that do not share a test set, a malformed corruption folder), with a
one-line `error: ...` on stderr; 1 when the dataset itself is unavailable.
Evaluation runs on the local devices of one process (any count: the eval
batch size is rounded up to a multiple of it).
"""
import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

from mixmo_jax import (checkpointing, cli, corruptions, inference,
                       input_pipeline, metrics, models, sharding)

EVAL_FILE = 'eval.json'
HISTORY_FILE = 'eval_history.jsonl'  # Written by trainer.py.
CONFIG_FILE = 'config.json'
# Fields every run of an ensemble must share (same test set, same classes).
SHARED_FIELDS = ('dataset', 'num_classes', 'image_size')
BEST_EPOCH_NOTE = ('paper protocol (Appendix 6.5): epoch of best test top-1; '
                   'optimistic')
CORRUPTION_METRICS = ('top1', 'top5', 'nll', 'ece')
CORRUPTION_NOTES = {
    'nll': 'without temperature scaling (out-of-domain, paper Appendix 6.4)',
    'per_corruption': 'per severity "1".."5" and "mean" over the 5 severities',
    'per_severity': 'mean over the evaluated corruptions',
    'mean': 'unweighted mean over all (corruption, severity) cells: the '
            'usual CIFAR-C summary',
    'pooled': 'metrics of all corrupted images taken together; top1, top5 '
              'and nll equal "mean" when every cell has the same number of '
              'images, ECE does not',
}
EXIT_USAGE, EXIT_DATA = 2, 1


class EvaluationError(ValueError):
  """An input of the evaluation is missing or unusable (one-line message)."""


@dataclasses.dataclass
class Run:
  """A restored run: its workdir, config (from config.json), variables, step."""
  workdir: str
  config: ml_collections.ConfigDict
  variables: Any
  step: int


# ---------------------------------------------------------------- loading


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """config.json of a workdir, after checking it has checkpoints too.

  Raises:
    EvaluationError: no such folder, no config.json, or no checkpoint.
  """
  if not os.path.isdir(workdir):
    raise EvaluationError(f'workdir {workdir} does not exist')
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise EvaluationError(f'{path} is missing: not a training workdir')
  ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir) or not any(
      name.isdigit() for name in os.listdir(ckpt_dir)):
    raise EvaluationError(f'no checkpoint in {ckpt_dir}')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise EvaluationError(f'{path}: cannot be read ({e})') from e


def check_compatible(configs: Sequence[Any], workdirs: Sequence[str]) -> None:
  """Runs of an ensemble must share dataset, num_classes, image_size (and
  data_seed for digits, whose test split it draws).

  Raises:
    EvaluationError: naming the first field that differs and both values.
  """
  fields = SHARED_FIELDS
  if configs[0].dataset == 'digits':
    fields += ('data_seed',)
  for field in fields:
    first = configs[0].get(field)
    for config, workdir in zip(configs[1:], workdirs[1:]):
      if config.get(field) != first:
        raise EvaluationError(
            f'the runs differ in config.{field}: {workdirs[0]} has '
            f'{first!r}, {workdir} has {config.get(field)!r}; an ensemble '
            'needs the same test set and classes')


def read_configs(workdirs: Sequence[str]) -> List[ml_collections.ConfigDict]:
  """Every workdir's config.json, checked (see `read_config`) and compatible
  (see `check_compatible`); nothing is restored yet."""
  if not workdirs:
    raise EvaluationError('no workdir given')
  configs = [read_config(w) for w in workdirs]
  check_compatible(configs, workdirs)
  return configs


def load_runs(workdirs: Sequence[str], step: Optional[int] = None) -> List[Run]:
  """Checks every workdir first (`read_configs`), then restores each run.

  Args:
    workdirs: one or more training workdirs.
    step: the checkpoint step of every run (default: each run's latest).

  Returns:
    list of `Run`, variables replicated on the local devices.

  Raises:
    EvaluationError: see `read_config`, `check_compatible`.
    checkpointing.CheckpointError: no checkpoint at `step`, or a corrupt one.
  """
  read_configs(workdirs)
  runs = []
  for workdir in workdirs:
    config, variables, restored = checkpointing.restore_for_inference(
        workdir, step)
    runs.append(Run(workdir, config, variables, int(restored)))
  return runs


# ---------------------------------------------------------------- prediction


def local_mesh():
  """The one-axis mesh of this process's devices (as restore_for_inference)."""
  return sharding.make_mesh(jax.local_devices())


def inference_config(config, eval_batch_size: Optional[int],
                     num_devices: int) -> ml_collections.ConfigDict:
  """The config with eval_batch_size (or the override) rounded up to a
  multiple of the device count (padding is masked out, results unchanged)."""
  size = eval_batch_size or config.eval_batch_size
  size = -(-size // num_devices) * num_devices
  if size == config.eval_batch_size:
    return config
  config = config.copy_and_resolve_references()
  config.eval_batch_size = size
  return config


def predict_members(runs: Sequence[Run], images: np.ndarray, mesh,
                    eval_batch_size: Optional[int] = None) -> np.ndarray:
  """Member logits of every run on `images`, concatenated over members.

  Args:
    runs: restored runs (each with its own model and normalisation).
    images: uint8 [N, H, W, 3] (a memory map is fine: read batch by batch).
    mesh: the mesh the variables live on.
    eval_batch_size: override of config.eval_batch_size.

  Returns:
    float32 [N, sum_r M_r, C], members in run order.
  """
  outputs = []
  for run in runs:
    config = inference_config(run.config, eval_batch_size, mesh.devices.size)
    outputs.append(inference.predict_with_config(
        models.get_model(config), config, run.variables, images, mesh))
  return np.concatenate(outputs, axis=1)


# ---------------------------------------------------------------- test set


def best_epoch_on_test(workdir: str) -> Optional[Dict[str, Any]]:
  """The eval_history.jsonl record of best ensemble test top-1 (earliest on
  ties): {epoch, step, top1, note}, or None without a usable history."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.isfile(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        top1 = float(record['ensemble']['top1'])
        step = int(record['step'])
      except (ValueError, KeyError, TypeError):
        continue
      if math.isfinite(top1) and (best is None or top1 > best['top1']):
        best = {'epoch': record.get('epoch'), 'step': step, 'top1': top1,
                'note': BEST_EPOCH_NOTE}
  return best


def evaluate_test_set(runs: Sequence[Run], mesh,
                      eval_batch_size: Optional[int] = None
                      ) -> Tuple[Dict[str, Any], np.ndarray, np.ndarray]:
  """Metrics of the runs' (ensembled) members on the whole test set.

  Returns:
    (result in the eval.json schema, member logits float32 [N, sum M, C],
    labels int32 [N]).
  """
  config = runs[0].config
  images, labels = input_pipeline.load_split(config, 'test')
  logits = predict_members(runs, images, mesh, eval_batch_size)
  result = metrics.evaluation_metrics(
      logits, labels, ensemble=config.evaluation.ensemble,
      calibration_seed=config.evaluation.calibration_seed)
  result['step'] = runs[0].step
  result['workdirs'] = [os.path.abspath(r.workdir) for r in runs]
  if len(runs) > 1:
    result['steps'] = [r.step for r in runs]
    result['members_per_run'] = [r.config.num_members for r in runs]
  else:
    best = best_epoch_on_test(runs[0].workdir)
    if best is not None:
      result['best_epoch_on_test'] = best
  return result, logits, labels


# ---------------------------------------------------------------- CIFAR-C


def _json_float(value) -> Optional[float]:
  value = float(value)
  return value if math.isfinite(value) else None


def cell_statistics(log_probs: np.ndarray, labels: np.ndarray,
                    num_bins: int = 15) -> Dict[str, np.ndarray]:
  """Additive statistics of one (corruption, severity) cell.

  Args:
    log_probs: [n, C] ensemble log-probabilities; labels: [n] int.

  Returns:
    n, the correct top-1 / top-5 counts, the summed NLL, and per confidence
    bin b (`metrics.calibration_bins`) the accuracy mass acc_b |B_b|, the
    confidence mass conf_b |B_b| and the count |B_b| ([B] each). Summed over
    any union of cells they give that union's metrics exactly
    (`scores_from_statistics`).
  """
  n = len(labels)
  acc, conf, count = (np.asarray(x) for x in
                      metrics.calibration_bins(log_probs, labels, num_bins))
  return {
      'n': np.float64(n),
      'top1': np.sum(metrics.top_k_correct(log_probs, labels, 1)),
      'top5': np.sum(metrics.top_k_correct(log_probs, labels, 5)),
      'nll': float(metrics.nll(log_probs, labels)) * n,
      'acc_mass': acc * count,
      'conf_mass': conf * count,
      'count': count,
  }


def scores_from_statistics(sums: Dict[str, np.ndarray]) -> Dict[str, float]:
  """{top1, top5, nll, ece} from (summed) `cell_statistics`:
  top-k = correct_k / n, NLL = summed NLL / n and
  ECE = sum_b |acc mass_b - conf mass_b| / n (= sum_b |B_b|/n |acc_b - conf_b|).
  """
  n = sums['n']
  return {
      'top1': _json_float(sums['top1'] / n),
      'top5': _json_float(sums['top5'] / n),
      'nll': _json_float(sums['nll'] / n),
      'ece': _json_float(np.sum(np.abs(sums['acc_mass'] - sums['conf_mass']))
                         / n),
  }


def _add(total, sums):
  return sums if total is None else {k: total[k] + sums[k] for k in total}


def _mean(cells: Sequence[Dict[str, float]]) -> Dict[str, float]:
  return {k: _json_float(np.mean([c[k] for c in cells]))
          for k in CORRUPTION_METRICS}


def evaluate_corruptions(runs: Sequence[Run], folder: str, mesh,
                         eval_batch_size: Optional[int] = None,
                         num_bins: int = 15) -> Dict[str, Any]:
  """Top-1, top-5, NLL (no temperature scaling) and ECE on CIFAR-10/100-C.

  Reads the folder as distributed (see `corruptions`), checks every file
  before predicting, and ensembles the members as for the test set (first
  run's evaluation.ensemble).

  Returns:
    {'folder', 'num_images_per_severity', 'severities' [1..5],
     'evaluated' [names], 'missing_corruptions' [names of the 19 absent; a
     warning when not empty], 'ignored_files', 'ensemble_mode',
     'temperature_scaling': False,
     'per_corruption': {name: {'1'..'5', 'mean': {top1, top5, nll, ece}}},
     'per_severity': {'1'..'5': mean over corruptions},
     'mean': mean over the (corruption, severity) cells,
     'pooled': over all corrupted images at once,
     'notes': {...}}.

  Raises:
    corruptions.CorruptionDataError: a missing or malformed file.
  """
  config = runs[0].config
  mode = config.evaluation.ensemble
  present, missing, ignored = corruptions.find_corruptions(folder)
  labels = corruptions.check_folder(folder, config.num_classes,
                                    config.image_size, present)
  slices = corruptions.severity_slices(len(labels))
  if missing:
    logging.warning('%d of the %d CIFAR-C corruptions are missing from %s: %s',
                    len(missing), len(corruptions.CORRUPTIONS), folder,
                    ', '.join(missing))
  per_corruption, cells, total = {}, [], None
  for name in present:
    images = corruptions.open_corruption(folder, name, len(labels),
                                         config.image_size)
    log_probs = metrics.ensemble_log_probs(
        predict_members(runs, images, mesh, eval_batch_size), mode)
    table = {}
    for severity, rows in enumerate(slices, start=1):
      sums = cell_statistics(log_probs[rows], labels[rows], num_bins)
      total = _add(total, sums)
      table[str(severity)] = scores_from_statistics(sums)
      cells.append(table[str(severity)])
    table['mean'] = _mean([table[str(s)] for s in range(1, len(slices) + 1)])
    per_corruption[name] = table
    logging.info('%s: top1 per severity %s', name,
                 [round(table[str(s)]['top1'], 4) for s in range(1, 6)])
  per_severity = {
      str(s): _mean([per_corruption[c][str(s)] for c in present])
      for s in range(1, len(slices) + 1)}
  return {
      'folder': os.path.abspath(folder),
      'num_images_per_severity': len(labels) // corruptions.NUM_SEVERITIES,
      'severities': list(range(1, corruptions.NUM_SEVERITIES + 1)),
      'evaluated': present,
      'missing_corruptions': missing,
      'ignored_files': ignored,
      'ensemble_mode': mode,
      'temperature_scaling': False,
      'per_corruption': per_corruption,
      'per_severity': per_severity,
      'mean': _mean(cells),
      'pooled': scores_from_statistics(total),
      'notes': CORRUPTION_NOTES,
  }


# ---------------------------------------------------------------- entry points


def run_evaluation(workdirs: Sequence[str], step: Optional[int] = None, *,
                   corruptions_dir: Optional[str] = None,
                   eval_batch_size: Optional[int] = None
                   ) -> Tuple[Dict[str, Any], np.ndarray, np.ndarray]:
  """`evaluate_workdirs`, also returning the test logits [N, sum M, C] and
  labels [N] (for plots)."""
  workdirs = list(workdirs)
  if corruptions_dir is not None:  # A bad folder fails before any restore.
    config = read_configs(workdirs)[0]
    corruptions.check_folder(
        corruptions_dir, config.num_classes, config.image_size,
        corruptions.find_corruptions(corruptions_dir)[0])
  runs = load_runs(workdirs, step)
  mesh = local_mesh()
  result, logits, labels = evaluate_test_set(runs, mesh, eval_batch_size)
  if corruptions_dir is not None:
    result['corruptions'] = evaluate_corruptions(runs, corruptions_dir, mesh,
                                                 eval_batch_size)
  return result, logits, labels


def evaluate_workdirs(workdirs: Sequence[str], step: Optional[int] = None, *,
                      corruptions_dir: Optional[str] = None,
                      eval_batch_size: Optional[int] = None) -> Dict[str, Any]:
  """Evaluates one run, or the ensemble of several, on the whole test set.

  Args:
    workdirs: training workdirs (the first one's evaluation settings are used).
    step: checkpoint step of every run (default: each run's latest).
    corruptions_dir: optional CIFAR-10-C / CIFAR-100-C folder.
    eval_batch_size: override of config.eval_batch_size (rounded up to a
      multiple of the local device count).

  Returns:
    the eval.json dict (see the module docstring); nothing is written.
  """
  return run_evaluation(workdirs, step, corruptions_dir=corruptions_dir,
                        eval_batch_size=eval_batch_size)[0]


def to_json(result: Dict[str, Any]) -> str:
  """Deterministic strict JSON: sorted keys, indent 2, trailing newline."""
  return json.dumps(result, sort_keys=True, indent=2, allow_nan=False) + '\n'


def write_eval_json(result: Dict[str, Any], path: str) -> str:
  """Writes `to_json(result)` atomically (temporary file, then rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(to_json(result))
  os.replace(tmp, path)
  return path


def output_path(output: Optional[str], workdir: str) -> str:
  """--output as a file path; a folder (existing, or ending in '/') gets
  eval.json inside; default WORKDIR/eval.json."""
  if not output:
    return os.path.join(workdir, EVAL_FILE)
  if output.endswith(os.sep) or os.path.isdir(output):
    return os.path.join(output, EVAL_FILE)
  return output


def write_plots(result: Dict[str, Any], logits: np.ndarray, labels: np.ndarray,
                out_dir: str,
                history_workdir: Optional[str] = None) -> List[str]:
  """reliability.png, member_vs_ensemble.png and (when `history_workdir` has
  an eval_history.jsonl) training_curves.png in `out_dir`."""
  from mixmo_jax import plots  # matplotlib only when asked for.
  log_probs = metrics.ensemble_log_probs(np.asarray(logits, np.float64),
                                         result['ensemble_mode'])
  paths = plots.write_evaluation_plots(result, log_probs, labels, out_dir)
  if history_workdir is not None:
    history = os.path.join(history_workdir, HISTORY_FILE)
    if os.path.isfile(history):
      paths.append(plots.training_curves(
          history, os.path.join(out_dir, 'training_curves.png')))
  return paths


def _f(value, spec='7.4f'):
  return f'{"-":>7s}' if value is None else format(value, spec)


def format_table(result: Dict[str, Any]) -> str:
  """A readable summary of an eval.json dict."""
  ens, lines = result['ensemble'], []
  runs = result.get('workdirs', [])
  steps = result.get('steps', result['step'])
  lines.append(f'{", ".join(runs)} (step {steps}): '
               f'{result["num_members"]} members, {result["num_examples"]} '
               f'test images, ensemble = mean of member '
               f'{result["ensemble_mode"]}')
  lines.append(f'{"":10s} {"top1":>7s} {"top5":>7s} {"nll":>7s} {"ece":>7s} '
               f'{"brier":>7s}')
  lines.append(f'{"ensemble":10s} {_f(ens["top1"])} {_f(ens["top5"])} '
               f'{_f(ens["nll"])} {_f(ens["ece"])} {_f(ens["brier"])}')
  lines.append(f'{"  (TS)":10s} {_f(ens["top1_c"])} {"":7s} '
               f'{_f(ens["nll_c"])} {_f(ens["ece_c"])} '
               f'{_f(ens.get("brier_c"))}   temperature '
               f'{_f(ens["temperature"], ".4g")} (cross-fitted halves)')
  for i, member in enumerate(result['members']):
    lines.append(f'{f"member {i}":10s} {_f(member["top1"])} {"":7s} '
                 f'{_f(member["nll"])}')
  div = result['diversity']
  lines.append(f'diversity: ratio-error {_f(div["ratio_error"], ".4f")}, '
               f'disagreement {_f(div["disagreement"], ".4f")}')
  best = result.get('best_epoch_on_test')
  if best:
    lines.append(f'best epoch on test (optimistic, paper protocol): epoch '
                 f'{best["epoch"]} (step {best["step"]}) top1 '
                 f'{_f(best["top1"], ".4f")}')
  corr = result.get('corruptions')
  if corr:
    lines.append(f'corruptions ({len(corr["evaluated"])} of '
                 f'{len(corruptions.CORRUPTIONS)}, '
                 f'{corr["num_images_per_severity"]} images per severity, '
                 'nll without temperature scaling):')
    for name, row in [('mean', corr['mean']), ('pooled', corr['pooled'])] + [
        (f'severity {s}', v) for s, v in corr['per_severity'].items()]:
      lines.append(f'  {name:12s} top1 {_f(row["top1"])} top5 '
                   f'{_f(row["top5"])} nll {_f(row["nll"])} ece '
                   f'{_f(row["ece"])}')
    if corr['missing_corruptions']:
      missing = ', '.join(corr['missing_corruptions'])
      lines.append(f'  warning: missing {missing}')
  return '\n'.join(lines)


# ---------------------------------------------------------------- CLI

def define_flags() -> None:
  """Defines the CLI flags (only when run as a script: importing the module
  as a library defines none, so it coexists with `mixmo_jax.main`)."""
  flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest) '
                       'of every run.')
  flags.DEFINE_list('ensemble', [], 'More workdirs whose members join the '
                    'ensemble (comma separated).')
  flags.DEFINE_string('corruptions', None, 'CIFAR-10-C / CIFAR-100-C folder '
                      '(<corruption>.npy + labels.npy).')
  flags.DEFINE_bool('plots', False, 'Write PNG figures next to eval.json.')
  flags.DEFINE_string('output', None, 'eval.json path (or folder); default '
                      'WORKDIR/eval.json.')
  flags.DEFINE_integer('eval_batch_size', None, 'Override of '
                       'config.eval_batch_size.')


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(f'{type(e).__name__}: {e}')


def main(argv):
  cli.quiet_orbax_logs()
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}')
  args = flags.FLAGS
  if not args.workdir:
    cli.fail('--workdir is required')
  workdirs = [args.workdir] + [w for w in args.ensemble if w]
  try:
    result, logits, labels = run_evaluation(
        workdirs, args.step, corruptions_dir=args.corruptions,
        eval_batch_size=args.eval_batch_size)
  except (EvaluationError, corruptions.CorruptionDataError,
          checkpointing.CheckpointError) as e:
    cli.fail(e)
  except input_pipeline.DatasetUnavailableError as e:
    cli.fail(e, EXIT_DATA)
  path = output_path(args.output, workdirs[0])
  if jax.process_index() == 0:
    write_eval_json(result, path)
    print(format_table(result))
    print(f'wrote {path}')
    if args.plots:
      history = workdirs[0] if len(workdirs) == 1 else None
      for png in write_plots(result, logits, labels,
                             os.path.dirname(os.path.abspath(path)), history):
        print(f'wrote {png}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
