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
areas, 100 detections per image). matplotlib draws, through its object API (no pyplot), with
the many per-class parts as collections and plain texts rather than an axes or a tick each, so
that COCO's 80 classes take about as long as a few; every file is written atomically.
"""
import logging
import math
import os
from typing import Dict, List, Optional, Tuple

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
_STYLES = {"0.5": "-", "0.75": "--"}  # line style of each IoU threshold's curves
_DPI = 100


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


def _figure(width: float, height: float):
    """Return a matplotlib ``Figure`` of ``width`` x ``height`` inches on the Agg canvas.

    No pyplot: nothing global is touched (no figure manager, no backend switch), so drawing is
    safe in any thread and the figure is freed with its last reference.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    # zlib level 3: a third faster to encode than PIL's default 6, for files about 10% larger
    save_figure(fig, path, dpi=_DPI, pil_kwargs={"compress_level": 3})
    return path


def _text_size(fig, texts: List[str], fontsize: float) -> Tuple[float, float]:
    """Return the width and height in inches of the widest and tallest of ``texts`` at ``fontsize`` points."""
    from matplotlib.font_manager import FontProperties

    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=fontsize)
    sizes = [renderer.get_text_width_height_descent(t, prop, ismath=False)[:2] for t in set(texts)] or [(0.0, 0.0)]
    return max(w for w, _ in sizes) / fig.dpi, max(h for _, h in sizes) / fig.dpi


def _category_labels(ax, which: str, labels: List[str], fontsize: float, rotation: float = 0) -> float:
    """Name the rows (``which`` "y") or columns ("x") 0, 1, ... of ``ax`` beside its frame, as tick labels would.

    Plain texts: matplotlib builds and draws two lines and two texts for every tick. The axis
    label is moved clear of the names. Returns how far the names reach from the frame (inches).
    """
    width, height = _text_size(ax.figure, labels, fontsize)
    if which == "x":
        ax.set_xticks([])
        for i, name in enumerate(labels):
            ax.text(i, -0.01, name, transform=ax.get_xaxis_transform(), rotation=rotation, rotation_mode="anchor",
                    ha="right" if rotation else "center", va="top", fontsize=fontsize)
        angle = math.radians(rotation)
        reach = width * math.sin(angle) + height * math.cos(angle)
    else:
        ax.set_yticks([])
        for i, name in enumerate(labels):
            ax.text(-0.01, i, name, transform=ax.get_yaxis_transform(), ha="right", va="center", fontsize=fontsize)
        reach = width
    getattr(ax, f"{which}axis").labelpad = reach * 72 + 6  # points, from the frame when there are no tick labels
    return reach


def _margins(fig, left: float, bottom: float, right: float, top: float, **space) -> None:
    """Place the subplots ``left``/``bottom``/``right``/``top`` inches from the figure's edges.

    Fixed margins instead of ``tight_layout``, which draws the whole figure once more to measure it.
    """
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, bottom=bottom / h, right=1 - right / w, top=1 - top / h, **space)


def _draw_mean_curves(data: dict, path: str) -> str:
    classes, recall = data["classes"], np.asarray(data["recall"])
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    for t, curves in data["precision"].items():
        mean = _mean_curve(curves)
        if mean is not None:
            ax.plot(recall, mean, _STYLES.get(t, "-"), label=f"IoU {t}: AP {mean.mean() * 100:.1f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall, all {len(classes)} classes")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower left")
    _margins(fig, 0.7, 0.55, 0.2, 0.35)
    return _save(fig, path)


