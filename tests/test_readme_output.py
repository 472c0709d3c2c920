"""scripts/readme_output.py rewrites only the marked block (fake output)."""
import importlib.util
import json
import os

import pytest

from conftest import REPO


def _script():
  spec = importlib.util.spec_from_file_location(
      'readme_output', os.path.join(REPO, 'scripts', 'readme_output.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rewrites_between_markers_from_fake_output(tmp_path):
  script = _script()
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(
      json.dumps({
          'num_epochs': 20,
          'cpu_devices': 2
      }))
  (workdir / 'eval_history.jsonl').write_text(
      json.dumps({'step': 440}) + '\n' + json.dumps({'step': 880}) + '\n')
  fake = tmp_path / 'eval.txt'
  fake.write_text('FAKE TABLE line 1\nFAKE line 2\n')
  readme = tmp_path / 'README.md'
  before = '# Title\n\ntext before\n\n'
  after = '\n\nThe ensemble beats ...\n'
  readme.write_text(before + script.BEGIN + '\nold stale numbers\n' +
                    script.END + after)
  argv = [
      f'--workdir={workdir}', f'--readme={readme}', f'--eval_output={fake}',
      '--seconds=285'
  ]
  assert script.main(argv) == 0
  text = readme.read_text()
  assert text.startswith(before) and text.endswith(after)
  assert 'old stale numbers' not in text
  assert '```\nFAKE TABLE line 1\nFAKE line 2\n```\n' + script.END in text
  assert ('trains for 4 min 45 s (20 epochs, 880 steps, 2 CPU devices)' in text)
  assert f'{os.cpu_count()}-core' in text
  # Idempotent: a second rewrite gives the same file.
  assert script.main(argv) == 0
  assert readme.read_text() == text


def test_missing_markers_is_an_error(tmp_path):
  script = _script()
  with pytest.raises(script.MarkerError, match='quickstart-output:begin'):
    script.rewrite('no markers here', 'x')
