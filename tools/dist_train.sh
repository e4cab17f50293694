#!/usr/bin/env bash
# Distributed training with torchrun (one process per GPU; gloo on CPU-only machines).
#
# One machine, 8 GPUs:
#   tools/dist_train.sh configs/COCO-Detection/wrn34_2_frcnn.yaml 8
# Two machines with 8 GPUs each (run on both; MASTER_ADDR is machine 0's address):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/dist_train.sh wrn34_2_frcnn.yaml 8   # on machine 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 tools/dist_train.sh wrn34_2_frcnn.yaml 8   # on machine 1
# Flags of train_net.py come first, then KEY VALUE overrides:
#   tools/dist_train.sh wrn34_2_frcnn.yaml 8 --resume OUTPUT_DIR output/wrn34_2
#
# SOLVER.IMS_PER_BATCH is the global batch: each process takes IMS_PER_BATCH / (NNODES * procs).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG PROCS_PER_NODE [train_net.py flags] [KEY VALUE ...]" >&2
  exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$(dirname "$0")/train_net.py" --config-file "$CONFIG" "$@"
