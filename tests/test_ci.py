"""`.ci/run`: it runs the README's test command and fails when it fails or
collects no test (pytest's exit code 5)."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('command, expected', [
    ('true', 0), ('exit 3', 3), ('exit 5', 1)])
def test_ci_script_exit_codes(tmp_path, command, expected):
  (tmp_path / '.ci').mkdir()
  shutil.copy(os.path.join(REPO, '.ci', 'run'), tmp_path / '.ci' / 'run')
  (tmp_path / 'README.md').write_text(
      f'# x\n\n<!-- ci:test -->\n```bash\n{command}\n```\n')
  out = subprocess.run(['bash', str(tmp_path / '.ci' / 'run')],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == expected, out.stderr
  assert f'ci: {command}' in out.stdout
