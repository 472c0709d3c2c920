#!/usr/bin/env bash
# One MixMo training + evaluation on one GPU.
#
#   1. Install once (from the repository root):
#        python -m venv .venv && . .venv/bin/activate && pip install -e ".[cuda12]"
#   2. Fill in the placeholders below (or set them in the environment), then
#        bash experiments/launch/single_gpu.sh [extra --config.FIELD=VALUE flags]
#
# To reproduce a paper row, take its commands from
#   python -m experiments.run --table=1 --method=cut_mixmo --root=RUNS
# (CONFIG = the --config=... of the printed command, WORKDIR = its --workdir).
#
# Preemption / crash: rerun this very script. Training restores the last
# checkpoint in WORKDIR and continues the same run, bit for bit on the same
# GPU type (XLA deterministic ops, set below; unset DETERMINISTIC to trade
# that for a little speed).
set -euo pipefail

# ---- placeholders ----------------------------------------------------------
CONFIG="${CONFIG:-configs/cifar100.py:cut_mixmo+b4}"   # config file:variant
WORKDIR="${WORKDIR:-CHANGE_ME/runs/cifar100_cut_mixmo_b4/seed0}"
SEED="${SEED:-0}"
DATA_DIR="${DATA_DIR:-}"       # TFDS data_dir; empty = ~/tensorflow_datasets
GPU="${GPU:-0}"                # which GPU of the machine
DETERMINISTIC="${DETERMINISTIC:-1}"
# ----------------------------------------------------------------------------

if [[ "$WORKDIR" == *CHANGE_ME* ]]; then
  echo "error: set WORKDIR (edit $0 or export WORKDIR=...)" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

export CUDA_VISIBLE_DEVICES="$GPU"
if [[ "$DETERMINISTIC" == 1 ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
fi

data_flag=()
[[ -n "$DATA_DIR" ]] && data_flag=(--config.data_dir="$DATA_DIR")

python -m mixmo_jax.main --config="$CONFIG" --config.seed="$SEED" \
  "${data_flag[@]}" --workdir="$WORKDIR" "$@"
python -m mixmo_jax.evaluate --workdir="$WORKDIR" --output="$WORKDIR/eval.json"
# Logs:    tensorboard --logdir="$WORKDIR"
# Summary: python -m experiments.summarize --root=RUNS --table=1
