"""Commands that reproduce the paper's rows: print them, run them, or write jobs.

    python -m experiments.run --table=1 --dataset=cifar100 --method=cut_mixmo
    python -m experiments.run --table=9 --width=4 --seeds=0 --mode=run
    python -m experiments.run --table=5 --root=gs://BUCKET/mixmo --mode=jobs \
        --jobs_file=jobs.txt

Run from the repository root (the config paths are relative to it).

For every selected row (experiments/tables.py) and repetition k, the plan has
  * training runs: one per training seed, in the workdir
      ROOT/<table>/<dataset>_<network>-<width>_<method>[_cutmix][_m<M>]_b<b>/seed<k>
    of the row that owns the config: a training shared by several rows (Table
    8 = Table 1's runs; Table 9 at w = 10; Table 6 N = 1; Table 2's Mixup and
    CutMix blocks; deep-ensemble members = the single-network runs) is listed
    and run once, in the workdir of the first row that uses it;
  * evaluations of the final checkpoint:
      python -m mixmo_jax.evaluate --workdir=W --output=W/eval.json
    for every training run, and for an ensemble of N networks (repetition k:
    seeds k*N .. k*N+N-1, see tables.Entry.member_seeds)
      python -m mixmo_jax.evaluate --workdir=W0 --ensemble=W1,...
          --output=W0/eval_ensemble<N>.json
    and, for Table 4's CIFAR-100-C rows, the same with
    --corruptions=CORRUPTIONS_DIR (--corruptions_dir) into eval_cifar_c.json /
    eval_ensemble<N>_cifar_c.json (ensembles and corruption evaluations are
    the plan's third list: the jobs mode's second file).

Modes:
  print  the commands, trainings first (a comment lists the rows using each).
  run    runs them one after the other (subprocess, cwd = repository root);
         a training whose workdir already has eval.json and an evaluation
         whose output exists are skipped (--noskip_done reruns them; a
         rerun training resumes from its last checkpoint).
  jobs   writes --jobs_file, one line per training: `train && evaluate`
         (independent lines, for a cluster's job array), and, if the rows
         include ensembles, <jobs_file stem>_ensembles.txt with the ensemble
         evaluations, to run once the first file is done.
  slurm  writes the jobs files as `jobs` does, plus a SLURM job array per
         file (<stem>.sbatch: task i runs line i; <stem>_ensembles.sbatch:
         the ensemble evaluations) and <stem>_submit.sh, which submits the
         first array and the second with --dependency=afterok on it (every
         training task succeeded). A task whose output (the training's
         eval.json, or the ensemble JSON) exists exits at once, and a
         training resumes from its last checkpoint, so re-running the submit
         script finishes an interrupted sweep. Logs: <stem>_logs/<array job
         id>_<task>.out.

             python -m experiments.run --table=1 --mode=slurm \
                 --jobs_file=sweep/jobs.txt --sbatch_options='--gres=gpu:1'
             bash sweep/jobs_submit.sh
"""
import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

from experiments import tables

DEFAULT_ROOT = 'runs'
# The CIFAR-100-C folder in printed commands when --corruptions_dir is unset.
CORRUPTIONS_PLACEHOLDER = 'CIFAR100_C_DIR'
CORRUPTIONS_SUFFIX = '_cifar_c'  # eval<...>_cifar_c.json: Table 4's rows.


@dataclasses.dataclass
class Job:
  """One command of the plan.

  Attributes:
    kind: 'train' or 'eval'.
    argv: the command as an argument list.
    output: train: the run's workdir; eval: the JSON file it writes.
    rows: labels ('<table>/<name>') of the selected rows that need it.
  """
  kind: str
  argv: list[str]
  output: str
  rows: list[str] = dataclasses.field(default_factory=list)

  @property
  def command(self) -> str:
    return shlex.join(self.argv)


def resolve_root(root: str) -> str:
  """Absolute local path, or a URL (gs://...) unchanged."""
  return root if '://' in root else os.path.abspath(root)


def workdir(root: str, entry: tables.Entry, seed: int) -> str:
  """ROOT/<table>/<name>/seed<k> of the row that owns the entry's training."""
  home = tables.owner(entry)
  return os.path.join(root, home.table, home.name, f'seed{seed}')


def eval_path(root: str, entry: tables.Entry, repetition: int) -> str:
  """The eval JSON of repetition k of a row.

  A single network: <workdir>/eval.json; an ensemble of N networks:
  <first member's workdir>/eval_ensemble<N>.json; a CIFAR-100-C row
  (entry.corruptions): eval_cifar_c.json / eval_ensemble<N>_cifar_c.json.
  """
  first = workdir(root, entry, entry.member_seeds(repetition)[0])
  stem = ('eval'
          if entry.n_networks == 1 else f'eval_ensemble{entry.n_networks}')
  suffix = CORRUPTIONS_SUFFIX if entry.corruptions else ''
  return os.path.join(first, f'{stem}{suffix}.json')


