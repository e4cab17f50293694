"""Pictures of a COCO box evaluation: precision-recall curves, per-class AP, confusion matrix.

Every evaluation writes, beside ``coco_instances_results.json`` in its ``inference/``
folder:

* ``pr_curves.png``: precision against recall over all classes (the mean of the
  per-class curves, as COCO averages AP) at IoU 0.5 and 0.75;
* ``pr_curves_per_class.png``: the same two curves for every class;
* ``ap_per_class.png``: box AP (IoU 0.50:0.95) of every class, as bars;
* ``confusion_matrix.png``: for each ground-truth class, how many of its objects were
  matched (IoU >= 0.5, any class, score >= :data:`CONFUSION_SCORE`) by a detection of
  each class, how many were missed, and how many detections of the class matched no
  object (faster-coco-eval's ``PreviewResults.compute_confusion_matrix``);
* ``pr_data.json``: the numbers behind them, so ``tools/plot_logs.py RUN``
  can draw them again without the dataset.

The precision values are those COCO AP is computed from (101 recall points, all
areas, 100 detections per image). matplotlib draws; every file is written atomically.
"""
import logging
import math
import os
from typing import Dict, List, Optional

import numpy as np

from wrn_det.engine.fileio import read_json, save_figure, write_json
from wrn_det.engine.errors import WrnDetError

__all__ = ["CONFUSION_SCORE", "CONFUSION_IOU", "PLOT_FILES", "DATA_FILE", "plot_data_from_eval",
           "confusion_matrix", "write_evaluation_plots", "draw_evaluation_plots", "read_plot_data", "redraw",
           "find_plot_data"]

logger = logging.getLogger("wrn_det")

CONFUSION_SCORE = 0.5   # detections below this score are left out of the confusion matrix (as a demo would show)
CONFUSION_IOU = 0.5
PR_IOUS = (0.5, 0.75)
DATA_FILE = "pr_data.json"
PLOT_FILES = ("pr_curves.png", "pr_curves_per_class.png", "ap_per_class.png", "confusion_matrix.png")


def plot_data_from_eval(ev, class_names: List[str]) -> dict:
    """Return the curves and per-class AP of an accumulated COCOeval (pycocotools or faster-coco-eval).

    ``{"classes", "recall" (101 points), "precision": {"0.5": [per class: 101 values or
    null], "0.75": ...}, "ap": [per class AP in percent or null]}``; null where a class
    has no ground truth.
    """
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)  # (IoU, recall, class, area, max dets)
    ious = np.asarray(ev.params.iouThrs, dtype=np.float64)
    recall = [float(r) for r in ev.params.recThrs]
    out = {"classes": list(class_names), "recall": recall, "precision": {}, "ap": []}
    for t in PR_IOUS:
        i = int(np.argmin(np.abs(ious - t)))
        curves = []
        for k in range(len(class_names)):
            p = precision[i, :, k, 0, -1]
            curves.append(None if (p < 0).all() else [float(max(v, 0.0)) for v in p])
        out["precision"][str(t)] = curves
    for k in range(len(class_names)):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out["ap"].append(float(p.mean() * 100) if p.size else None)
    return out


def confusion_matrix(gt, results: List[dict], score: float = CONFUSION_SCORE, iou: float = CONFUSION_IOU) -> dict:
    """Return ``{"matrix": K x (K + 2) counts, "score", "iou"}``: rows are ground-truth classes (in category-id
    order), columns the predicted classes, then false positives and missed objects of the row's class.

    ``gt``: the annotation file, or faster-coco-eval's ``COCO`` object of it (read once for a run's evaluations).
    """
    import contextlib
    import io

    from faster_coco_eval import COCO
    from faster_coco_eval.extra import PreviewResults

    with contextlib.redirect_stdout(io.StringIO()):
        if not isinstance(gt, COCO):
            gt = COCO(gt)
        dt = gt.loadRes(results)
        preview = PreviewResults(gt, dt, iouType="bbox", iou_tresh=iou, min_score=score, useCats=False)
        matrix = np.asarray(preview.compute_confusion_matrix(), dtype=np.float64)
    # its rows and columns follow the file's category order; ours follow the category ids
    k = matrix.shape[0]
    order = list(np.argsort(list(gt.cats)))
    matrix = matrix[order][:, order + [k, k + 1]]
    return {"matrix": matrix.round().astype(int).tolist(), "score": score, "iou": iou}


def write_evaluation_plots(out_dir: str, ev, gt, results: List[dict], class_names: List[str]) -> List[str]:
    """Write ``pr_data.json`` and the pictures of one evaluation into ``out_dir``; returns the paths written.

    ``gt``: as :func:`confusion_matrix` takes it.
    """
    data = plot_data_from_eval(ev, class_names)
    data["confusion"] = confusion_matrix(gt, results)
    path = os.path.join(out_dir, DATA_FILE)

    write_json(path, data)
    return [path] + draw_evaluation_plots(data, out_dir)


def _check_curve(curve, n: int, where: str):
    if curve is None:
        return None
    if not isinstance(curve, list) or len(curve) != n or not all(isinstance(v, (int, float)) for v in curve):
        raise WrnDetError(f"{where}: expected a list of {n} numbers or null")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in curve):
        raise WrnDetError(f"{where}: precision values must lie in [0, 1]")
    return [float(v) for v in curve]


