"""COCO box evaluation time of a val5k-sized result set: ours against plain pycocotools.

Generates 5,000 images with 80 categories and about 40,000 ground-truth boxes, and
about 400,000 detections (jittered copies of the true boxes at several qualities,
duplicates and false positives, each with a score), writes the annotations as COCO
JSON, and times the whole evaluation from the annotation file to the AP numbers:
our evaluator (``wrn_det.detection.evaluation.evaluate_coco_results``, which also
computes the per-category table) and pycocotools' ``COCOeval``. The twelve summary
numbers must be identical, or the script fails. Goal: ours at least 5 times faster.

    python benchmarks/coco_eval.py [--images 5000] [--dets-per-image 80]
"""
import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_utils import result  # noqa: E402

GOAL = 5.0


def make_dataset(n_images: int, n_cats: int, boxes_per_image: int, dets_per_image: int, seed: int = 0):
    """Return (COCO annotation dict, list of detection dicts) drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    aid = 1
    for img_id in range(1, n_images + 1):
        w, h = int(rng.integers(400, 641)), int(rng.integers(400, 641))
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id:012d}.jpg"})
        k = int(rng.poisson(boxes_per_image))
        # box sizes spread over COCO's small, medium and large ranges
        bw = np.exp(rng.uniform(np.log(8), np.log(0.8 * w), k))
        bh = np.clip(bw * np.exp(rng.normal(0, 0.4, k)), 4, 0.9 * h)
        x = rng.uniform(0, w - bw)
        y = rng.uniform(0, h - bh)
        cats = rng.integers(1, n_cats + 1, k)
        crowd = rng.random(k) < 0.01
        for i in range(k):
            anns.append({"id": aid, "image_id": img_id, "category_id": int(cats[i]),
                         "bbox": [float(x[i]), float(y[i]), float(bw[i]), float(bh[i])],
                         "area": float(bw[i] * bh[i]), "iscrowd": int(crowd[i])})
            aid += 1
        m = dets_per_image
        src = rng.integers(0, max(k, 1), m) if k else np.zeros(m, dtype=int)
        noise = rng.choice([0.02, 0.08, 0.2, 0.5], m)
        fp = rng.random(m) < 0.3 if k else np.ones(m, dtype=bool)
        for j in range(m):
            if fp[j]:
                dw, dh = float(rng.uniform(8, w / 2)), float(rng.uniform(8, h / 2))
                box = [float(rng.uniform(0, w - dw)), float(rng.uniform(0, h - dh)), dw, dh]
                cat = int(rng.integers(1, n_cats + 1))
            else:
                i = src[j]
                s = noise[j]
                box = [float(x[i] + rng.normal(0, s) * bw[i]), float(y[i] + rng.normal(0, s) * bh[i]),
                       float(bw[i] * np.exp(rng.normal(0, s))), float(bh[i] * np.exp(rng.normal(0, s)))]
                cat = int(cats[i]) if rng.random() > 0.1 else int(rng.integers(1, n_cats + 1))
            score = float(np.clip(rng.beta(2, 2) * (0.5 if fp[j] else 1.0) + (0 if fp[j] else 0.3 * (1 - noise[j])), 0, 1))
            dets.append({"image_id": img_id, "category_id": cat, "bbox": [round(v, 2) for v in box],
                         "score": round(score, 5)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"class{c}", "supercategory": "none"} for c in range(1, n_cats + 1)]}
    return gt, dets


def pycocotools_stats(ann_file: str, dets: list) -> np.ndarray:
    """Return pycocotools' 12 summary numbers (fractions) for ``dets`` against ``ann_file``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def main() -> int:
    """Print the timing table and the goal line; returns 1 if the AP numbers differ."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--categories", type=int, default=80)
    p.add_argument("--boxes-per-image", type=float, default=8.0)
    p.add_argument("--dets-per-image", type=int, default=80)
    a = p.parse_args()

    from wrn_det.detection.evaluation import evaluate_coco_results

    gt, dets = make_dataset(a.images, a.categories, a.boxes_per_image, a.dets_per_image)
    with tempfile.TemporaryDirectory() as d:
        ann_file = os.path.join(d, "instances_val5k.json")
        with open(ann_file, "w") as f:
            json.dump(gt, f)
        print(f"{len(gt['images'])} images, {len(gt['categories'])} categories, "
              f"{len(gt['annotations'])} ground-truth boxes, {len(dets)} detections")
        # both evaluators add fields to the result dicts they load: each gets its own copy
        dets_ours, dets_ref = copy.deepcopy(dets), copy.deepcopy(dets)
        t0 = time.perf_counter()
        ours = evaluate_coco_results(ann_file, dets_ours, backend="faster_coco_eval")
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = pycocotools_stats(ann_file, dets_ref)
        t_ref = time.perf_counter() - t0
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    ours_ap = np.array([ours[k] for k in names])
    ref_ap = ref[:6] * 100
    print(f"{'evaluator':<36}{'seconds':>9}   " + "  ".join(f"{n:>6}" for n in names))
    print(f"{'pycocotools COCOeval':<36}{t_ref:>9.1f}   " + "  ".join(f"{v:6.3f}" for v in ref_ap))
    print(f"{'wrn_det (faster-coco-eval backend)':<36}{t_ours:>9.1f}   " + "  ".join(f"{v:6.3f}" for v in ours_ap))
    same = np.array_equal(np.round(ours_ap, 10), np.round(ref_ap, 10))
    print(f"AP numbers identical: {same} (largest difference {np.max(np.abs(ours_ap - ref_ap)):.2e})")
    speedup = t_ref / t_ours
    result("coco_eval_speedup_over_pycocotools", speedup, GOAL, note="AP identical" if same else "AP DIFFERS")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
