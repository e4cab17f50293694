#!/usr/bin/env bash
# The GPU checks as one prepared session of at most 10 minutes (one H100/H200 and its CPU cores):
#   1. det_step at COCO size (800): builtin fp32 against detectron2 fp32 (same weights), then
#      builtin with bf16 autocast;
#   2. det_data with nvJPEG batch decoding on the GPU;
#   3. gpu.py: WRN-28-10 on CIFAR-shaped data, every variant (bf16, channels_last, fused SGD,
#      torch.compile default / reduce-overhead (CUDA graphs) / max-autotune), share of bf16 peak;
#   4. gpu.py --model wide_resnet50_2: the step rate the ImageNet data path has to feed;
#   5. imagenet_data with that rate: PIL / torchvision / cv2 per worker x the CPU cores, and
#      DATALOADER.DECODE cuda (nvJPEG).
# Every step has its own time limit, so a slow one cannot take the others' time; the RESULT
# lines of all of them are repeated at the end. Logs go to $OUT (default output/gpu_suite).
#
#     bash benchmarks/gpu_suite.sh            # PYTHON=... to choose the interpreter
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-output/gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

run() {  # name, seconds, script and arguments
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)"
    timeout --kill-after=10 "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -e "Warning" -e "warnings.warn" "$OUT/$name.log" | tail -n 40
    [ $rc -eq 0 ] || echo "== $name ended with status $rc (124: its time limit)"
}

"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
run det_step_800_fp32 120 benchmarks/det_step.py --device cuda --size 800 --iters 5 --rows builtin,d2
run det_step_800_bf16 70 benchmarks/det_step.py --device cuda --size 800 --iters 5 --rows builtin --amp bf16
run det_data_gpu 60 benchmarks/det_data.py --gpu --images 100 --rounds 2
run gpu_wrn_28_10 210 benchmarks/gpu.py --time-budget 170
run gpu_wide_resnet50_2 75 benchmarks/gpu.py --model wide_resnet50_2 --steps 40 --warmup 10 \
    --variants bf16-cl-fused,compile --time-budget 40
rate=$(grep -h "^GPU_STEP_RATE" "$OUT/gpu_wide_resnet50_2.log" | awk '{print $3}' | tail -n 1)
run imagenet_data 50 benchmarks/imagenet_data.py --workers "$(nproc)" --gpu-rate "${rate:-0}" --rounds 3
echo "== all RESULT lines ($((SECONDS - start)) s in all)"
grep -h "^RESULT" "$OUT"/*.log
