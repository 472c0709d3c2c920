"""gs:// workdirs against a real object store on 127.0.0.1 (fake-gcs-server,
conftest.gcs_emulator): training with periodic evaluation, a SIGKILL and
the resume, evaluate with plots, predict.load and a second trainer, every
file in the bucket and nothing on the local disk."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, killed_main, xla_flags
from mixmo_jax import workdir as wd

# A 3-epoch WRN-10-1 digits run, evaluated and saved every epoch.
TINY = (f'--config={REPO}/configs/digits.py', '--config.model.width=1',
        '--config.num_epochs=3', '--config.checkpoint_every_epochs=1',
        '--config.eval_every_epochs=1', '--config.num_train_examples=320',
        '--config.optimizer.decay_epochs=()')
BUCKET = 'gs://mixmo-test'


def _env(gcs, **extra):
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(2), **gcs,
              **extra)


def _run(gcs, module, *args, cwd, **extra):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd,
                        env=dict(_env(gcs, **extra), PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=600)


def _python(gcs, code, cwd):
  out = subprocess.run([sys.executable, '-c', code], cwd=cwd,
                       env=dict(_env(gcs), PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _listing(gcs, url, cwd):
  """Every object name under `url` (relative), through gcsfs."""
  code = ('import gcsfs, json, sys\n'
          'fs = gcsfs.GCSFileSystem()\n'
          f'root = "{url[len("gs://"):]}"\n'
          'print(json.dumps(sorted(p[len(root) + 1:] for p in '
          'fs.find(root))))\n')
  return json.loads(_python(gcs, code, cwd))


def _config(*extra):
  return [a for a in TINY] + list(extra)


@pytest.fixture(scope='module')
def local_digest(tmp_path_factory):
  """The final (step, digest) of the same run on local disk."""
  workdir = str(tmp_path_factory.mktemp('local') / 'run')
  out = subprocess.run(
      [sys.executable, '-m', 'mixmo_jax.main', *TINY, f'--workdir={workdir}'],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu',
                         XLA_FLAGS=xla_flags(2)), capture_output=True,
      text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  step = wd.available_steps(workdir)[-1]
  with open(
      os.path.join(workdir, wd.CHECKPOINTS, str(step), 'digest',
                   'metadata')) as f:
    return step, json.load(f)['sha256']


def test_train_kill_resume_evaluate_in_a_bucket(gcs_emulator, tmp_path,
                                                local_digest):
  url = f'{BUCKET}/kill/run'
  argv, env = killed_main('step:15', _env(gcs_emulator))
  killed = subprocess.run([*argv, *TINY, f'--workdir={url}'], cwd=tmp_path,
                          env=dict(env, PYTHONPATH=REPO), capture_output=True,
                          text=True, timeout=600)
  assert killed.returncode == -9, killed.stderr[-3000:]
  names = _listing(gcs_emulator, url, tmp_path)
  assert {'config.json', 'run.json', 'eval_history.jsonl'} <= set(names)
  assert 'checkpoints/10/digest/metadata' in names
  assert not any(n.startswith('checkpoints/20') for n in names)
  resumed = _run(gcs_emulator, 'mixmo_jax.main', *TINY, f'--workdir={url}',
                 cwd=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from the checkpoint at step 10.' in resumed.stderr
  step, digest = local_digest
  record = json.loads(
      _python(
          gcs_emulator, 'import gcsfs\nprint(gcsfs.GCSFileSystem().cat_file('
          f'"{url[5:]}/checkpoints/{step}/digest/metadata").decode())',
          tmp_path))
  assert record['sha256'] == digest  # Bit-identical to the local run.
  names = _listing(gcs_emulator, url, tmp_path)
  assert any(n.startswith('events.out.tfevents.') for n in names)
  assert '.lock' not in names  # Released.
  history = _python(
      gcs_emulator, 'from mixmo_jax import workdir as wd\n'
      f'print([r["step"] for r in wd.read_history("{url}")])', tmp_path)
  assert history.strip() == '[10, 20, 30]'

  evaluated = _run(gcs_emulator, 'mixmo_jax.evaluate', f'--workdir={url}',
                   '--plots', cwd=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  names = set(_listing(gcs_emulator, url, tmp_path))
  assert {
      'eval.json', 'reliability.png', 'member_vs_ensemble.png',
      'training_curves.png'
  } <= names, names
  top1 = _python(
      gcs_emulator, 'import json\nfrom mixmo_jax import predict, '
      'storage\n'
      f'p = predict.load("{url}")\n'
      f'e = json.loads(storage.read_bytes("{url}/eval.json"))\n'
      'print(p.step, e["step"], e["ensemble"]["top1"])', tmp_path)
  assert top1.split()[:2] == ['30', '30']
  analysed = _run(gcs_emulator, 'mixmo_jax.analysis', f'--workdir={url}',
                  f'--plot={url}/utilisation.png', cwd=tmp_path)
  assert analysed.returncode == 0, analysed.stderr[-3000:]
  assert {'utilisation.json',
          'utilisation.png'} <= set(_listing(gcs_emulator, url, tmp_path))
  assert os.listdir(tmp_path) == []  # Nothing written locally.


def test_a_second_trainer_is_refused_and_a_dead_ones_lease_taken_over(
    gcs_emulator, tmp_path):
  """A trainer holds the lease: a second one is refused in one line naming
  it. Killed, it leaves its lease; once that has expired (rewritten here
  with a past expiry, as TTL seconds would make it) the next start takes it
  over, saying so."""
  import signal
  import time
  url = f'{BUCKET}/busy/run'
  args = [*TINY, '--config.num_epochs=40', f'--workdir={url}']
  first = subprocess.Popen([sys.executable, '-m', 'mixmo_jax.main', *args],
                           cwd=tmp_path,
                           env=dict(_env(gcs_emulator),
                                    PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while '.lock' not in _listing(gcs_emulator, url, tmp_path):
      assert first.poll() is None and time.time() < deadline
      time.sleep(1)
    second = _run(gcs_emulator, 'mixmo_jax.main', *args, cwd=tmp_path)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [l for l in second.stderr.splitlines() if l.startswith('error')]
    assert len(errors) == 1, second.stderr[-3000:]
    assert errors[0].startswith(f'error: {url} is in use by another trainer: '
                                f'pid {first.pid} on ')
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
  expire = ('import gcsfs, json\n'
            'fs = gcsfs.GCSFileSystem()\n'
            f'path = "{url[5:]}/.lock"\n'
            'held = json.loads(fs.cat_file(path))\n'
            'held["expires"] -= 10 ** 6\n'
            'fs.pipe_file(path, json.dumps(held).encode())\n')
  _python(gcs_emulator, expire, tmp_path)
  third = subprocess.Popen([sys.executable, '-m', 'mixmo_jax.main', *args],
                           cwd=tmp_path,
                           env=dict(_env(gcs_emulator),
                                    PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  seen = []
  try:
    for line in third.stderr:  # Until it says it took the lease over.
      seen.append(line)
      if 'Took over the expired lease' in line or 'error' in line:
        break
  finally:
    third.send_signal(signal.SIGKILL)
    third.communicate(timeout=60)
  assert 'Took over the expired lease' in seen[-1], ''.join(seen)[-3000:]
  assert f'pid {first.pid} on ' in seen[-1]
