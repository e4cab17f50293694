"""Where a training step's time goes: a ``torch.profiler`` table of 3 iterations of each engine, and GPU idle time.

The rows of ``benchmarks/det_step.py`` (the same weights for both engines), bf16 autocast by
default, after two warm-up iterations; the table lists the operators by their own device time
(CPU time without CUDA). The GPU's idle share is 1 - (the union of its kernels' intervals) /
(the wall time of the 3 iterations, synchronised): the time the GPU waits for the host (Python,
launches, syncs, data preparation in the step). The profiler's own overhead counts as host time.

    python benchmarks/device/profile_step.py [--size 800] [--batch 8] [--rows builtin,d2] [--amp bf16]

Goal: the builtin step leaves the GPU idle less than 10% of the time.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import det_step  # noqa: E402
from bench_utils import result, sync  # noqa: E402

GOAL_IDLE = 0.10


def _busy_us(prof) -> float:
    """Return the microseconds during which at least one kernel (or device copy) ran."""
    spans = []
    for e in prof.events():
        if getattr(e, "device_type", None) is not None and e.device_type.name == "CUDA":
            spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, end = 0.0, float("-inf")
    for s, t in spans:
        if s > end:
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
    return busy


def main() -> int:
    """Print each engine's table and idle share; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rows", type=lambda s: [r for r in s.split(",") if r], default=["builtin", "d2"])
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    p.add_argument("--config", default=det_step.CONFIG)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--row-limit", type=int, default=25)
    a = p.parse_args()
    import logging

    logging.getLogger("wrn_det").setLevel(logging.WARNING)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    det_step.ROW_CONFIG[:] = [a.config]
    det_step.AMP["dtype"] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]

    def autocast():
        dtype = det_step.AMP["dtype"]
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else det_step.nullcontext()

    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    classes = min(load_config(get_det_cfg(), a.config, []).MODEL.ROI_HEADS.NUM_CLASSES, 80)
    rows = det_step.build_rows(a.rows, a.size, device, autocast)
    batch = det_step.make_inputs(a.batch, a.size, num_classes=classes)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for name, row in rows.items():
        for _ in range(2):
            row.train(batch)
        sync(device)
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(a.iters):
                row.train(batch)
            sync(device)
            wall = time.perf_counter() - t0
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(f"\n== {det_step.LABELS[name]}: {a.iters} training iterations of {a.batch} images at {a.size}, "
              f"{a.amp}, {wall:.3f} s (profiled)", flush=True)
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=a.row_limit), flush=True)
        except (AttributeError, KeyError):  # torch before 2.4 names it self_cuda_time_total
            print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else key, row_limit=a.row_limit))
        if cuda:
            idle = max(0.0, 1.0 - _busy_us(prof) / (wall * 1e6))
            if name == "builtin":
                result(f"det_gpu_idle_share_{name}_s{a.size}_b{a.batch}_{a.amp}", idle, GOAL_IDLE,
                       higher_is_better=False, unit="")
            else:
                print(f"RESULT det_gpu_idle_share_{name}_s{a.size}_b{a.batch}_{a.amp} {idle:.3g} (no goal)", flush=True)
        else:
            print(f"RESULT det_profile_{name}_s{a.size}_b{a.batch}_{a.amp} {wall / a.iters:.3g} s/iter "
                  "(profiled on the CPU: no GPU idle share)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
