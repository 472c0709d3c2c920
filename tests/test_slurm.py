"""experiments.run --mode=slurm: the job-array scripts, run locally."""
import os
import subprocess

from experiments import run as run_lib


def test_slurm_mode_array_scripts_run_one_task(tmp_path):
  """Renders the SLURM sweep, then runs array tasks locally with SLURM's
  variables (the jobs lines replaced by cheap `echo`s) and the submit
  script against a fake `sbatch`."""
  jobs = tmp_path / 'sweep' / 'jobs.txt'
  code = run_lib.main([
      '--table=6', f'--root={tmp_path}/runs', '--mode=slurm',
      f'--jobs_file={jobs}', '--sbatch_options=--gres=gpu:1 --time=2:00:00'
  ])
  assert code == 0
  lines = jobs.read_text().splitlines()
  outputs = (tmp_path / 'sweep' / 'jobs.outputs').read_text().splitlines()
  assert len(outputs) == len(lines) > 1
  for line, out in zip(lines, outputs):
    assert f'--output={out}' in line  # The marker is what the line writes.
  script = (tmp_path / 'sweep' / 'jobs.sbatch').read_text()
  assert f'#SBATCH --array=1-{len(lines)}\n' in script
  assert '#SBATCH --gres=gpu:1\n#SBATCH --time=2:00:00\n' in script
  assert f'#SBATCH --output={tmp_path}/sweep/jobs_logs/%A_%a.out' in script
  # Cheap lines: task i prints "line i"; the marker of task 3 exists.
  jobs.write_text(''.join(f'echo line {i}\n' for i in range(1, 5)))
  marker = tmp_path / 'done3.json'
  marker.write_text('{}')
  (tmp_path / 'sweep' / 'jobs.outputs'
  ).write_text(f'{tmp_path}/no1\n{tmp_path}/no2\n{marker}\n{tmp_path}/no4\n')

  def task(i):
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_JOB_ID='7',
               SLURM_JOB_ID='8')
    return subprocess.run(
        ['bash', str(tmp_path / 'sweep' / 'jobs.sbatch')], env=env,
        capture_output=True, text=True, timeout=60)

  done = task(2)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1] == 'line 2'
  done = task(3)
  assert done.returncode == 0 and 'done already' in done.stdout
  assert 'line 3' not in done.stdout
  assert task(9).returncode == 1  # No such line.
  # The submit script: trainings first, ensembles after them (afterok).
  fake = tmp_path / 'bin'
  fake.mkdir()
  (fake / 'sbatch').write_text(
      '#!/bin/bash\necho "$@" >> "$SBATCH_LOG"\necho $((100 + $(wc -l < '
      '"$SBATCH_LOG")))\n')
  (fake / 'sbatch').chmod(0o755)
  log = tmp_path / 'sbatch.log'
  env = dict(os.environ, PATH=f'{fake}:{os.environ["PATH"]}',
             SBATCH_LOG=str(log))
  done = subprocess.run(
      ['bash', str(tmp_path / 'sweep' / 'jobs_submit.sh')], env=env,
      capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  calls = log.read_text().splitlines()
  assert calls == [
      f'--parsable {tmp_path}/sweep/jobs.sbatch',
      f'--parsable --dependency=afterok:101 '
      f'{tmp_path}/sweep/jobs_ensembles.sbatch'
  ]
  assert (tmp_path / 'sweep' / 'jobs_logs').is_dir()