def train_argv(entry: tables.Entry, seed: int, root: str,
               python: str = 'python') -> list[str]:
  """python -m mixmo_jax.main --config=... --config.seed=K --workdir=..."""
  home = tables.owner(entry)
  return ([python, '-m', 'mixmo_jax.main'] + home.config_args() +
          [f'--config.seed={seed}', f'--workdir={workdir(root, entry, seed)}'])


def eval_argv(entry: tables.Entry, repetition: int, root: str,
              python: str = 'python',
              corruptions_dir: str | None = None) -> list[str]:
  """python -m mixmo_jax.evaluate --workdir=W0 [--ensemble=W1,..]
  [--corruptions=DIR (CIFAR-100-C rows)] --output=..."""
  dirs = [workdir(root, entry, s) for s in entry.member_seeds(repetition)]
  argv = [python, '-m', 'mixmo_jax.evaluate', f'--workdir={dirs[0]}']
  if len(dirs) > 1:
    argv.append(f'--ensemble={",".join(dirs[1:])}')
  if entry.corruptions:
    argv.append(f'--corruptions={corruptions_dir or CORRUPTIONS_PLACEHOLDER}')
  return argv + [f'--output={eval_path(root, entry, repetition)}']


def plan(
    entries: Sequence[tables.Entry], root: str, python: str = 'python',
    corruptions_dir: str | None = None
) -> tuple[list[Job], list[Job], list[Job]]:
  """(trainings, single evaluations, ensemble and CIFAR-100-C evaluations),
  deduplicated.

  Each training run appears once (keyed by workdir) with the evaluation of
  its final checkpoint on the clean test set (eval.json), so that the
  second list pairs one to one with the first; ensemble evaluations and
  the corruption evaluations (entry.corruptions) follow.
  """
  trains: dict[str, Job] = {}
  singles: dict[str, Job] = {}
  ensembles: dict[str, Job] = {}
  for entry in entries:
    for k in entry.seeds:
      for seed in entry.member_seeds(k):
        wd = workdir(root, entry, seed)
        if wd not in trains:
          trains[wd] = Job('train', train_argv(entry, seed, root, python), wd)
          single = dataclasses.replace(entry, n_networks=1, corruptions=False)
          out = eval_path(root, single, seed)
          singles[out] = Job('eval', eval_argv(single, seed, root, python), out)
        if entry.label not in trains[wd].rows:
          trains[wd].rows.append(entry.label)
      out = eval_path(root, entry, k)
      target = (
          singles
          if entry.n_networks == 1 and not entry.corruptions else ensembles)
      if out not in target:
        target[out] = Job('eval',
                          eval_argv(entry, k, root, python, corruptions_dir),
                          out)
      if entry.label not in target[out].rows:
        target[out].rows.append(entry.label)
  return list(trains.values()), list(singles.values()), list(ensembles.values())


def _unique(items):
  return list(dict.fromkeys(items))


def format_plan(entries: Sequence[tables.Entry], root: str,
                python: str = 'python',
                corruptions_dir: str | None = None) -> str:
  """The print mode's text: commented trainings, then evaluations."""
  trains, singles, ensembles = plan(entries, root, python, corruptions_dir)
  lines = [
      f'# mixmo_jax: {len(entries)} rows '
      f'(tables {", ".join(_unique(e.table for e in entries))}), '
      f'{len(trains)} trainings, {len(singles) + len(ensembles)} evaluations.',
      '# Run from the repository root. Rerunning a training resumes it from '
      'its last checkpoint.', '', '# --- training ---'
  ]
  for job in trains:
    lines.append(f'# rows: {" ".join(_unique(job.rows))}')
    lines.append(job.command)
  lines += [
      '', '# --- evaluation of the final checkpoints (after training) ---'
  ]
  lines += [job.command for job in singles]
  if ensembles:
    lines += [
        '', '# --- ensembles of independently trained networks and '
        'CIFAR-100-C evaluations ---'
    ]
    for job in ensembles:
      lines.append(f'# rows: {" ".join(job.rows)}')
      lines.append(job.command)
  return '\n'.join(lines) + '\n'


def jobs_lines(
    entries: Sequence[tables.Entry], root: str, python: str = 'python',
    corruptions_dir: str | None = None) -> tuple[list[str], list[str]]:
  """(one `train && evaluate` line per training, ensemble and CIFAR-100-C
  evaluation lines)."""
  trains, singles, ensembles = plan(entries, root, python, corruptions_dir)
  first = [f'{t.command} && {s.command}' for t, s in zip(trains, singles)]
  return first, [job.command for job in ensembles]


