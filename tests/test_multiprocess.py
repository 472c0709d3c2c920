"""Two local processes with jax.distributed train together like one process.

Each process owns 4 of the 8 CPU devices and feeds only its half of every
global batch; the losses and parameters must match the single-process run on
8 devices (same global batch, same algorithm) up to float rounding.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import tiny_digits_config, xla_flags
import multiprocess_worker

STEPS = 3


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one():
  port = _free_port()
  # No persistent compilation cache in the workers: one process loading a
  # cached program while the other compiles its own has been seen to hang
  # their first collective.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(4),
             JAX_ENABLE_COMPILATION_CACHE='false')
  worker = os.path.join(os.path.dirname(__file__), 'multiprocess_worker.py')
  procs = [
      subprocess.Popen(
          [sys.executable, worker,
           str(port),
           str(i), '2',
           str(STEPS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True) for i in range(2)
  ]
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  assert sorted(o['process'] for o in outputs) == [0, 1]
  assert all(o['devices'] == 8 for o in outputs)
  assert outputs[0]['losses'] == outputs[1]['losses']

  losses, l1 = multiprocess_worker.run(tiny_digits_config(), STEPS)
  np.testing.assert_allclose(outputs[0]['losses'], losses, rtol=1e-4)
  np.testing.assert_allclose(outputs[0]['l1'], l1, rtol=1e-4)
