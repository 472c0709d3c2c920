"""Evaluation: metrics, the inference path, eval.json, CIFAR-C, figures.

    registry.py     the metric registry: name -> function + table facts
    metrics.py      array primitives (top-k, NLL, Brier, ECE, temperature
                    scaling, diversity, AUROC/AUPR, TACE, OOD scores), the
                    built-in metrics' registrations, the eval.json summary
    ood.py          out-of-distribution detection against registered sets
    inference.py    the ONE inference path: normalise, pad, shard, run
    runs.py         restoring runs from workdirs; members' predictions
    report.py       the test-set evaluation (eval.json) and its table
    corruptions.py  CIFAR-10-C / CIFAR-100-C aggregation
    plots.py        figures

This package imports neither training nor the method's training pieces.
"""
from mixmo_jax.evaluation import metrics  # noqa: F401  Registers built-ins.
