"""What the measured rates mean together: loader workers needed, and the builtin step's share of the bf16 peak.

Reads the RESULT lines run.sh gathered and the det_data.py log:

* ``det_data_workers_needed``: the builtin training rate (``det_step_builtin_s<size>_bf16_b<batch>``
  images/s) over one loader worker's rate (det_data.py's ``ours`` images/s), rounded up;
* ``det_train_share_of_bf16_peak``: that training rate x the detector's FLOPs per image
  (``tools/model_info.py``'s count: one multiply-add is one flop, as detectron2's; x2 for flops,
  x3 for forward and backward) over the card's dense bf16 peak (``benchmarks/gpu.py``'s table).

    python benchmarks/device/summary.py RESULTS_FILE DET_DATA_LOG [--size 800] [--batch 8]
"""
import argparse
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

GOAL_SHARE = 0.30


def _rate(results: str, name: str):
    m = re.search(rf"^RESULT {re.escape(name)} train ([0-9.eE+-]+) img/s", results, re.M)
    return float(m.group(1)) if m else None


def main() -> int:
    """Print the two RESULT lines (``none`` where an input is missing); returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results")
    p.add_argument("det_data_log")
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--config", default="COCO-Detection/wrn34_2_frcnn.yaml")
    a = p.parse_args()
    from bench_utils import result

    results = open(a.results).read() if os.path.isfile(a.results) else ""
    log = open(a.det_data_log).read() if os.path.isfile(a.det_data_log) else ""
    train = _rate(results, f"det_step_builtin_s{a.size}_bf16_b{a.batch}")
    m = re.search(r"^ours \(DetectionMapper[^\n]*?([0-9.]+) images/s", log, re.M)
    worker = float(m.group(1)) if m else None
    if train and worker:
        print(f"RESULT det_data_workers_needed {math.ceil(train / worker)} (builtin training {train:.1f} img/s, "
              f"one worker {worker:.1f} img/s)", flush=True)
    else:
        print("RESULT det_data_workers_needed none (a rate is missing)", flush=True)

    import torch

    if not torch.cuda.is_available():
        result("det_train_share_of_bf16_peak", None, GOAL_SHARE, unit="", note="no CUDA GPU")
        return 0
    from gpu import bf16_peak_tflops

    from wrn_det.detection.analysis import detector_gflops
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.modeling import build_detector
    from wrn_det.engine.config import load_config

    cfg = load_config(get_det_cfg(), a.config, ["MODEL.DEVICE", "cpu"])
    h, w = a.size, min(a.size * 4 // 3, 1333)
    gflops = detector_gflops(build_detector(cfg).eval(), cfg, h, w)["total"]
    peak = bf16_peak_tflops(torch.device("cuda"))
    if not (train and peak):
        result("det_train_share_of_bf16_peak", None, GOAL_SHARE, unit="", note="no training rate or unknown card")
        return 0
    share = train * 3 * 2 * gflops * 1e9 / (peak * 1e12)
    result("det_train_share_of_bf16_peak", share, GOAL_SHARE, unit="",
           note=f"{gflops:.0f} GFLOPs (multiply-adds) per {h}x{w} image, {train:.1f} img/s, peak {peak:.0f} TFLOPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
