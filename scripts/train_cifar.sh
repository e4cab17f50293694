#!/usr/bin/env bash
# Train on CIFAR with the original code's environment variables (szagoruyko/wide-residual-networks,
# scripts/train_cifar.sh), e.g.
#
#   model=wide-resnet widen_factor=4 depth=40 ./scripts/train_cifar.sh
#   model=wide-resnet widen_factor=10 depth=28 dropout=0.3 dataset=./datasets/cifar100_whitened.t7 ./scripts/train_cifar.sh
#   model=resnet-pre-act depth=164 nGPU=2 ./scripts/train_cifar.sh SOLVER.IMS_PER_BATCH 128
#
# Variables (defaults of the original train.lua):
#   model         wide-resnet | resnet-pre-act | vgg | nin                  (wide-resnet)
#   depth         network depth; wide-resnet: 6n+4, resnet-pre-act: 9n+2     (28 / 164)
#   widen_factor  k of WRN-d-k                                                (1)
#   dropout       dropout inside residual blocks                              (0)
#   dataset       the original .t7 path; only its name is used: "cifar100" picks CIFAR-100,
#                 "whitened" picks GCN + ZCA preprocessing (else meanstd), and its folder is
#                 DATASETS.ROOT, holding cifar-10-batches-py/ or cifar-100-python/
#                                                        (./datasets/cifar10_whitened.t7)
#   save          output folder                          (logs/${model}_${RANDOM}${RANDOM})
#   nGPU          processes (GPUs)                       (1)
#   batchSize, weightDecay                               (128, 0.0005)
# As in the original script, the schedule is fixed: lr 0.1, x0.2 at epochs 60, 120, 160 of 200,
# Nesterov momentum, reflection-padded random crops. Trailing KEY VALUE arguments override any
# config key (see tools/train_cls.py).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python=python3

model="${model:-wide-resnet}"
widen_factor="${widen_factor:-1}"
dropout="${dropout:-0}"
dataset="${dataset:-./datasets/cifar10_whitened.t7}"
nGPU="${nGPU:-1}"
batchSize="${batchSize:-128}"
weightDecay="${weightDecay:-0.0005}"

# the config keys are floats: "dropout=0" must reach them as 0.0
as_float() { case "$1" in *.*|*e*|*E*) echo "$1" ;; *) echo "$1.0" ;; esac; }
dropout="$(as_float "$dropout")"
weightDecay="$(as_float "$weightDecay")"

case "$model" in
  wide-resnet)    name="wrn_${depth:-28}_${widen_factor}" ;;
  resnet-pre-act) name="preact_resnet${depth:-164}" ;;
  vgg)            name="vgg_cifar" ;;
  nin)            name="nin" ;;
  *) echo "error: model=$model is not one of wide-resnet, resnet-pre-act, vgg, nin" >&2; exit 2 ;;
esac

base="$(basename "$dataset")"
case "$base" in
  *cifar100*) dsname=cifar100; classes=100 ;;
  *)          dsname=cifar10;  classes=10 ;;
esac
case "$base" in
  *whitened*) preprocess=zca ;;
  *)          preprocess=meanstd ;;
esac
if [ -d "$dataset" ]; then root="$dataset"; else root="$(dirname "$dataset")"; fi

save="${save:-logs/${model}_${RANDOM}${RANDOM}}"
mkdir -p "$save"

exec "$python" "$repo/tools/train_cls.py" --num-gpus "$nGPU" \
  --config-file "$repo/configs/classification/Base-CIFAR.yaml" \
  MODEL.NAME "$name" MODEL.NUM_CLASSES "$classes" MODEL.DROPOUT "$dropout" \
  DATASETS.NAME "$dsname" DATASETS.ROOT "$root" INPUT.PREPROCESS "$preprocess" \
  SOLVER.BASE_LR 0.1 SOLVER.STEPS "(60, 120, 160)" SOLVER.EPOCHS 200 SOLVER.GAMMA 0.2 SOLVER.NESTEROV True \
  SOLVER.IMS_PER_BATCH "$batchSize" SOLVER.WEIGHT_DECAY "$weightDecay" \
  OUTPUT_DIR "$save" "$@"
