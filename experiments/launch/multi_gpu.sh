#!/usr/bin/env bash
# Several GPUs in one machine. Two ways to use them:
#
# A) One run over all local GPUs (default). Nothing special: a single process
#    sees every GPU in CUDA_VISIBLE_DEVICES and shards the global batch over
#    them (jax.jit over a 'data' mesh). The global batch, the learning rate
#    and the BatchNorm batch do NOT change with the device count: the run is
#    the same algorithm as on one GPU (equal up to float rounding). The
#    unique samples per step, batch_size / b, must divide by the GPU count
#    (CIFAR: 64 / b = 64, 32, 16 -> 1, 2, 4, 8 or 16 GPUs; Tiny ImageNet:
#    100 / b = 100, 50, 25 -> e.g. 1, 2, 4 or 5 GPUs with b = 1). A bad
#    combination stops at start-up with a one-line message.
#
#       CONFIG=... WORKDIR=... bash experiments/launch/multi_gpu.sh
#
# B) A sweep: one run per GPU at a time, from a jobs file written by
#       python -m experiments.run --table=9 --root=RUNS --mode=jobs --jobs_file=jobs.txt
#    Each line of jobs.txt is `train && evaluate`; line i goes to GPU i mod N.
#    WRN-28-10 at batch 64 is small for a modern GPU, so this is usually the
#    faster way to reproduce a table. Afterwards run jobs_ensembles.txt (if
#    written) the same way, then `python -m experiments.summarize --root=RUNS`.
#
#       JOBS_FILE=jobs.txt NUM_GPUS=8 bash experiments/launch/multi_gpu.sh
#
# Preemption / crash: rerun the same command. Every training resumes from
# its last checkpoint (bit for bit on the same GPU type and count); finished
# trainings only reload and exit.
set -euo pipefail

# ---- placeholders ----------------------------------------------------------
CONFIG="${CONFIG:-configs/cifar100.py:cut_mixmo+b4}"
WORKDIR="${WORKDIR:-CHANGE_ME/runs/cifar100_cut_mixmo_b4/seed0}"
SEED="${SEED:-0}"
JOBS_FILE="${JOBS_FILE:-}"     # set for mode B
NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
LOG_DIR="${LOG_DIR:-logs}"
DETERMINISTIC="${DETERMINISTIC:-1}"
# ----------------------------------------------------------------------------

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ -n "$JOBS_FILE" ]] && JOBS_FILE="$(realpath "$JOBS_FILE")"
cd "$REPO"
if [[ "$DETERMINISTIC" == 1 ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
fi

if [[ -z "$JOBS_FILE" ]]; then
  if [[ "$WORKDIR" == *CHANGE_ME* ]]; then
    echo "error: set WORKDIR (or JOBS_FILE for a sweep)" >&2
    exit 2
  fi
  python -m mixmo_jax.main --config="$CONFIG" --config.seed="$SEED" \
    --workdir="$WORKDIR" "$@"
  python -m mixmo_jax.evaluate --workdir="$WORKDIR" --output="$WORKDIR/eval.json"
  exit 0
fi

if (( NUM_GPUS < 1 )); then
  echo "error: no GPU found; set NUM_GPUS" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"
for ((gpu = 0; gpu < NUM_GPUS; gpu++)); do
  (
    export CUDA_VISIBLE_DEVICES="$gpu"
    awk -v n="$NUM_GPUS" -v g="$gpu" 'NF && (NR - 1) % n == g' "$JOBS_FILE" |
      while IFS= read -r line; do
        echo "[gpu $gpu] $(date -u +%FT%TZ) start: $line"
        if bash -c "$line"; then
          echo "[gpu $gpu] done"
        else
          echo "[gpu $gpu] FAILED (exit $?): $line"
        fi
      done
  ) >"$LOG_DIR/gpu$gpu.log" 2>&1 &
done
echo "running $JOBS_FILE on $NUM_GPUS GPUs; logs in $LOG_DIR/gpu*.log"
wait
grep -h FAILED "$LOG_DIR"/gpu*.log || echo "all jobs finished"
