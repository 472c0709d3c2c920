#!/usr/bin/env bash
# One run over several GPU machines: one process per machine, each seeing all
# of its local GPUs; JAX connects them with jax.distributed (process 0 is the
# coordinator). Start this script on EVERY machine, with its own NODE_RANK:
#
#   machine 0:  NODE_RANK=0 bash experiments/launch/multi_node_gpu.sh
#   machine 1:  NODE_RANK=1 bash experiments/launch/multi_node_gpu.sh
#   ...
#
# Under SLURM, skip the three flags: `srun python -m mixmo_jax.main --multihost
# --config=... --workdir=...` (jax.distributed.initialize() reads SLURM's
# variables).
#
# Requirements:
#  * WORKDIR on storage every machine sees at the same path (NFS, or a
#    gs:// bucket): orbax writes checkpoints collectively, process 0 writes
#    config.json, TensorBoard events and the eval history.
#  * The same code, config and data on every machine; each process loads
#    only its slice of every batch.
#  * batch_size / b divisible by the total GPU count (NUM_NODES x GPUs per
#    node), checked at start-up. The global batch, learning rate and
#    BatchNorm batch do not depend on the device count.
#
# Preemption / crash: restart the same command on every machine; the run
# continues from the last checkpoint (bit for bit on the same topology with
# deterministic XLA ops, set below).
set -euo pipefail

# ---- placeholders ----------------------------------------------------------
COORDINATOR="${COORDINATOR:-CHANGE_ME_HOST0:12345}"   # host:port of machine 0
NUM_NODES="${NUM_NODES:-2}"
NODE_RANK="${NODE_RANK:?set NODE_RANK=0..NUM_NODES-1 on each machine}"
CONFIG="${CONFIG:-configs/cifar100.py:cut_mixmo+b4}"
WORKDIR="${WORKDIR:-CHANGE_ME_SHARED/runs/cifar100_cut_mixmo_b4/seed0}"
SEED="${SEED:-0}"
DATA_DIR="${DATA_DIR:-}"       # TFDS data_dir on every machine (or shared)
DETERMINISTIC="${DETERMINISTIC:-1}"
# ----------------------------------------------------------------------------

if [[ "$COORDINATOR$WORKDIR" == *CHANGE_ME* ]]; then
  echo "error: set COORDINATOR and WORKDIR (edit $0 or export them)" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
if [[ "$DETERMINISTIC" == 1 ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
fi
data_flag=()
[[ -n "$DATA_DIR" ]] && data_flag=(--config.data_dir="$DATA_DIR")

python -m mixmo_jax.main --config="$CONFIG" --config.seed="$SEED" \
  "${data_flag[@]}" --workdir="$WORKDIR" \
  --coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" \
  --process_id="$NODE_RANK" "$@"

# Evaluate once, from one machine, after training.
if [[ "$NODE_RANK" == 0 ]]; then
  python -m mixmo_jax.evaluate --workdir="$WORKDIR" --output="$WORKDIR/eval.json"
fi
