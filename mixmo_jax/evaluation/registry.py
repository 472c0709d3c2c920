"""The metric registry: one table from a metric name to its function and facts.

A metric is a function `fn(log_probs [N, C], labels [N]) -> float` of the
ensemble's log-probabilities, plus ONE registration:

    def mean_confidence(log_probs, labels):
      return float(np.mean(np.exp(np.max(log_probs, axis=-1))))

    registry.register_metric('mean_confidence', mean_confidence,
                             title='conf', higher_is_better=True,
                             per_cell=True)

and every consumer picks it up:

* eval.json: `metrics.evaluation_metrics` -> result['ensemble'][name]
  (also in every eval_history.jsonl record of the training loop);
* the printed table (`report.format_table`), one column titled `title`;
* CIFAR-C (`corruptions.evaluate_corruptions`), when `per_cell`: per
  (corruption, severity) cell, per corruption, per severity and the mean over
  cells. The 'pooled' summary (all corrupted images at once) stays limited to
  the additive built-ins top1, top5, nll and ece;
* `experiments.summarize`, through `summary_metrics()`.

The built-ins (top1, top5, nll, ece, brier, auc, tace_mixmo,
tace_um) are registered by
`mixmo_jax.evaluation.metrics`, which the package `mixmo_jax.evaluation`
imports first (so importing this module through the package always finds
them). Registration order is the order of the table's columns. This module
imports nothing of mixmo_jax.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], float]
_NAME = re.compile(r'^[a-z][a-z0-9_]*$')
_FORMAT = re.compile(r'^\.(\d+)[fge]$')
# Keys that evaluation_metrics writes itself into result['ensemble'].
RESERVED = ('nll_c', 'ece_c', 'top1_c', 'brier_c', 'temperature')


@dataclasses.dataclass(frozen=True)
class MetricSpec:
  """A registered metric.

  Attributes:
    name: its eval.json key under 'ensemble' (lower case, digits, '_').
    fn: fn(log_probs [N, C] float64 ensemble log-probabilities, labels [N]
      int64) -> float (NaN where undefined: it is written as null).
    title: its column title in the printed table (<= 10 characters).
    fmt: format spec of its value in the table, e.g. '.4f'.
    higher_is_better: True for accuracies and AUCs, False for errors.
    per_cell: whether CIFAR-C computes it per (corruption, severity) cell.
    percent: whether `experiments.summarize` shows it x 100 (accuracies).
    decimals: decimals in `experiments.summarize` (default: from fmt, minus
      2 when percent).
  """
  name: str
  fn: MetricFn
  title: str
  fmt: str = '.4f'
  higher_is_better: bool = False
  per_cell: bool = False
  percent: bool = False
  decimals: int | None = None

  def summary_decimals(self) -> int:
    if self.decimals is not None:
      return self.decimals
    found = _FORMAT.match(self.fmt)
    if found is None:
      raise ValueError(f'format {self.fmt!r} has no precision')
    digits = int(found.group(1))
    return max(digits - 2, 0) if self.percent else digits


_REGISTRY: dict[str, MetricSpec] = collections.OrderedDict()


def register_metric(name: str, fn: MetricFn, *, title: str | None = None,
                    fmt: str = '.4f', higher_is_better: bool = False,
                    per_cell: bool = False, percent: bool = False,
                    decimals: int | None = None,
                    overwrite: bool = False) -> MetricSpec:
  """Registers metric `name` (see `MetricSpec`); returns its spec.

  Raises:
    ValueError: a bad name, title or format, a name taken (unless overwrite)
      or reserved, or a non-callable fn.
  """
  if not isinstance(name, str) or not _NAME.match(name):
    raise ValueError(f'metric name must match {_NAME.pattern}, got {name!r}')
  if name in RESERVED:
    raise ValueError(f'metric name {name!r} is reserved; reserved: '
                     f'{", ".join(RESERVED)}')
  if name in _REGISTRY and not overwrite:
    raise ValueError(f'metric {name!r} is already registered; pass '
                     'overwrite=True to replace it')
  if not callable(fn):
    raise ValueError(f'metric {name!r}: fn must be callable, got {fn!r}')
  title = name if title is None else title
  if not isinstance(title, str) or not 0 < len(title) <= 10:
    raise ValueError(f'metric {name!r}: title must be 1 to 10 characters, '
                     f'got {title!r}')
  if not isinstance(fmt, str) or not _FORMAT.match(fmt):
    raise ValueError(f"metric {name!r}: fmt must look like '.4f', got "
                     f'{fmt!r}')
  spec = MetricSpec(name, fn, title, fmt, bool(higher_is_better),
                    bool(per_cell), bool(percent), decimals)
  _REGISTRY[name] = spec
  return spec


def metric_specs() -> tuple[MetricSpec, ...]:
  """Every registered metric, in registration order (built-ins first)."""
  return tuple(_REGISTRY.values())


def get_metric(name: str) -> MetricSpec:
  """The spec registered as `name`; ValueError listing the known names."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f'unknown metric {name!r}; allowed: '
                     f'{", ".join(_REGISTRY)}') from None


def cell_metrics() -> tuple[MetricSpec, ...]:
  """The metrics CIFAR-C computes per (corruption, severity) cell."""
  return tuple(s for s in metric_specs() if s.per_cell)


def compute(
    log_probs: np.ndarray, labels: np.ndarray,
    specs: tuple[MetricSpec, ...] | None = None) -> dict[str, float | None]:
  """{name: fn(log_probs, labels)} over `specs` (default: all registered);
  NaN / inf values become None (strict JSON)."""
  log_probs = np.asarray(log_probs, np.float64)
  labels = np.asarray(labels, np.int64)
  out = {}
  for spec in metric_specs() if specs is None else specs:
    value = float(spec.fn(log_probs, labels))
    out[spec.name] = value if math.isfinite(value) else None
  return out


def summary_metrics() -> dict[str, MetricSpec]:
  """name -> spec of every registered metric, for `experiments.summarize`:
  its column title (`title`), whether it is shown x 100 (`percent`), its
  decimals (`summary_decimals()`) and `higher_is_better`."""
  return collections.OrderedDict((s.name, s) for s in metric_specs())
