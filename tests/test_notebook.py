"""notebooks/mixmo_quickstart.ipynb: saved clean, and runs top to bottom.

The run executes the notebook headless with nbclient in a kernel of this
Python (sys.executable), with MIXMO_NOTEBOOK_TINY=1 (WRN-10-1 on 320 digits,
2 epochs, Cut-MixMo and vanilla) and the 8 fake CPU devices of conftest.py
(the kernel is a subprocess and inherits os.environ). The workdir base is
injected papermill-style: a cell `WORKDIR = ...` right after the cell tagged
"parameters". No network: TINY selects the offline digits.
"""
import json
import os
import sys

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'mixmo_quickstart.ipynb')
CELL_TIMEOUT_S = 600
VARIANTS = ('cut_mixmo', 'vanilla')
# Figures the notebook writes: in the workdir base, and in each run's workdir.
BASE_FIGURES = ('w_r.png', 'masks_cut.png', 'masks_linear.png',
                'diversity_accuracy.png', 'feature_maps.png')
RUN_FIGURES = ('member_vs_ensemble.png', 'reliability.png',
               'training_curves.png')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_index(nb):
  tagged = [
      i for i, cell in enumerate(nb.cells)
      if 'parameters' in cell.get('metadata', {}).get('tags', [])
  ]
  assert len(tagged) == 1, 'exactly one cell must be tagged "parameters"'
  return tagged[0]


def test_notebook_is_saved_without_outputs_and_tagged():
  nb = _read()
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == 'markdown'
  assert 'Colab' in nb.cells[0].source
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code, 'no code cells'
  for cell in code:
    assert cell.outputs == [], f'outputs saved in cell: {cell.source[:60]!r}'
    assert cell.execution_count is None
  params = nb.cells[_parameters_index(nb)]
  assert params.cell_type == 'code'
  for name in ('DATASET', 'EPOCHS', 'WIDTH', 'TINY', 'WORKDIR'):
    assert f'{name} = ' in params.source, name
  setup = '\n'.join(c.source for c in code)
  assert "REPO_URL = 'https://github.com/" in setup
  assert "'google.colab' in sys.modules" in setup


def _python_kernel(tmp_path, monkeypatch):
  """Name of a kernelspec whose kernel runs sys.executable.

  The registered 'python3' does when its argv[0] is a bare `python` (which
  jupyter_client replaces by sys.executable) or this interpreter; otherwise
  a temporary kernelspec is put first on JUPYTER_PATH.
  """
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
  bare = {
      'python', f'python{sys.version_info[0]}',
      'python{}.{}'.format(*sys.version_info[:2])
  }
  try:
    argv0 = KernelSpecManager().get_kernel_spec('python3').argv[0]
    if argv0 in bare or os.path.realpath(argv0) == os.path.realpath(
        sys.executable):
      return 'python3'
  except NoSuchKernel:
    pass
  name = 'mixmo-notebook-test'
  folder = tmp_path / 'jupyter' / 'kernels' / name
  folder.mkdir(parents=True)
  (folder / 'kernel.json').write_text(
      json.dumps({
          'argv': [
              sys.executable, '-m', 'ipykernel_launcher', '-f',
              '{connection_file}'
          ],
          'display_name': 'mixmo test',
          'language': 'python'
      }))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  return name


def _is_png(path):
  with open(path, 'rb') as f:
    return os.path.getsize(path) > 1000 and f.read(8) == PNG_SIGNATURE


def test_notebook_runs_tiny(tmp_path, monkeypatch):
  monkeypatch.setenv('MIXMO_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    monkeypatch.setenv('XLA_FLAGS',
                       (flags +
                        ' --xla_force_host_platform_device_count=8').strip())
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(tmp_path / 'runtime'))
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  kernel = _python_kernel(tmp_path, monkeypatch)

  nb = _read()
  base = tmp_path / 'runs'
  nb.cells.insert(
      _parameters_index(nb) + 1,
      nbformat.v4.new_code_cell(f'WORKDIR = {str(base)!r}'))
  client = NotebookClient(
      nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
      resources={'metadata': {
          'path': os.path.join(REPO, 'notebooks')
      }})
  client.execute()  # Raises CellExecutionError (with the traceback) on error.

  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count is not None for c in code)
  errors = [o for c in code for o in c.outputs if o.output_type == 'error']
  assert not errors, errors
  shown = [
      o for c in code for o in c.outputs if 'image/png' in o.get('data', {})
  ]
  expected = [base / f for f in BASE_FIGURES
             ] + [base / v / f for v in VARIANTS for f in RUN_FIGURES]
  missing = [str(p) for p in expected if not p.is_file() or not _is_png(p)]
  assert not missing, f'figures missing or empty: {missing}'
  assert len(shown) >= len(expected), 'figures not displayed inline'

  for variant, members in zip(VARIANTS, (2, 1)):
    with open(base / variant / 'config.json') as f:
      config = json.load(f)
    assert config['dataset'] == 'digits'  # TINY never uses the network.
    assert config['num_members'] == members
    with open(base / variant / 'eval.json') as f:
      result = json.load(f)
    assert result['num_members'] == members
    assert len(result['members']) == members
    assert 0.0 <= result['ensemble']['top1'] <= 1.0
    assert (base / variant / 'eval_history.jsonl').is_file()

  # The text of the notebook's own outputs: diversity and the predictions.
  text = ''.join(o.get('text', '') for c in code for o in c.outputs)
  assert 'ratio-error' in text and 'mutual info' in text
  assert 'backend: cpu' in text and 'device count: 8' in text
