#!/usr/bin/env bash
# The one prepared GPU check of wrn-det, for a machine with torch, torchvision and the common packages but no
# package registry. Run from the repository root, with .whl/ (benchmarks/device/prepare.sh) carried along:
#
#     bash benchmarks/device/run.sh            # all of it, inside 8 minutes on one H100
#     bash benchmarks/device/run.sh --smoke    # every step at tiny sizes on whatever it finds, the CPU too (< 3 min)
#
# It installs .whl/ with no index into a target folder (WHL_TARGET, default /tmp/wrn_det_site), checks the
# imports, then runs each step under its own time limit, in order of what matters most, skipping a step whose
# limit no longer fits the total (TOTAL_S, default 465 s; 175 s with --smoke; LIMIT_SCALE=N multiplies every
# limit and the total, for a machine busy with other work):
#   check     correctness: one builtin training step each in fp32, bf16 and fp16 with the gradient scaler
#             (finite), builtin and detectron2 detections with the same weights, bf16 anchors equal to fp32's;
#   det_step  benchmarks/det_step.py at 800x1333 (COCO's training size), rows builtin, d2, builtin-r50,
#             torchvision, d2-r50, batch 2 and 8 per GPU, bf16 then fp32; fp16 with the scaler for builtin and d2;
#   loops     40 iterations of tools/train_net.py on each engine, batch 8, written JPEGs (time, data_time, max_mem);
#   profile   a torch.profiler table of 3 bf16 iterations of each engine and the GPU's idle share;
#   gpu       benchmarks/gpu.py: WRN-28-10 (fp32, bf16 + channels_last + fused SGD, compile), WRN-50-2, and
#             benchmarks/imagenet_data.py at the WRN-50-2 step rate;
#   det_data  benchmarks/det_data.py, and the loader workers the measured training rate needs (summary.py).
# RESULT lines are printed as each result arrives; with OUT set (the device tool's folder) they are also
# written to $OUT/results.txt and every step's whole output to $OUT/run.log as the run goes, so a run cut
# short still returns what it measured. Logs also go to output/device/ (LOG_DIR).
set -u
cd "$(dirname "$0")/../.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
SITE=${WHL_TARGET:-/tmp/wrn_det_site}
LOG_DIR=${LOG_DIR:-output/device}
RES_DIR=${OUT:-$LOG_DIR}
TOTAL_S=${TOTAL_S:-465}
[ $SMOKE = 1 ] && TOTAL_S=${SMOKE_TOTAL_S:-175}
# a machine shared with other work: every limit (and the budget) times LIMIT_SCALE
LIMIT_SCALE=${LIMIT_SCALE:-1}
TOTAL_S=$((TOTAL_S * LIMIT_SCALE))
mkdir -p "$LOG_DIR" "$RES_DIR"
RESULTS="$RES_DIR/results.txt"
RUNLOG="$RES_DIR/run.log"
: > "$RESULTS"
: > "$RUNLOG"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
start=$SECONDS
failed=""

if [ ! -f .whl/requirements.txt ]; then
    echo "error: .whl/requirements.txt not found: run benchmarks/device/prepare.sh first and carry .whl" >&2
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    --find-links .whl -r .whl/requirements.txt || { echo "error: installing .whl/ into $SITE failed" >&2; exit 2; }
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$RUNLOG" || { echo "error: wrn_det does not import" >&2; exit 2; }
import importlib, torch, torchvision
for name in ("fvcore", "iopath", "yacs", "pycocotools", "faster_coco_eval", "wrn_det", "wrn_det.detection.train",
             "wrn_det.classification"):
    importlib.import_module(name)
try:
    import detectron2.modeling, wrn_det.d2.train  # noqa: F401
    d2 = "detectron2 " + __import__("detectron2").__version__ + " (pure Python, no _C)"
except ImportError as e:
    d2 = f"no detectron2 ({e})"
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU: the CPU"
print(f"imports ok: torch {torch.__version__}, torchvision {torchvision.__version__}, {d2}; device: {dev}")
PYEOF
DEV=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
D2=$("$PY" -c "import detectron2.modeling" 2>/dev/null && echo 1 || echo 0)
echo "== $( [ $SMOKE = 1 ] && echo smoke run || echo full run ) on $DEV, budget ${TOTAL_S} s" | tee -a "$RUNLOG"

