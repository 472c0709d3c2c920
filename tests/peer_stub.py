"""A stand-in benchmark peer for tests/test_benchmark.py (no torch needed).

Its answers are made from its constructor arguments and its step count, so
the test can tell they went through the child process unchanged.
"""
import os


class CountingStep:
  """time(n) = n * scale + steps taken so far; fails when asked to."""

  def __init__(self, scale: float, fail_at: int = -1):
    self.scale, self.fail_at, self.steps = scale, fail_at, 0

  def about(self) -> str:
    return f'stub scale {self.scale} pid {os.getpid()}'

  def step(self) -> None:
    print('a chatty peer')  # Must not reach the protocol's stdout.
    self.steps += 1
    if self.steps == self.fail_at:
      raise ValueError(f'planted failure at step {self.steps}')

  def time(self, steps: int) -> float:
    value = steps * self.scale + self.steps
    for _ in range(steps):
      self.step()
    return value