def ensembles_file(jobs_file: str) -> str:
  stem, ext = os.path.splitext(jobs_file)
  return f'{stem}_ensembles{ext or ".txt"}'


def write_jobs(entries, root, jobs_file: str, python: str = 'python',
               corruptions_dir: str | None = None) -> list[str]:
  """Writes the jobs file(s); returns the paths written."""
  first, second = jobs_lines(entries, root, python, corruptions_dir)
  written = []
  for path, lines in ((jobs_file, first), (ensembles_file(jobs_file), second)):
    if not lines:
      continue
    folder = os.path.dirname(path)
    if folder:
      os.makedirs(folder, exist_ok=True)
    with open(path, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    written.append(path)
  return written


def _outputs(entries, root: str, python: str) -> tuple[list[str], list[str]]:
  """The files whose existence marks each jobs line done (same order)."""
  trains, _, ensembles = plan(entries, root, python)
  return ([os.path.join(t.output, 'eval.json') for t in trains],
          [job.output for job in ensembles])


SBATCH_TEMPLATE = """#!/bin/bash
# SLURM job array over {jobs_name}: task i runs its line i (1-based) from
# {repo}. Written by `python -m experiments.run --mode=slurm`.
#SBATCH --job-name={job_name}
#SBATCH --array=1-{count}
#SBATCH --output={log_dir}/%A_%a.out
#SBATCH --error={log_dir}/%A_%a.out
{options}
set -euo pipefail
JOBS={jobs}
OUTPUTS={outputs}
TASK=${{SLURM_ARRAY_TASK_ID:?run this script with sbatch (a job array)}}
LINE=$(sed -n "${{TASK}}p" "$JOBS")
DONE=$(sed -n "${{TASK}}p" "$OUTPUTS")
if [ -z "$LINE" ]; then
  echo "task $TASK: no line $TASK in $JOBS" >&2
  exit 1
fi
if [ -n "$DONE" ] && [ -e "$DONE" ]; then
  echo "task $TASK: done already ($DONE exists)"
  exit 0
fi
cd {repo}
echo "task $TASK on $(hostname): $LINE"
bash -c "$LINE"
"""

SUBMIT_TEMPLATE = """#!/bin/bash
# Submits the sweep: the trainings' array, then the ensemble evaluations
# once every training task succeeded. Re-run it to finish an interrupted
# sweep (finished tasks exit at once; trainings resume).
set -euo pipefail
mkdir -p {log_dirs}
JOB=$(sbatch --parsable {first})
echo "submitted trainings: job array $JOB ({first})"
{second}"""


def sbatch_script(jobs_file: str, outputs_file: str, count: int, log_dir: str,
                  options: str = '') -> str:
  """The text of a job-array script over `count` lines of `jobs_file`."""
  lines = [f'#SBATCH {opt}' for opt in shlex.split(options)]
  name = os.path.splitext(os.path.basename(jobs_file))[0]
  return SBATCH_TEMPLATE.format(
      jobs_name=os.path.basename(jobs_file), repo=shlex.quote(tables.REPO),
      job_name=f'mixmo_{name}', count=count, log_dir=log_dir,
      options='\n'.join(lines), jobs=shlex.quote(jobs_file),
      outputs=shlex.quote(outputs_file))


def write_slurm(entries, root, jobs_file: str, python: str = 'python',
                options: str = '',
                corruptions_dir: str | None = None) -> list[str]:
  """Jobs files, their outputs files, array scripts and the submit script.

  Returns:
    The paths written, the submit script last.
  """
  jobs_file = os.path.abspath(jobs_file)
  written = write_jobs(entries, root, jobs_file, python, corruptions_dir)
  stem = os.path.splitext(jobs_file)[0]
  log_dir = f'{stem}_logs'
  scripts = []
  for path, outputs in zip((jobs_file, ensembles_file(jobs_file)),
                           _outputs(entries, root, python)):
    if not outputs:
      continue
    outputs_file = f'{os.path.splitext(path)[0]}.outputs'
    with open(outputs_file, 'w') as f:
      f.write('\n'.join(outputs) + '\n')
    script = f'{os.path.splitext(path)[0]}.sbatch'
    with open(script, 'w') as f:
      f.write(sbatch_script(path, outputs_file, len(outputs), log_dir, options))
    written += [outputs_file, script]
    scripts.append(script)
  second = ''
  if len(scripts) > 1:
    second = (f'ENS=$(sbatch --parsable --dependency=afterok:$JOB '
              f'{shlex.quote(scripts[1])})\n'
              f'echo "submitted ensemble evaluations: job array $ENS, after '
              f'$JOB"\n')
  submit = f'{stem}_submit.sh'
  with open(submit, 'w') as f:
    f.write(
        SUBMIT_TEMPLATE.format(
            log_dirs=shlex.quote(log_dir), first=shlex.quote(scripts[0]),
            second=second))
  os.chmod(submit, 0o755)
  return written + [submit]


def run_plan(entries, root, skip_done: bool = True,
             python: str = sys.executable,
             corruptions_dir: str | None = None) -> int:
  """Runs trainings, then evaluations, sequentially; returns an exit code."""
  if corruptions_dir is None and any(e.corruptions for e in entries):
    print(
        "note: no --corruptions_dir (the CIFAR-100-C folder): Table 4's "
        'CIFAR-100-C evaluations are left out', file=sys.stderr)
    entries = [e for e in entries if not e.corruptions]
  trains, singles, ensembles = plan(entries, root, python, corruptions_dir)
  for job in trains + singles + ensembles:
    marker = (
        os.path.join(job.output, 'eval.json')
        if job.kind == 'train' else job.output)
    if skip_done and os.path.exists(marker):
      print(f'[skip, {marker} exists] {job.command}', flush=True)
      continue
    print(f'[run] {job.command}', flush=True)
    code = subprocess.run(job.argv, cwd=tables.REPO, check=False).returncode
    if code:
      print(f'error: exit code {code} from: {job.command}', file=sys.stderr)
      return code
  return 0


def _list(text: str | None):
  return None if not text else [t for t in text.split(',') if t]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.run',
      description='Training and evaluation commands for the paper tables.')
  parser.add_argument('--table', default='all',
                      help='1,2,4,5,6,8,9,fig9,ub (comma-separated) or all')
  parser.add_argument('--dataset', default=None,
                      help='cifar100,cifar10,tiny_imagenet (comma-separated)')
  parser.add_argument('--method', default=None,
                      help='method names as in results.csv (comma-separated)')
  parser.add_argument('--width', default=None, help='widths (comma-separated)')
  parser.add_argument('--seeds', default=None,
                      help="repetitions, e.g. 0,1,2 (default: the rows' own)")
  parser.add_argument('--root', default=DEFAULT_ROOT,
                      help='folder (or gs:// URL) of the workdirs')
  parser.add_argument('--mode', default='print',
                      choices=('print', 'run', 'jobs', 'slurm'))
  parser.add_argument('--jobs_file', default='jobs.txt')
  parser.add_argument(
      '--corruptions_dir', default=None,
      help="CIFAR-100-C folder for Table 4's evaluations "
      f'(print/jobs default: {CORRUPTIONS_PLACEHOLDER})')
  parser.add_argument(
      '--sbatch_options', default='',
      help="slurm mode: #SBATCH options of every task, e.g. "
      "'--gres=gpu:1 --time=24:00:00 --partition=gpu'")
  parser.add_argument(
      '--python', default=None,
      help='interpreter in the commands (default: python; '
      'run mode: this interpreter)')
  parser.add_argument('--skip_done', default=True,
                      action=argparse.BooleanOptionalAction)
  parser.add_argument('--noskip_done', dest='skip_done', action='store_false')
  return parser.parse_args(argv)


