#!/usr/bin/env bash
# Multi-instance Trainium training: one torchrun per trn1 node, one rank per NeuronCore.
# Submit from the repository root:
#   sbatch neuron/slurm.sh                                              # the knobs below
#   sbatch --nodes 4 neuron/slurm.sh yamls/pretrain/mamba2-2.7b.yaml --tp 8 --zero1 --dtype bfloat16
#   RUN_NAME=mamba-neuron-1234 sbatch neuron/slurm.sh ...               # continue run 1234 explicitly
# Arguments after the YAML go to neuron/train.py. Each job is a new run with its own CHECKPOINT_DIR
# (from the job id); a requeued job keeps its id and continues from the newest completed checkpoint
# there (--resume is added when one exists). The log is slurm-<job name>-<job id>.out in the folder
# sbatch was run from.
#SBATCH --job-name=mamba-neuron
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it forks CORES_PER_NODE ranks
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# ---- knobs (environment variables override) --------------------------------------------------
CONFIG=${1:-${CONFIG:-yamls/pretrain/mamba2-2.7b.yaml}}
CORES_PER_NODE=${CORES_PER_NODE:-32}      # NeuronCores: 32 on trn1.32xlarge (LNC=1)
DATA=${DATA:-/fsx/data/shards}            # a data.prepare output on the shared file system
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-mamba-neuron}-${SLURM_JOB_ID:-0}}  # the same after a requeue
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$PWD/checkpoints/$RUN_NAME}
COMPILE_CACHE=${COMPILE_CACHE:-$PWD/neuron-compile-cache}  # shared: compile once for all nodes
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}  # jobs sharing a node differ
VENV=${VENV:-/opt/aws_neuronx_venv_pytorch_2_7}           # the Neuron SDK venv (+ neuron/requirements.txt)
# -----------------------------------------------------------------------------------------------
set -euo pipefail
[ $# -gt 0 ] && shift
if [ ! -x "$VENV/bin/torchrun" ]; then  # before anything is written
  echo "neuron/slurm.sh: no torchrun in VENV=$VENV: set VENV to the Neuron SDK venv on trn1" \
       "(with neuron/requirements.txt installed)" >&2
  exit 2
fi
mkdir -p "$CHECKPOINT_DIR" "$COMPILE_CACHE"

NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
export FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1 FI_EFA_FORK_SAFE=1   # EFA between instances
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-64}

ARGS=(--data "$DATA" --checkpoint-dir "$CHECKPOINT_DIR" --compile-cache "$COMPILE_CACHE")  # neuronx-cc's --cache_dir
if compgen -G "$CHECKPOINT_DIR/step_*/done" > /dev/null; then
  ARGS+=(--resume)
fi
ARGS+=("$@")

echo "nodes=$NNODES x $CORES_PER_NODE NeuronCores, master=$MASTER_ADDR:$MASTER_PORT, config=$CONFIG," \
     "run=$RUN_NAME, checkpoint_dir=$CHECKPOINT_DIR"
srun --kill-on-bad-exit=1 bash -c \
  'exec "$0" --nnodes "$1" --nproc_per_node "$2" --node_rank "$SLURM_NODEID" --master_addr "$3" \
        --master_port "$4" "${@:5}"' \
  "$VENV/bin/torchrun" "$NNODES" "$CORES_PER_NODE" "$MASTER_ADDR" "$MASTER_PORT" \
  neuron/train.py "$CONFIG" "${ARGS[@]}"
