"""One AOT case: the project's real train and evaluation steps compiled for
a target's devices, with what the compiled programs say about memory, work
and a speed bound.

    result = case.run(config, target, num_devices=8, dtype='bfloat16')

The steps are the ones training runs (`training.make_train_step`,
`inference.make_predict_fn`), lowered from shapes alone
(`training.abstract_train_state`): nothing executes, so the devices need
not exist.

The step's lower bound (seconds) is

  max(FLOPs / n / peak_flops[dtype],  kernel I/O bytes / HBM bandwidth)
  + 2 (n - 1) / n * all-reduced bytes / link bandwidth   (ring all-reduce)

for n devices: the work spread evenly, each kernel reading and writing HBM
once, the gradient all-reduce not overlapped; launch latencies, the
BatchNorm all-reduces' latency and imperfect kernels only add to it. The
run's bound multiplies it by the config's steps (epochs x |D| b / B).
"""
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp

from experiments.aot import flops as flops_lib
from experiments.aot import hlo
from experiments.aot import targets as targets_lib
from mixmo_jax import config_validation, data, models, sharding, training
from mixmo_jax.data import pipeline
from mixmo_jax.evaluation import inference

# jax's default share of an accelerator's memory that it preallocates
# (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_MEMORY_FRACTION = 0.75


def _steps_per_epoch(config) -> int:
  num_train = (
      config.num_train_examples or data.get_dataset(config.dataset).num_train)
  return pipeline.steps_per_epoch(config, num_train)


def train_inputs(config, mesh):
  """Shapes of the train step's batch arguments, sharded over 'data'."""
  shard = sharding.data_sharded(mesh)
  size, m = config.image_size, config.num_members
  unique = pipeline.unique_per_step(config)
  args = [
      jax.ShapeDtypeStruct((unique, size, size, 3), jnp.uint8, sharding=shard),
      jax.ShapeDtypeStruct((unique,), jnp.int32, sharding=shard)
  ]
  if pipeline.needs_partners(config):
    b = config.batch_size
    args += [
        jax.ShapeDtypeStruct((b, m, size, size, 3), jnp.uint8, sharding=shard),
        jax.ShapeDtypeStruct((b, m), jnp.int32, sharding=shard)
    ]
  return args


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  out = {
      'argument_bytes': stats.argument_size_in_bytes,
      'output_bytes': stats.output_size_in_bytes,
      'alias_bytes': stats.alias_size_in_bytes,
      'temp_bytes': stats.temp_size_in_bytes
  }
  # Live at once: the inputs, the outputs not written in place of an input
  # (the donated state), and the scratch. (The stats' own
  # peak_memory_in_bytes is 0 on the GPU path, so it is not used.)
  out['peak_bytes'] = (
      out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] +
      out['temp_bytes'])
  return out


def compile_train(config, mesh):
  """(compiled train step, its FLOP counts, gradient bytes)."""
  spe = _steps_per_epoch(config)
  model = models.get_model(config)
  state = training.abstract_train_state(config, model, spe, mesh)
  step = training.make_train_step(config, model, spe, mesh)
  args = train_inputs(config, mesh)
  counts = flops_lib.of(step, state, *args)
  grad_bytes = sum(x.size * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves(state.params))
  return step.lower(state, *args).compile(), counts, grad_bytes


def compile_eval(config, mesh):
  """The compiled evaluation forward pass at `config.eval_batch_size`."""
  model = models.get_model(config)
  state = training.abstract_train_state(config, model, 1, mesh)
  predict = inference.make_predict_fn(model, mesh, config.image_mean,
                                      config.image_std)
  size = config.image_size
  images = jax.ShapeDtypeStruct((config.eval_batch_size, size, size, 3),
                                jnp.uint8, sharding=sharding.data_sharded(mesh))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return predict.lower(variables, images).compile()


