"""mixmo_jax/contrib/onednn/library.py: the FFI handlers build once per
machine (cached by content, never half-written) and a failed build turns
the path off with one warning naming the cause."""
import os
import platform
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, onednn_conv_on
from mixmo_jax.contrib.onednn import library

# Where the cpu-onednn extra installed the library and a compiler is found,
# the path must be on: a kernel that fails the probe is an error, not a skip.
BUILDABLE = (
    platform.machine() == 'x86_64' and sys.platform == 'linux' and
    library.onednn_root() is not None and
    shutil.which(os.environ.get('CXX', 'g++')) is not None)
needs_build = pytest.mark.skipif(
    not BUILDABLE, reason='no oneDNN library (extra cpu-onednn) or no C++ '
    'compiler here')


@needs_build
def test_on_wherever_it_can_be_built():
  with onednn_conv_on() as on:
    assert on, 'built but the probe or the registration failed (see the log)'


def test_build_errors_name_the_cause_and_leave_no_partial_file(
    tmp_path, monkeypatch):
  monkeypatch.setenv(library.CACHE_ENV, str(tmp_path))
  if library.onednn_root() is None:
    with pytest.raises(RuntimeError, match='no oneDNN library'):
      library.build()
    return
  monkeypatch.setenv('CXX', 'no-such-compiler-mixmo')
  with pytest.raises(RuntimeError, match='no C\\+\\+ compiler'):
    library.build()
  monkeypatch.setenv('CXX', 'false')  # A "compiler" that fails.
  with pytest.raises(RuntimeError, match='failed'):
    library.build()
  assert list(tmp_path.iterdir()) == []


@needs_build
def test_the_build_is_cached_by_content(tmp_path, monkeypatch):
  monkeypatch.setenv(library.CACHE_ENV, str(tmp_path))
  first = library.build()
  mtime = first.stat().st_mtime_ns
  assert library.build() == first and first.stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_a_failed_build_turns_the_path_off_with_one_warning(tmp_path):
  """MIXMO_ONEDNN_CONV=1 where the build really fails (a compiler that
  exits 1, an empty cache): XLA's convs and one warning naming the cause."""
  code = ('import jax, jax.numpy as jnp\n'
          'from mixmo_jax.contrib.onednn import conv\n'
          'print(conv.enabled(), conv.enabled())\n'
          'y = conv.conv_general_dilated(jnp.ones((1, 4, 4, 2)), '
          'jnp.ones((3, 3, 2, 2)), (1, 1), "SAME", dimension_numbers=('
          '"NHWC", "HWIO", "NHWC"))\n'
          'print(float(y.sum()))\n')
  env = dict(os.environ, MIXMO_ONEDNN_CONV='1', JAX_PLATFORMS='cpu',
             CXX='false', MIXMO_CACHE_DIR=str(tmp_path))
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                       check=True, capture_output=True, text=True, timeout=120)
  lines = out.stdout.split('\n')
  assert lines[0] == 'False False'
  # Window pixels inside the image, summed over the 16 outputs: 4 corners
  # of 4, 8 edges of 6, 4 interior of 9; times Ci = 2 and Co = 2.
  assert float(lines[1]) == (4 * 4 + 8 * 6 + 4 * 9) * 2 * 2
  warnings = [l for l in out.stderr.splitlines() if 'MIXMO_ONEDNN_CONV' in l]
  expected = ('failed'
              if library.onednn_root() is not None else 'no oneDNN library')
  assert len(warnings) == 1 and expected in warnings[0], out.stderr
  assert list(tmp_path.iterdir()) == []
