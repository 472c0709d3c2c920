"""CPU smoke tests of the speed scripts (they must not rot; no timings)."""
import os
import re
import subprocess
import sys

from conftest import REPO, xla_flags


def _env(**extra):
  env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS='cpu', **extra)
  env['XLA_FLAGS'] = xla_flags(1)
  return env


def test_device_check_tiny_prints_the_table():
  out = subprocess.run(['bash', 'experiments/device_check.sh'], cwd=REPO,
                       check=True, capture_output=True, text=True, timeout=300,
                       env=_env(DEVICE_CHECK_TINY='1',
                                DEVICE_CHECK_EPOCH_STEPS='2')).stdout
  for row in ('train img/s float32', 'train img/s bfloat16', 'MFU float32',
              'Cut-MixMo / MIMO step time', 'eval img/s',
              'peak device memory MB', 'synthetic epoch (2 steps) s'):
    assert row in out, (row, out)
  assert re.search(r'bit-identical reruns \(3 steps\) +yes', out), out
  # The AOT model's prediction beside the measurement (no target for a CPU:
  # it says so), and the compiled step's peak and kernels.
  assert re.search(
      r"step ms float32 +[0-9.]+ \(AOT lower bound: n/a, no "
      r"target for 'cpu'\)", out), out
  peak, kernels = re.search(
      r'AOT peak MB / kernels per step float32 +'
      r'([0-9]+) / ([0-9]+)', out).groups()
  assert int(kernels) > 0 and int(peak) >= 0


def test_op_profile_finds_the_forward_and_gradient_convolutions():
  """A conv layer's gradient step: its forward convolution (named by jax)
  and its weight-gradient convolution appear with opcode 'convolution', and
  the table prints."""
  import jax
  import jax.numpy as jnp
  from experiments import op_profile

  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jax.nn.relu(y)**2)

  fn = jax.jit(jax.value_and_grad(loss))
  w, x = jnp.ones((3, 3, 8, 8)), jnp.ones((4, 16, 16, 8))
  compiled = fn.lower(w, x).compile()
  known = op_profile.instructions(compiled.as_text())
  assert {op for op, _ in known.values()} >= {'convolution'}
  phases = [phase for op, phase in known.values() if op == 'convolution']
  assert len(phases) == 2 and 'fwd' in phases, known
  ops = op_profile.profile(lambda: jax.block_until_ready(compiled(w, x)),
                           compiled, steps=2)
  assert ops and all(op.name in known and op.ms >= 0 for op in ops)
  assert [op.ms for op in ops] == sorted((op.ms for op in ops), reverse=True)
  assert any(op.opcode == 'convolution' for op in ops)
  table = op_profile.format_table(ops, step_ms=1.0, top=3)
  assert table.splitlines()[0].split()[:2] == ['HLO', 'op']
  assert 'totals per opcode' in table and 'all HLO ops' in table


def test_conv_peer_computes_the_same_gradients_in_both_frameworks():
  """experiments/conv_peer.py: the jax step's gradients have the layer's
  shapes; with torch installed (`.[bench]`), torch's weight gradient of the
  same loss on the same data equals jax's."""
  import numpy as np
  from experiments import conv_peer
  gx, gw = conv_peer.jax_step(2, 4, 3)()
  assert gx.shape == (2, 4, 4, 3) and gw.shape == (3, 3, 3, 3)
  parts = conv_peer.jax_parts(2, 4, 3, 2)  # --parts, the stride-2 layer.
  assert parts['fwd']().shape == (2, 2, 2, 3)
  assert parts['dx']().shape == (2, 4, 4, 3)
  assert parts['dw']().shape == (3, 3, 3, 3)
  try:
    import torch
  except ImportError:
    return
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  w = 0.01 * rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
  tx = torch.tensor(x.transpose(0, 3, 1, 2))
  tw = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)  # OIHW
  y = torch.nn.functional.conv2d(tx, tw, padding=1)
  (0.5 * (y * y).sum()).backward()
  np.testing.assert_allclose(tw.grad.numpy().transpose(2, 3, 1, 0),
                             np.asarray(gw), rtol=1e-4, atol=1e-6)


def test_peer_process_steps_the_peer_in_a_child_and_reports_its_errors():
  """experiments/peer_process.py: the peer is built from the kwargs in
  another process, its step count persists between calls, time() returns
  the child's value, and a failing step raises with the child's traceback."""
  import pytest
  from experiments import peer_process
  env = dict(os.environ, PYTHONPATH=os.path.join(REPO, 'tests'))
  with peer_process.PeerProcess('peer_stub:CountingStep', cwd=REPO, env=env,
                                scale=0.25) as peer:
    about = peer.about()
    assert about.startswith('stub scale 0.25 pid ')
    assert int(about.split()[-1]) != os.getpid()
    peer.step()
    assert peer.time(4) == 4 * 0.25 + 1
    assert peer.time(2) == 2 * 0.25 + 5
  peer = peer_process.PeerProcess('peer_stub:CountingStep', cwd=REPO, env=env,
                                  scale=1.0, fail_at=2)
  peer.step()
  with pytest.raises(RuntimeError, match='planted failure at step 2'):
    peer.step()