def _draw_per_class_curves(data: dict, path: str) -> str:
    """One panel per class, drawn as collections on one axes.

    A matplotlib ``Axes`` per class costs tens of milliseconds to build, lay out and draw (15 s
    for COCO's 80 classes with shared axes and ``tight_layout``), so the panels are laid out
    here: the frames, the grid lines and the curves of each IoU are one collection each, and
    each panel's title and the outer panels' tick labels are texts.
    """
    from matplotlib import rcParams
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    classes, recall = data["classes"], np.asarray(data["recall"], dtype=np.float64)
    n = len(classes)
    cols = min(n, 4 if n <= 16 else 8)
    rows = int(math.ceil(n / cols))
    fig = _figure(3 * cols, 2.6 * rows)
    # a panel is 1 x 1.02 (recall x precision) in data units, as the axes of one class would be; the
    # gaps hold the tick labels and titles (the figure's width is 3 inches a column, its height 2.6 a row)
    gx, gy, top = 0.2, 0.42, 1.02
    ax = fig.add_axes((0.45 / (3 * cols), 0.4 / (2.6 * rows), 1 - 0.5 / (3 * cols), 1 - 0.45 / (2.6 * rows)))
    ax.set_axis_off()
    ax.set(xlim=(-gx, cols * (1 + gx) - 0.5 * gx), ylim=(-0.08, rows * (top + gy) - gy + 0.22))
    origin = [((k % cols) * (1 + gx), (rows - 1 - k // cols) * (top + gy)) for k in range(n)]
    ticks = (0.0, 0.25, 0.5, 0.75, 1.0)
    frames, grid = [], []
    for x0, y0 in origin:
        frames.append([(x0, y0), (x0 + 1, y0), (x0 + 1, y0 + top), (x0, y0 + top), (x0, y0)])
        grid += [[(x0 + v, y0), (x0 + v, y0 + top)] for v in ticks[1:-1]]
        grid += [[(x0, y0 + v), (x0 + 1, y0 + v)] for v in ticks[1:]]
    ax.add_collection(LineCollection(grid, colors=rcParams["grid.color"], linewidths=0.8, alpha=0.3))
    handles = []
    for i, (t, curves) in enumerate(data["precision"].items()):
        segs = [np.column_stack([recall + x0, np.asarray(c) + y0]) for c, (x0, y0) in zip(curves, origin) if c is not None]
        style = _STYLES.get(t, "-")
        ax.add_collection(LineCollection(segs, colors=f"C{i}", linewidths=1.5, linestyles=style))
        handles.append(Line2D([], [], color=f"C{i}", lw=1.5, ls=style, label=f"IoU {t}"))
    ax.add_collection(LineCollection(frames, colors="black", linewidths=0.8))
    titles = [f"{name} (AP {ap:.1f})" if ap is not None else f"{name} (no objects)"
              for name, ap in zip(classes, data["ap"])]
    # a title may take the panel's width and most of the gap; a longer one gets a smaller font
    room = (1 + 0.8 * gx) * (ax.transData.transform((1, 0)) - ax.transData.transform((0, 0)))[0] / fig.dpi
    for k, ((x0, y0), title) in enumerate(zip(origin, titles)):
        width = _text_size(fig, [title], 9)[0]
        ax.text(x0 + 0.5, y0 + top + 0.04, title, ha="center", va="bottom",
                fontsize=9 if width <= room else max(4.0, 9 * room / width))
        # tick labels (0, 0.5, 1) on the outer panels, as axes sharing x and y show them
        if k % cols == 0:
            for v in ticks[::2]:
                ax.text(x0 - 0.03, y0 + v, f"{v:g}", ha="right", va="center", fontsize=8)
        if k + cols >= n:
            for v in ticks[::2]:
                ax.text(x0 + v, y0 - 0.04, f"{v:g}", ha="center", va="top", fontsize=8)
    x0, y0 = origin[0]
    ax.legend(handles=handles, fontsize=7, loc="lower left", bbox_to_anchor=(x0, y0), bbox_transform=ax.transData)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    return _save(fig, path)


def _draw_ap_bars(data: dict, path: str) -> str:
    from matplotlib.collections import PolyCollection

    classes = data["classes"]
    order = sorted(range(len(classes)), key=lambda k: -1 if data["ap"][k] is None else data["ap"][k])
    fig = _figure(6, max(2.0, 0.28 * len(classes) + 1))
    ax = fig.subplots()
    values = [data["ap"][k] or 0.0 for k in order]
    # the bars as one collection of rectangles (a patch each costs as much to draw as a text)
    ax.add_collection(PolyCollection([[(0, y - 0.4), (v, y - 0.4), (v, y + 0.4), (0, y + 0.4)]
                                      for y, v in enumerate(values)], facecolors="tab:blue", linewidths=0))
    ax.set_ylim(-0.4 - 0.05 * len(values), len(values) - 0.6 + 0.05 * len(values))
    names = _category_labels(ax, "y", [classes[k] for k in order], 8 if len(classes) > 20 else 10)
    for y, v in enumerate(values):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.set(xlabel="box AP (IoU 0.50:0.95, %)", xlim=(0, 105), title="AP per class")
    _margins(fig, names + 0.2, 0.55, 0.2, 0.35)
    return _save(fig, path)


def _draw_confusion(data: dict, path: str) -> str:
    classes, conf = data["classes"], data["confusion"]
    m = np.asarray(conf["matrix"], dtype=np.float64)
    k = len(classes)
    numbers = k <= 30
    # cells wide enough for their counts; without counts (many classes) as tall as a tick label
    size = max(4.0, 0.45 * (k + 2) + 2) if numbers else 0.2 * (k + 2) + 3
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)  # colour: share of the row
    # one quadrilateral per cell (an image would be resampled and coloured pixel by pixel), rows top down
    mesh = ax.pcolormesh(np.arange(k + 3) - 0.5, np.arange(k + 1) - 0.5, norm, cmap="Blues", vmin=0, vmax=1)
    ax.set(xlim=(-0.5, k + 1.5), ylim=(k - 0.5, -0.5), aspect="equal")
    below = _category_labels(ax, "x", classes + ["false positive", "missed"], 8, rotation=60)
    left = _category_labels(ax, "y", classes, 8)
    if numbers:
        for i in range(k):
            for j in range(k + 2):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.axvline(k - 0.5, color="grey", lw=1)
    ax.set(xlabel="detected as", ylabel="ground truth")
    ax.set_title(f"confusion matrix (IoU >= {conf['iou']:g}, score >= {conf['score']:g})", fontsize=10)
    _margins(fig, left + 0.45, below + 0.45, 0.9, 0.35)
    fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    return _save(fig, path)


def draw_evaluation_plots(data: dict, out_dir: str) -> List[str]:
    """Draw the pictures of :data:`PLOT_FILES` from plot data (see :func:`read_plot_data`); returns their paths."""
    written = [_draw_mean_curves(data, os.path.join(out_dir, "pr_curves.png")),
               _draw_per_class_curves(data, os.path.join(out_dir, "pr_curves_per_class.png")),
               _draw_ap_bars(data, os.path.join(out_dir, "ap_per_class.png"))]
    if data.get("confusion") is not None:
        written.append(_draw_confusion(data, os.path.join(out_dir, "confusion_matrix.png")))
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
