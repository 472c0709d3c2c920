"""MixMo, the method (paper Sec. 3, Appendix 6.3-6.7, Algorithm 1): read this first.

    registry.py   the mixing-block contract; register_mixing / get_mixing
    masks.py      binary masks [B, h, w]: the CutMix box rule, concatenations,
                  PatchUp, FMix, CowMask
    blocks.py     kappa ~ Dir(alpha), mask weights (eqs. 2, 7), the linear
                  fallback with probability 1 - p; sum, linear, cut, Table 2
    batch.py      batch repetition, member permutations (rho), partners,
                  member_batch (Algorithm 1's member inputs)
    pixel_mix.py  in-pixel CutMix / Mixup with MixMo (lambda') and the
                  single-network baselines' Mixup / CutMix
    schedule.py   the p schedule (Algorithm 1, lines 8-11)
    layers.py     the M stems with the mixing (M * sum_i w_i c_i(x_i)) and
                  the M heads
    loss.py       w_r (eq. 5), the MixMo loss (eq. 4), the l2 term

This package imports nothing else of mixmo_jax: backbones, data, training and
evaluation are built on it.
"""
from mixmo_jax.mixmo import blocks  # noqa: F401  Registers the built-in blocks.
from mixmo_jax.mixmo.registry import (UnknownMixingError, get_mixing,
                                      mixing_names, register_alias,
                                      register_mixing, sample_mixing_weights)

__all__ = [
    'UnknownMixingError',
    'get_mixing',
    'mixing_names',
    'register_alias',
    'register_mixing',
    'sample_mixing_weights',
]
