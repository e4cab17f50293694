"""The real loops: ``tools/train_net.py`` on each engine, on JPEG files written in COCO's layout.

It writes ``--images`` photo-like JPEGs of 640x480 with seven boxes each as ``coco_2017_train``
(detectron2's layout under a temporary ``DETECTRON2_DATASETS``), then runs the user's command
on each engine in turn::

    tools/train_net.py --config-file wrn34_2_frcnn.yaml [--engine detectron2] SOLVER.MAX_ITER 40
        SOLVER.IMS_PER_BATCH 8 SOLVER.AMP.ENABLED True DATALOADER.NUM_WORKERS W DATASETS.TEST () ...

and reads back what each wrote: the median ``time`` and ``data_time`` per iteration of
``metrics.json`` (past the first logged window, which holds start-up and cuDNN's algorithm
search), the largest ``max_mem`` of ``log.txt`` and the wall time of the whole command. The
engine overhead beyond the bare step (``benchmarks/det_step.py``) shows here: data loading,
logging, the loop. Both engines train with ``SOLVER.AMP`` on, in ``--dtype`` (float16 with a
scaler by default; ``bfloat16``; ``none``: float32, as on a CPU, where detectron2's AMP trainer refuses to run).

    python benchmarks/device/loops.py [--iters 40] [--batch 8] [--workers 8] [--engines builtin,detectron2]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))

from bench_utils import result, write_photo_jpegs  # noqa: E402

GOAL_TRAIN = 1.3  # detectron2 time / builtin time per iteration (the GPU goal of the training step)


def write_coco(root: str, n: int, seed: int = 0) -> None:
    """Write ``n`` JPEGs of 640x480 and their instances file as ``root/coco/{train2017,annotations}``."""
    import random

    folder = os.path.join(root, "coco", "train2017")
    paths = write_photo_jpegs(folder, [(480, 640)] * n, seed=seed)
    rng = random.Random(seed)
    categories = coco_categories()
    images, annotations = [], []
    for i, path in enumerate(paths):
        images.append({"id": i + 1, "file_name": os.path.basename(path), "height": 480, "width": 640})
        for _ in range(7):
            w, h = rng.uniform(20, 300), rng.uniform(20, 200)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": rng.choice(categories)["id"],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    os.makedirs(os.path.join(root, "coco", "annotations"), exist_ok=True)
    with open(os.path.join(root, "coco", "annotations", "instances_train2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def coco_categories() -> list:
    """Return COCO's 80 categories (ids 1..90 and names) as detectron2 registers ``coco_2017_train`` with them.

    detectron2 refuses a ``coco_2017_*`` file whose class names differ from its own; without
    detectron2, names of our own with COCO's ids.
    """
    try:
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    except ImportError:
        ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
        return [{"id": i, "name": f"class{i}"} for i in ids]
    return [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c.get("isthing", 1)]


def run_engine(engine: str, a, data_root: str, out: str) -> dict:
    """Run train_net.py on ``engine``; returns {"time", "data_time", "max_mem", "wall", "rc"}."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", a.config,
           "--engine", engine, "SOLVER.MAX_ITER", str(a.iters), "SOLVER.IMS_PER_BATCH", str(a.batch),
           *(["SOLVER.AMP.ENABLED", "False"] if a.dtype == "none" else
             ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", a.dtype]), "DATALOADER.NUM_WORKERS", str(a.workers),
           "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100000",
           "INPUT.MIN_SIZE_TRAIN", f"({a.size},)", "SOLVER.WARMUP_ITERS", "0", "OUTPUT_DIR", out,
           *a.opts]
    if a.device:
        cmd += ["MODEL.DEVICE", a.device]
    env = dict(os.environ, DETECTRON2_DATASETS=data_root)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"{engine}: exit status {proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
        return {"rc": proc.returncode, "wall": wall}
    rows = []
    path = os.path.join(out, "metrics.json")
    if os.path.isfile(path):
        rows = [json.loads(x) for x in open(path) if x.strip()]
    rows = [r for r in rows if "time" in r]
    steady = rows[1:] or rows  # the first window holds start-up and cuDNN's algorithm search
    log = open(os.path.join(out, "log.txt")).read() if os.path.isfile(os.path.join(out, "log.txt")) else ""
    mems = [int(m) for m in re.findall(r"max_mem: (\d+)M", log)]
    return {"rc": 0, "wall": wall, "time": statistics.median(r["time"] for r in steady) if steady else float("nan"),
            "data_time": statistics.median(r.get("data_time", float("nan")) for r in steady) if steady else float("nan"),
            "max_mem": max(mems) if mems else float("nan")}


def main() -> int:
    """Run both engines and print one RESULT line each and their ratio; returns 0 (1 when a run failed)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="COCO-Detection/wrn34_2_frcnn.yaml")
    p.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], default=["builtin", "detectron2"])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=800, help="INPUT.MIN_SIZE_TRAIN (the images are 640x480)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "none"],
                   help="autocast dtype of both engines; none: float32 (detectron2's AMP trainer needs CUDA)")
    p.add_argument("--device", default="", help="MODEL.DEVICE (default: the config's, a GPU when present)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per engine")
    p.add_argument("opts", nargs="*", help="more KEY VALUE overrides for both engines")
    a = p.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_coco(tmp, a.images)
        print(f"{a.images} JPEGs of 640x480 written in {time.perf_counter() - t0:.1f} s; {a.iters} iterations of "
              f"{a.batch} images at short side {a.size}, {a.dtype} autocast, {a.workers} loader workers", flush=True)
        res = {}
        for engine in a.engines:
            r = run_engine(engine, a, tmp, os.path.join(tmp, f"out_{engine}"))
            res[engine] = r
            if r["rc"]:
                failed = True
                print(f"RESULT det_loop_{engine} failed (exit status {r['rc']})", flush=True)
                continue
            print(f"RESULT det_loop_{engine}_b{a.batch}_{a.dtype} time {r['time']:.4g} s/iter, data_time "
                  f"{r['data_time']:.4g} s, max_mem {r['max_mem']:.0f} MiB, wall {r['wall']:.1f} s (no goal)", flush=True)
        ours, d2 = res.get("builtin", {}), res.get("detectron2", {})
        if "time" in ours and "time" in d2:
            result(f"det_loop_d2_over_builtin_b{a.batch}_{a.dtype}", d2["time"] / ours["time"], GOAL_TRAIN)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