def read_plot_data(path: str) -> dict:
    """Return the checked contents of a ``pr_data.json``.

    Raises :class:`WrnDetError` naming the file and the entry for a missing file, bad
    JSON, a wrong type or size, or values out of range.
    """
    if not os.path.isfile(path):
        raise WrnDetError(f"{path} not found: run an evaluation first (it writes inference/{DATA_FILE})")
    data = read_json(path)
    if not isinstance(data, dict):
        raise WrnDetError(f"{path}: expected a JSON object, got {type(data).__name__}")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise WrnDetError(f"{path}: 'classes' must be a non-empty list of names")
    k = len(classes)
    recall = data.get("recall")
    if (not isinstance(recall, list) or not 2 <= len(recall) <= 10001
            or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in recall)):
        raise WrnDetError(f"{path}: 'recall' must be a list of recall points in [0, 1]")
    n = len(recall)
    precision = data.get("precision")
    if not isinstance(precision, dict):
        raise WrnDetError(f"{path}: 'precision' must be an object of curves per IoU threshold")
    checked = {}
    for t in PR_IOUS:
        curves = precision.get(str(t))
        if not isinstance(curves, list) or len(curves) != k:
            raise WrnDetError(f"{path}: precision['{t}'] must hold one curve per class ({k})")
        checked[str(t)] = [_check_curve(c, n, f"{path}: precision['{t}'][{i}]") for i, c in enumerate(curves)]
    ap = data.get("ap")
    if not isinstance(ap, list) or len(ap) != k or not all(
            v is None or (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 100) for v in ap):
        raise WrnDetError(f"{path}: 'ap' must hold one AP in [0, 100] (or null) per class")
    out = {"classes": classes, "recall": [float(v) for v in recall], "precision": checked, "ap": ap}
    conf = data.get("confusion")
    if conf is not None:
        m = conf.get("matrix") if isinstance(conf, dict) else None
        if (not isinstance(m, list) or len(m) != k or not all(isinstance(r, list) and len(r) == k + 2 for r in m)
                or not all(isinstance(v, int) and 0 <= v < 2 ** 53 for r in m for v in r)):
            raise WrnDetError(f"{path}: confusion['matrix'] must be {k} rows of {k + 2} non-negative counts")
        out["confusion"] = {"matrix": m, "score": float(conf.get("score", CONFUSION_SCORE)),
                            "iou": float(conf.get("iou", CONFUSION_IOU))}
    return out


def _mean_curve(curves: List[Optional[List[float]]]) -> Optional[np.ndarray]:
    rows = [c for c in curves if c is not None]
    return np.mean(np.asarray(rows), axis=0) if rows else None


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def draw_evaluation_plots(data: dict, out_dir: str) -> List[str]:
    """Draw the pictures of :data:`PLOT_FILES` from plot data (see :func:`read_plot_data`); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, recall = data["classes"], np.asarray(data["recall"])
    styles = {"0.5": "-", "0.75": "--"}
    written = []

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for t, curves in data["precision"].items():
        mean = _mean_curve(curves)
        if mean is not None:
            ax.plot(recall, mean, styles.get(t, "-"), label=f"IoU {t}: AP {mean.mean() * 100:.1f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall, all {len(classes)} classes")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower left")
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out_dir, "pr_curves.png")))

    cols = min(len(classes), 4 if len(classes) <= 16 else 8)
    rows = int(math.ceil(len(classes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False, sharex=True, sharey=True)
    for k, name in enumerate(classes):
        ax = axes[k // cols][k % cols]
        for t, curves in data["precision"].items():
            if curves[k] is not None:
                ax.plot(recall, curves[k], styles.get(t, "-"), label=f"IoU {t}")
        ap = data["ap"][k]
        ax.set_title(f"{name} (AP {ap:.1f})" if ap is not None else f"{name} (no objects)", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(True, alpha=0.3)
    for k in range(len(classes), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out_dir, "pr_curves_per_class.png")))

    order = sorted(range(len(classes)), key=lambda k: -1 if data["ap"][k] is None else data["ap"][k])
    fig, ax = plt.subplots(figsize=(6, max(2.0, 0.28 * len(classes) + 1)))
    values = [data["ap"][k] or 0.0 for k in order]
    ax.barh(range(len(order)), values, color="tab:blue")
    ax.set_yticks(range(len(order)), [classes[k] for k in order], fontsize=8 if len(classes) > 20 else 10)
    for y, v in enumerate(values):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.set(xlabel="box AP (IoU 0.50:0.95, %)", xlim=(0, 105), title="AP per class")
    fig.tight_layout()
    written.append(_save(fig, os.path.join(out_dir, "ap_per_class.png")))

    conf = data.get("confusion")
    if conf is not None:
        m = np.asarray(conf["matrix"], dtype=np.float64)
        k = len(classes)
        size = max(4.0, 0.45 * (k + 2) + 2)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)  # colour: share of the row
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        cols_names = classes + ["false positive", "missed"]
        ax.set_xticks(range(k + 2), cols_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        if k <= 30:
            for i in range(k):
                for j in range(k + 2):
                    if m[i, j]:
                        ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
        ax.axvline(k - 0.5, color="grey", lw=1)
        ax.set(xlabel="detected as", ylabel="ground truth")
        ax.set_title(f"confusion matrix (IoU >= {conf['iou']:g}, score >= {conf['score']:g})", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
        fig.tight_layout()
        written.append(_save(fig, os.path.join(out_dir, "confusion_matrix.png")))
    return written


def redraw(folder: str) -> List[str]:
    """Draw the pictures again from ``<folder>/pr_data.json``; returns their paths."""
    return draw_evaluation_plots(read_plot_data(os.path.join(folder, DATA_FILE)), folder)


def find_plot_data(run_dir: str) -> Dict[str, str]:
    """Return ``folder -> pr_data.json`` for every evaluation under ``<run_dir>/inference`` (one per test dataset)."""
    base = os.path.join(run_dir, "inference")
    found = {}
    for root, _dirs, files in os.walk(base):
        if DATA_FILE in files:
            found[root] = os.path.join(root, DATA_FILE)
    return dict(sorted(found.items()))
