"""What the host ships to the devices at each step.

The host only picks *which* samples a step uses, a pure function of
(seed, step) (`data.pipeline.train_indices`), and ships this process's slice
of them as uint8; everything random about the batch runs on device inside
the jitted step.
"""
import queue
import threading
import time

import jax

from mixmo_jax import sharding
from mixmo_jax.data import pipeline


class Feeder:
  """Builds the global arrays of each step from the training split.

  Args:
    config: the run's config.
    train_x: uint8 [N, H, W, 3], train_y: int32 [N], the training split.
    mesh: the training mesh.
  """

  def __init__(self, config, train_x, train_y, mesh):
    self.config = config
    self.train_x, self.train_y = train_x, train_y
    self.mesh = mesh
    self.num_unique = pipeline.unique_per_step(config)
    self.local = pipeline.process_slice(self.num_unique, jax.process_index(),
                                        jax.process_count())
    self.local_rows = pipeline.process_slice(
        self.num_unique * config.batch_repetitions, jax.process_index(),
        jax.process_count())

  def batch(self, step: int):
    """The step's arrays, sharded over 'data'.

    (images uint8 [U, H, W, 3], labels int32 [U]), followed, when the pixel
    mix takes partners (`pipeline.needs_partners`), by (partner_images
    uint8 [U * b, M, H, W, 3], partner_labels int32 [U * b, M]).
    """
    config = self.config
    idx = pipeline.train_indices(config.seed, step, len(self.train_y),
                                 self.num_unique)[self.local]
    images, labels = self.train_x[idx], self.train_y[idx]
    if not pipeline.needs_partners(config):
      return sharding.global_batch((images, labels), self.mesh)
    # One partner per (copy position, member), this process's rows of them.
    own = pipeline.train_indices(config.seed, step, len(self.train_y),
                                 self.num_unique)
    part = pipeline.partner_indices(config.seed, step, len(self.train_y), own,
                                    config.batch_repetitions,
                                    config.num_members)[self.local_rows]
    return sharding.global_batch(
        (images, labels, self.train_x[part], self.train_y[part]), self.mesh)


class Prefetcher:
  """Prepares and ships the batches of steps [start, stop) ahead, in order.

  A background thread calls `feeder.batch(step)` for consecutive steps and
  keeps up to `depth` of them ready, so the next step's host work and
  transfer overlap the current device step. `get(step)` returns
  (batch, seconds blocked waiting for it); an exception in the thread is
  raised by `get`; `close()` stops the thread (also on exit of a `with`).
  """

  def __init__(self, feeder, start: int, stop: int, depth: int = 2):
    if depth < 1:
      raise ValueError(f'prefetch depth must be >= 1, got {depth}.')
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._next = start
    self._thread = threading.Thread(target=self._run,
                                    args=(feeder, start, stop), daemon=True)
    self._thread.start()

  def _run(self, feeder, start, stop):
    try:
      for step in range(start, stop):
        item = (step, feeder.batch(step), None)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
    except BaseException as e:  # Re-raised by `get` in the main thread.
      self._queue.put((None, None, e))

  def get(self, step: int):
    """(the batch of `step`, seconds waited); steps must be consecutive."""
    if step != self._next:
      raise ValueError(f'Prefetcher expected step {self._next}, got {step}.')
    start = time.perf_counter()
    got, batch, error = self._queue.get()
    wait = time.perf_counter() - start
    if error is not None:
      raise error
    assert got == step, (got, step)
    self._next += 1
    return batch, wait

  def close(self):
    self._stop.set()
    while True:  # Unblock a pending put.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
