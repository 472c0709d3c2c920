#!/usr/bin/env bash
# One MixMo run on a Cloud TPU VM pod slice (default v4-32: 16 chips, 4 hosts).
#
#   bash experiments/launch/tpu_pod.sh create     # the TPU VM slice
#   bash experiments/launch/tpu_pod.sh setup      # code + Python env on all hosts
#   bash experiments/launch/tpu_pod.sh data       # TFDS dataset into the bucket, once
#   bash experiments/launch/tpu_pod.sh train      # start on every host (background)
#   bash experiments/launch/tpu_pod.sh logs       # tail host 0's log
#   bash experiments/launch/tpu_pod.sh status     # READY / PREEMPTED / ...
#   bash experiments/launch/tpu_pod.sh delete
#
# Every host runs the same command with --multihost: jax.distributed.initialize()
# finds the other hosts by itself on a TPU slice; each host feeds only its
# slice of every global batch. The global batch, learning rate and BatchNorm
# batch are those of the config, whatever the slice size, so the run is the
# same algorithm as on one GPU (equal up to float rounding). batch_size / b
# must divide by the number of TPU devices (v4-32: 16; CIFAR 64 / b = 64, 32,
# 16 works; Tiny ImageNet's 100 / b (50 or 25) does not divide by TPU device
# counts: run it on 1, 2, 5 or 10 GPUs, or change its batch size there).
# A run of the paper's recipe (batch 64) is small for a pod; for a sweep,
# one run per v4-8 is usually the better use of chips.
#
# WORKDIR is a GCS folder: orbax checkpoints, config.json, TensorBoard events
# and the eval history go there, so nothing is lost with the VMs. Watch it
# from anywhere with TensorBoard (needs tensorflow installed for gs://):
#   tensorboard --logdir=gs://BUCKET/mixmo
#
# Preemption (spot/preemptible slices) or any crash: recreate the slice if it
# is gone (create, setup), then run `train` again with the SAME settings. The
# run restores the last checkpoint from WORKDIR and continues, bit for bit on
# the same topology (same ACCELERATOR). Nothing else to do; a finished run
# only reloads and exits.
#
# Evaluation: after training, from any single-host machine with the package
# installed (a GPU box, a v4-8 TPU VM, or even a CPU for CIFAR):
#   python -m mixmo_jax.evaluate --workdir=$WORKDIR --output=$WORKDIR/eval.json
set -euo pipefail

# ---- placeholders ----------------------------------------------------------
PROJECT="${PROJECT:-CHANGE_ME_PROJECT}"
ZONE="${ZONE:-us-central2-b}"                 # a zone with v4 capacity
TPU_NAME="${TPU_NAME:-mixmo-v4-32}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"     # v4 software version (v5e: v2-alpha-tpuv5-lite)
SPOT="${SPOT:-0}"                             # 1: a cheaper, preemptible slice
BUCKET="${BUCKET:-CHANGE_ME_BUCKET}"          # gs://BUCKET, same region as ZONE
REPO_URL="${REPO_URL:-}"                      # git URL; empty: copy this checkout
CONFIG="${CONFIG:-configs/cifar100.py:cut_mixmo+b4}"
SEED="${SEED:-0}"
WORKDIR="${WORKDIR:-gs://$BUCKET/mixmo/run1}"
DATA_DIR="${DATA_DIR:-gs://$BUCKET/tensorflow_datasets}"
DATASET="${DATASET:-cifar100}"                # TFDS name for `data`
EXTRA_FLAGS="${EXTRA_FLAGS:-}"                # e.g. --config.model.dtype=bfloat16
PYTHON="${PYTHON:-python3.11}"                # the package needs Python >= 3.11
# ----------------------------------------------------------------------------

if [[ "$PROJECT$BUCKET" == *CHANGE_ME* ]]; then
  echo "error: set PROJECT and BUCKET (edit $0 or export them)" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# gcloud compute tpus tpu-vm COMMAND ARGS... --project --zone
tpu() { local cmd="$1"; shift; gcloud compute tpus tpu-vm "$cmd" "$@" --project="$PROJECT" --zone="$ZONE"; }
VENV='~/mixmo_venv'

on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }
on_host0() { tpu ssh "$TPU_NAME" --worker=0 --command="$1"; }

create() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${spot[@]}"
}

setup() {
  if [[ -n "$REPO_URL" ]]; then
    on_all "git clone $REPO_URL ~/mixmo_jax 2>/dev/null || git -C ~/mixmo_jax pull"
  else
    tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs \
      --exclude=__pycache__ -czf /tmp/mixmo_jax.tgz .
    tpu scp /tmp/mixmo_jax.tgz "$TPU_NAME":~/mixmo_jax.tgz --worker=all
    on_all "mkdir -p ~/mixmo_jax && tar -C ~/mixmo_jax -xzf ~/mixmo_jax.tgz"
  fi
  # Ubuntu 22.04 ships Python 3.10; add 3.11 (skip if your image has it).
  on_all "command -v $PYTHON >/dev/null || (sudo apt-get update -q && sudo apt-get install -yq ${PYTHON} ${PYTHON}-venv)"
  on_all "$PYTHON -m venv $VENV && $VENV/bin/pip install -q -U pip && cd ~/mixmo_jax && $VENV/bin/pip install -q -e '.[tpu]'"
  on_all "$VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count())'" || true
}

data() {
  # Prepare the dataset once, from one host, into the bucket; every host then
  # reads it with --config.data_dir (concurrent preparation would collide).
  on_host0 "cd ~/mixmo_jax && $VENV/bin/python -c \"import tensorflow_datasets as tfds; tfds.builder('$DATASET', data_dir='$DATA_DIR').download_and_prepare()\""
}

train() {
  # nohup: the run survives the ssh session; same command on every host.
  on_all "cd ~/mixmo_jax && nohup $VENV/bin/python -m mixmo_jax.main --multihost \
    --config=$CONFIG --config.seed=$SEED --config.data_dir=$DATA_DIR \
    --workdir=$WORKDIR $EXTRA_FLAGS > ~/mixmo_train.log 2>&1 &"
  echo "started on all hosts; logs: $0 logs; TensorBoard: tensorboard --logdir=$WORKDIR"
}

logs() { on_host0 "tail -n 40 ~/mixmo_train.log"; }
status() { tpu describe "$TPU_NAME" --format='value(state)'; }
delete() { tpu delete "$TPU_NAME" --quiet; }

case "${1:-}" in
  create|setup|data|train|logs|status|delete) "$1" ;;
  *) echo "usage: $0 create|setup|data|train|logs|status|delete" >&2; exit 2 ;;
esac
