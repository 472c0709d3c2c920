"""`.ci/run`: it runs the README's test command and fails when it fails or
collects no test (pytest's exit code 5)."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ci(folder, command, timeout=300, **env):
  """Runs a copy of .ci/run in `folder`, whose README's test command is
  `command`; `env`: the stages' switches (CI_LINT=0, ...)."""
  (folder / '.ci').mkdir()
  shutil.copy(os.path.join(REPO, '.ci', 'run'), folder / '.ci' / 'run')
  (folder / 'README.md'
  ).write_text(f'# x\n\n<!-- ci:test -->\n```bash\n{command}\n```\n')
  return subprocess.run(['bash', str(folder / '.ci' / 'run')],
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **env))


@pytest.mark.parametrize('command, expected', [('true', 0), ('exit 3', 3),
                                               ('exit 5', 1)])
def test_ci_script_exit_codes(tmp_path, command, expected):
  out = _ci(tmp_path, command, timeout=60, CI_SECOND_PYTHON='0', CI_LINT='0',
            CI_TYPES='0', CI_AOT='0')
  assert out.returncode == expected, out.stderr
  assert f'ci: {command}' in out.stdout


def test_ci_script_fails_when_the_second_python_fails(tmp_path):
  """The first suite passes; the Python 3.12 venv cannot install this
  folder (no setup.py): CI fails, saying which stage did."""
  out = _ci(tmp_path, 'true', CI_LINT='0', CI_TYPES='0', CI_AOT='0')
  assert out.returncode != 0, out.stdout
  assert 'ci: Python 3.12 suite finished in' in out.stdout, out.stderr
  assert 'exit code 0' not in out.stdout.splitlines()[-1]


def test_ci_script_fails_on_lint_before_any_test(tmp_path):
  """A Python file with an unused import under the repository's ruff rules:
  CI stops at the lint stage, before the README's command runs."""
  shutil.copy(os.path.join(REPO, 'pyproject.toml'), tmp_path)
  (tmp_path / 'bad.py').write_text('import os\n')
  out = _ci(tmp_path, 'touch ran')
  assert out.returncode == 1, out.stdout + out.stderr
  assert 'ci: lint failed' in out.stderr and 'F401' in out.stdout
  assert not (tmp_path / 'ran').exists()


def test_ci_script_fails_when_the_accelerator_compiles_fail(tmp_path):
  """The suite passes; the AOT stage gets only pytest (the jax plugins are
  hundreds of MB) and this folder has no tests/test_aot_programs.py: CI fails
  there, before Python 3.12."""
  out = _ci(tmp_path, 'true', CI_LINT='0', CI_TYPES='0',
            CI_AOT_PACKAGES='pytest')
  assert out.returncode == 1, out.stdout
  assert 'ci: accelerator compiles finished in' in out.stdout
  assert 'exit code 0' not in out.stdout.splitlines()[-2]
  assert 'Python 3.12' not in out.stdout


def test_ci_script_fails_on_a_type_error_after_the_suite(tmp_path):
  """The suite passes (its command makes the venv); mypy, with the
  repository's settings, finds a str assigned to an int in the package:
  CI fails there, before the accelerator compiles."""
  shutil.copy(os.path.join(REPO, 'pyproject.toml'), tmp_path)
  (tmp_path / 'mixmo_jax').mkdir()
  (tmp_path / 'mixmo_jax' / '__init__.py').write_text("count: int = 'three'\n")
  out = _ci(tmp_path, 'python3 -m venv .venv', CI_LINT='0')
  assert out.returncode == 1, out.stdout + out.stderr
  assert 'ci: type check failed' in out.stderr
  assert 'Incompatible types in assignment' in out.stdout
  assert 'accelerator compiles' not in out.stdout
