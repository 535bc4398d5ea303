#!/usr/bin/env bash
# Multi-node training: one `composer` launcher per node, each starting one rank per GPU.
#   sbatch slurm.sh                                        # the knobs below
#   sbatch --nodes 4 slurm.sh yamls/pretrain/mamba2-1.3b.yaml optimizer.lr=2e-4
# Requeued jobs (preemption, node failure, `scontrol requeue`) continue from the last checkpoint:
# autoresume finds it in SAVE_FOLDER on the shared file system, under the same run name.
#SBATCH --job-name=mamba
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it forks GPUS_PER_NODE ranks
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out

# ---- knobs (environment variables override) --------------------------------------------------
CONFIG=${1:-${CONFIG:-yamls/pretrain/mamba2-1.3b.yaml}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
SAVE_FOLDER=${SAVE_FOLDER:-$PWD/checkpoints/${SLURM_JOB_NAME:-mamba}}  # on the shared file system
DATA_REMOTE=${DATA_REMOTE:-}              # s3://, gs://, oci:// or a shared folder; empty: data.local
LOCAL_CACHE=${LOCAL_CACHE:-/tmp/${USER:-mamba}/mds-cache}  # node-local disk for streamed shards
MASTER_PORT=${MASTER_PORT:-29500}
VENV=${VENV:-$PWD/.venv}
# -----------------------------------------------------------------------------------------------
set -euo pipefail
[ $# -gt 0 ] && shift
mkdir -p runs/slurm "$SAVE_FOLDER"

NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-mamba}-${SLURM_JOB_ID:-0}}  # stable across requeues
# mamba/train.py gives each rank its own Triton cache under this node-local root: concurrent
# writes to one shared Triton cache corrupt compiled kernels in multi-node runs.
export TRITON_CACHE_ROOT=${TRITON_CACHE_ROOT:-/tmp/${USER:-mamba}/triton-${SLURM_JOB_ID:-0}}

OVERRIDES=(run_name="$RUN_NAME" save_folder="$SAVE_FOLDER" autoresume=true)
if [ -n "$DATA_REMOTE" ]; then
  OVERRIDES+=(data.remote="$DATA_REMOTE" data.local="$LOCAL_CACHE")
fi
OVERRIDES+=("$@")

echo "nodes=$NNODES x $GPUS_PER_NODE GPUs, master=$MASTER_ADDR:$MASTER_PORT, config=$CONFIG, run=$RUN_NAME"
srun --kill-on-bad-exit=1 bash -c \
  'exec "$0" --world_size "$1" --nproc "$2" --node_rank "$SLURM_NODEID" --master_addr "$3" \
        --master_port "$4" "${@:5}"' \
  "$VENV/bin/composer" "$((NNODES * GPUS_PER_NODE))" "$GPUS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" \
  mamba/train.py "$CONFIG" "${OVERRIDES[@]}"
