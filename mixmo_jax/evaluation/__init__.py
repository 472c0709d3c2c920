"""Evaluation: metrics, the inference path, eval.json, CIFAR-C, figures.

    metrics.py      array primitives (top-k, NLL, Brier, ECE, temperature
                    scaling, diversity) and the eval.json metrics summary
    inference.py    the ONE inference path: normalise, pad, shard, run
    runs.py         restoring runs from workdirs; members' predictions
    report.py       the test-set evaluation (eval.json) and its table
    corruptions.py  CIFAR-10-C / CIFAR-100-C aggregation
    plots.py        figures

This package imports neither training nor the method's training pieces.
"""
