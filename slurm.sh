#!/usr/bin/env bash
# Multi-node training: one `composer` launcher per node, each starting one rank per GPU it was given
# (one CPU rank per node without GPUs). Submit from the repository root:
#   sbatch --gpus-per-node=8 slurm.sh                      # the knobs below, 8 GPUs on each of 2 nodes
#   sbatch --nodes 4 --gpus-per-node=8 slurm.sh yamls/pretrain/mamba2-1.3b.yaml optimizer.lr=2e-4
#   sbatch slurm.sh yamls/tiny.yaml                        # no GPUs asked: 1 CPU rank per node
#   RUN_NAME=mamba-1234 sbatch slurm.sh ...                # continue run mamba-1234 (job 1234) explicitly
# Each job is a new run: run name and SAVE_FOLDER come from the job id. A requeued job (preemption,
# node failure, `scontrol requeue`) keeps its id, so autoresume continues from its last checkpoint.
# The log is slurm-<job name>-<job id>.out in the folder sbatch was run from.
#SBATCH --job-name=mamba
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it forks RANKS_PER_NODE ranks
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# ---- knobs (environment variables override) --------------------------------------------------
CONFIG=${1:-${CONFIG:-yamls/pretrain/mamba2-1.3b.yaml}}
GPUS=${SLURM_GPUS_ON_NODE:-0}             # what the allocation gave: sbatch --gpus-per-node=N
RANKS_PER_NODE=${RANKS_PER_NODE:-$([ "$GPUS" -gt 0 ] 2>/dev/null && echo "$GPUS" || echo 1)}
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-mamba}-${SLURM_JOB_ID:-0}}  # the same after a requeue
SAVE_FOLDER=${SAVE_FOLDER:-$PWD/checkpoints/$RUN_NAME}            # on the shared file system
DATA_REMOTE=${DATA_REMOTE:-}              # s3://, gs://, oci:// or a shared folder; empty: data.local
# node-local disk for streamed shards, one folder per remote: a cache never serves another dataset
REMOTE_KEY=$(printf %s "$DATA_REMOTE" | sha256sum | cut -c1-16)
LOCAL_CACHE=${LOCAL_CACHE:-/tmp/${USER:-$(id -un)}/mds-cache/$REMOTE_KEY}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}  # jobs sharing a node differ
VENV=${VENV:-$PWD/.venv}
# -----------------------------------------------------------------------------------------------
set -euo pipefail
[ $# -gt 0 ] && shift
if [ ! -x "$VENV/bin/composer" ]; then
  echo "slurm.sh: no composer in VENV=$VENV: run 'make setup' in the repository and sbatch from there," \
       "or set VENV" >&2
  exit 2
fi

NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
# mamba/train.py gives each rank its own Triton cache under this node-local root: concurrent
# writes to one shared Triton cache corrupt compiled kernels in multi-node runs.
export TRITON_CACHE_ROOT=${TRITON_CACHE_ROOT:-/tmp/${USER:-$(id -un)}/triton-${SLURM_JOB_ID:-0}}

OVERRIDES=(run_name="$RUN_NAME" save_folder="$SAVE_FOLDER" autoresume=true)
if [ -n "$DATA_REMOTE" ]; then
  OVERRIDES+=(data.remote="$DATA_REMOTE" data.local="$LOCAL_CACHE")
fi
OVERRIDES+=("$@")

if [ "$GPUS" -gt 0 ] 2>/dev/null; then DEVICES="$RANKS_PER_NODE rank(s) on $GPUS GPUs"
else DEVICES="$RANKS_PER_NODE rank(s) on CPU (no GPUs in the allocation: sbatch --gpus-per-node=N)"; fi
echo "nodes=$NNODES x $DEVICES, master=$MASTER_ADDR:$MASTER_PORT, config=$CONFIG, run=$RUN_NAME," \
     "save_folder=$SAVE_FOLDER${DATA_REMOTE:+, data $DATA_REMOTE cached in $LOCAL_CACHE}"
srun --kill-on-bad-exit=1 bash -c \
  'exec "$0" --world_size "$1" --nproc "$2" --node_rank "$SLURM_NODEID" --master_addr "$3" \
        --master_port "$4" "${@:5}"' \
  "$VENV/bin/composer" "$((NNODES * RANKS_PER_NODE))" "$RANKS_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" \
  mamba/train.py "$CONFIG" "${OVERRIDES[@]}"