def selected_entries(args: argparse.Namespace) -> list[tables.Entry]:
  tabs = None if args.table in (None, '', 'all') else _list(args.table)
  seeds = _list(args.seeds)
  entries = tables.select(
      tables=tabs, datasets=_list(args.dataset), methods=_list(args.method),
      widths=_list(args.width),
      seeds=None if seeds is None else [int(s) for s in seeds])
  return entries


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    entries = selected_entries(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if not entries:
    print('error: no row matches the filters', file=sys.stderr)
    return 2
  root = resolve_root(args.root)
  if args.mode == 'print':
    sys.stdout.write(
        format_plan(entries, root, args.python or 'python',
                    args.corruptions_dir))
    return 0
  if args.mode == 'jobs':
    for path in write_jobs(entries, root, args.jobs_file, args.python or
                           'python', args.corruptions_dir):
      with open(path) as f:
        count = sum(1 for _ in f)
      print(f'wrote {path} ({count} lines)')
    return 0
  if args.mode == 'slurm':
    paths = write_slurm(entries, root, args.jobs_file, args.python or 'python',
                        args.sbatch_options, args.corruptions_dir)
    for path in paths:
      print(f'wrote {path}')
    print(f'submit with: bash {paths[-1]}')
    return 0
  return run_plan(entries, root, args.skip_done, args.python or sys.executable,
                  args.corruptions_dir)


if __name__ == '__main__':
  sys.exit(main())
