#!/usr/bin/env bash
# One-table check of a single accelerator (GPU/TPU), <= 8 minutes on one GPU:
# WRN-28-10 M=2 b=4 train throughput (float32, bfloat16), Cut-MixMo / MIMO
# step-time ratio, eval images/s, MFU, peak memory, bit-identical reruns and
# one synthetic CIFAR-shaped epoch. Random data: no dataset needed.
#
#   bash experiments/device_check.sh            # full (accelerator)
#   DEVICE_CHECK_TINY=1 bash experiments/device_check.sh   # WRN-10-1, CPU, <1 min
#
# Env: PYTHON (default python), DEVICE_CHECK_TIMEOUT seconds (default 480),
# DEVICE_CHECK_EPOCH_STEPS (default: one epoch, 50k * b / batch steps),
# XLA_FLAGS (added to mixmo_jax.platform's defaults; yours win).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout "${DEVICE_CHECK_TIMEOUT:-480}" "${PYTHON:-python}" \
  -m experiments.device_check "$@"