step() {  # NAME LIMIT_S COMMAND...: run it with its own time limit, RESULT lines as they come
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    local left=$((TOTAL_S - (SECONDS - start)))
    if [ "$left" -lt 10 ]; then
        echo "== $name skipped: ${left} s left of the ${TOTAL_S} s budget" | tee -a "$RUNLOG" "$RESULTS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)" | tee -a "$RUNLOG"
    local t0=$SECONDS
    # everything to the step's log and run.log, the RESULT lines to the console and results.txt as they come
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log" | tee -a "$RUNLOG" \
        | grep --line-buffered "^RESULT" | tee -a "$RESULTS"
    local rc=${PIPESTATUS[0]}
    if [ $rc -ne 0 ]; then
        echo "== $name ended with status $rc$( [ $rc -eq 124 ] && echo ' (its time limit)') after $((SECONDS - t0)) s" \
            | tee -a "$RUNLOG" "$RESULTS"
        failed="$failed $name"
    fi
}

DS="$PY benchmarks/det_step.py --device $DEV"
if [ $SMOKE = 1 ]; then
    SMALL="--config demo/shapes_wrn_frcnn.yaml"
    step check 40 $PY benchmarks/device/check.py --device $DEV --size 64 $SMALL
    step det_step_bf16 25 $DS --size 64 --batch 1 --iters 1 --amp bf16 --rows builtin,d2 $SMALL
    step det_step_fp32 30 $DS --size 64 --batch 1 --iters 1 --rows builtin,d2,builtin-r50,torchvision,d2-r50 $SMALL
    step det_step_fp16 20 $DS --size 64 --batch 1 --iters 1 --amp fp16 --rows builtin,d2 $SMALL
    # 5 iterations: detectron2 records no "time" for its first 3 (IterationTimer's warm-up)
    step loops 45 $PY benchmarks/device/loops.py --iters 5 --batch 2 --images 4 --size 64 --workers 0 \
        --config demo/shapes_wrn_frcnn.yaml --dtype "$( [ $DEV = cuda ] && echo bfloat16 || echo none)" \
        --engines builtin$( [ $D2 = 1 ] && echo ,detectron2) \
        MODEL.ROI_HEADS.NUM_CLASSES 80 INPUT.MAX_SIZE_TRAIN 96 LOG_PERIOD 1
    step profile 20 $PY benchmarks/device/profile_step.py --device $DEV --size 64 --batch 1 --iters 1 --row-limit 8 \
        $SMALL --rows builtin$( [ $D2 = 1 ] && echo ,d2)
    step gpu_wrn_28_10 15 $PY benchmarks/gpu.py --device $DEV --model wrn_10_1 --batch 8 --steps 2 --warmup 1 \
        --variants fp32,bf16-cl-fused
    step gpu_wide_resnet50_2 15 $PY benchmarks/gpu.py --device $DEV --model wide_resnet50_2 --batch 1 --steps 1 \
        --warmup 1 --variants fp32
    step det_data 15 $PY benchmarks/det_data.py --images 4 --rounds 1
    step summary 10 $PY benchmarks/device/summary.py "$RESULTS" "$LOG_DIR/det_data.log" --size 64 --batch 1
else
    step check 40 $PY benchmarks/device/check.py --device $DEV --size 800
    step det_step_bf16 90 $DS --size 800 --batch 2 8 --iters 2 --amp bf16
    step loops 90 $PY benchmarks/device/loops.py --iters 40 --batch 8 --workers "$(nproc)" --dtype bfloat16 \
        --engines builtin$( [ $D2 = 1 ] && echo ,detectron2)
    step profile 40 $PY benchmarks/device/profile_step.py --device $DEV --size 800 --batch 8 --iters 3
    step det_step_fp32 55 $DS --size 800 --batch 2 8 --iters 2
    step det_step_fp16 35 $DS --size 800 --batch 2 8 --iters 2 --amp fp16
    step gpu_wrn_28_10 60 $PY benchmarks/gpu.py --steps 100 --warmup 10 --variants fp32,bf16-cl-fused,compile \
        --time-budget 30
    step gpu_wide_resnet50_2 25 $PY benchmarks/gpu.py --model wide_resnet50_2 --steps 30 --warmup 5 \
        --variants bf16-cl-fused
    rate=$(grep -h "^GPU_STEP_RATE" "$LOG_DIR/gpu_wide_resnet50_2.log" 2>/dev/null | awk '{print $3}' | tail -n 1)
    step imagenet_data 20 $PY benchmarks/imagenet_data.py --workers "$(nproc)" --gpu-rate "${rate:-0}" --rounds 2
    step det_data 25 $PY benchmarks/det_data.py --images 100 --rounds 2 --gpu
    step summary 15 $PY benchmarks/device/summary.py "$RESULTS" "$LOG_DIR/det_data.log" --size 800 --batch 8
fi
echo "== done in $((SECONDS - start)) s; failed steps:${failed:- none}" | tee -a "$RUNLOG" "$RESULTS"
[ -z "$failed" ]
