"""One process of a multi-process CPU data-parallel run (test_multiprocess.py).

Usage: python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES STEPS
(with XLA_FLAGS giving each process its share of the devices). Prints one
JSON line: the train losses and the parameters' L1 norm. `run` is also called
in-process by the test for the single-process reference.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_digits_config  # noqa: E402  (sets XLA_FLAGS default)
import jax  # noqa: E402

from mixmo_jax import data, models, sharding, training  # noqa: E402
from mixmo_jax.data import pipeline  # noqa: E402


def run(config, num_steps):
  """Trains `num_steps` steps on the global mesh; returns losses, L1 norm."""
  mesh = sharding.make_mesh()
  model = models.get_model(config)
  state = training.create_train_state(config, model, 10, mesh)
  step_fn = training.make_train_step(config, model, 10, mesh)
  images, labels = data.load_split(config, 'train')
  n = pipeline.unique_per_step(config)
  local = pipeline.process_slice(n, jax.process_index(), jax.process_count())
  losses = []
  for step in range(num_steps):
    idx = pipeline.train_indices(config.seed, step, 320, n)[local]
    batch = sharding.global_batch((images[idx], labels[idx]), mesh)
    state, metrics = step_fn(state, *batch)
    losses.append(float(sharding.to_host(metrics['loss'])))
  params = sharding.to_host(state.params)
  l1 = float(sum(abs(x).sum() for x in jax.tree.leaves(params)))
  return losses, l1


if __name__ == '__main__':
  port, pid, nproc, steps = map(int, sys.argv[1:5])
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=nproc, process_id=pid)
  losses, l1 = run(tiny_digits_config(), steps)
  print(
      json.dumps({
          'process': jax.process_index(),
          'devices': jax.device_count(),
          'losses': losses,
          'l1': l1
      }), flush=True)