def bound_s(target: targets_lib.Target, dtype: str, num_devices: int,
            step_flops: float, kernel_io_bytes: float,
            reduce_bytes: float) -> dict[str, Any]:
  """The step's lower bound (module docstring) and what limits it.

  `reduce_bytes`: what the compiled step all-reduces per device (the
  gradients, in the compute dtype where XLA reduces them before casting
  them back to the float32 parameters, and the BatchNorm moments)."""
  compute = step_flops / num_devices / target.peak_flops[dtype]
  memory = kernel_io_bytes / target.hbm_bytes_per_s
  reduce = (2 * (num_devices - 1) / num_devices * reduce_bytes /
            target.link_bytes_per_s)
  return {
      'step_lower_bound_s': max(compute, memory) + reduce,
      'bound_by': 'compute' if compute >= memory else 'memory',
      'compute_s': compute,
      'memory_s': memory,
      'all_reduce_s': reduce
  }


def _train_figures(compiled, counts, grad_bytes, target, dtype: str,
                   num_devices: int) -> dict[str, Any]:
  """Memory, work, kernels, collectives and (with a target) the bound of a
  compiled train step (`compile_train`'s results)."""
  entry = hlo.entry_stats(compiled.as_text())
  out = dict(
      _memory(compiled), flops_per_step=counts['total'],
      conv_flops_per_step=counts['conv'], kernels_per_step=entry.kernels,
      kernel_kinds=entry.kernel_kinds, loop_collectives=entry.loop_collectives,
      kernel_io_bytes=entry.kernel_io_bytes, collectives=entry.collectives,
      gradient_bytes=grad_bytes)
  if target is not None:
    out.update(
        bound_s(target, dtype, num_devices, counts['total'],
                entry.kernel_io_bytes,
                entry.collectives.get('all-reduce', {}).get('bytes', 0)))
  return out


def predict(config, mesh, target=None) -> dict[str, Any]:
  """What the compiled train step of `config` on `mesh` (real devices or
  not) predicts: its peak bytes per device, kernels per step and, with a
  `target`, the step's lower bound. experiments/device_check.py prints it
  beside the measured figures."""
  return _train_figures(*compile_train(config, mesh), target,
                        config.model.get('dtype', 'float32'), mesh.devices.size)


def run(config, target: targets_lib.Target, num_devices: int, dtype: str,
        label: str = '', with_eval: bool = True) -> dict[str, Any]:
  """Compiles one case; a failure is reported in the result, not raised."""
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  result: dict[str, Any] = {
      'target': target.key,
      'devices': num_devices,
      'dtype': dtype,
      'config': label,
      'batch_size': config.batch_size,
      'compiled': False,
      'error': ''
  }
  problems = config_validation.problems(config, num_devices=num_devices)
  if problems:
    result['error'] = '; '.join(problems)
    return result
  start = time.perf_counter()
  try:
    mesh = sharding.make_mesh(targets_lib.devices(target, num_devices))
    compiled, counts, grad_bytes = compile_train(config, mesh)
  except Exception as e:
    result['error'] = (f'{type(e).__name__}: {e}'.splitlines() or [''])[0]
    result['traceback'] = traceback.format_exc(limit=-3)
    return result
  result['compile_s'] = round(time.perf_counter() - start, 1)
  result['compiled'] = True
  result.update(
      _train_figures(compiled, counts, grad_bytes, target, dtype, num_devices))
  steps = _steps_per_epoch(config) * config.num_epochs
  result['run_steps'] = steps
  result['run_lower_bound_h'] = result['step_lower_bound_s'] * steps / 3600
  result['fits_jax_default'] = (
      result['peak_bytes'] <= JAX_MEMORY_FRACTION * target.memory_bytes)
  if with_eval:
    result['eval_batch_size'] = config.eval_batch_size
    try:
      result['eval_peak_bytes'] = _memory(compile_eval(config,
                                                       mesh))['peak_bytes']
      result['eval_compiled'] = True
    except Exception as e:
      result['eval_compiled'] = False
      result['eval_error'] = (f'{type(e).__name__}: {e}'.splitlines() or
                              [''])[0]
  return result
