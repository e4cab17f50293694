"""Plot a detection run's ``metrics.json``: losses and learning rate per iteration, box AP
(or, for an RPN-only run, proposal recall); and draw its evaluation pictures again.

    python -m wrn_det.detection.plot output/demo              # writes output/demo/curves.png
    python -m wrn_det.detection.plot output/demo -o demo.png

Every evaluation leaves ``inference/pr_data.json`` (``inference/<dataset>/`` with several
test datasets); from it the precision-recall curves, the per-class AP bars and the
confusion matrix are drawn again into the same folder (:mod:`wrn_det.detection.evaluation.plots`).
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List, Tuple

from wrn_det.engine.errors import WrnDetError, cli_main
from wrn_det.engine.fileio import save_figure

from .evaluation.plots import find_plot_data, redraw

__all__ = ["read_metrics", "eval_keys", "plot_run"]

_LOSSES = ("total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc")
# evaluation metrics drawn, with or without a "<dataset>/" prefix (several test datasets)
_EVAL = ("bbox/AP", "bbox/AP50", "bbox/AP75", "box_proposals/AR@100", "box_proposals/AR@1000")


def read_metrics(path: str) -> List[dict]:
    """Return the JSON objects of a ``metrics.json`` (a file, or the run folder holding it), in file order."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise WrnDetError(f"{path} not found: expected a detection run folder or its metrics.json")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise WrnDetError(f"{path}, line {n}: not a JSON object; expected one object per line")
            rows.append(row)
    return rows


def _series(rows: List[dict], key: str) -> Tuple[List[int], List[float]]:
    # a resumed run appends to metrics.json; the last value logged for an iteration wins
    last: Dict[int, float] = {}
    for r in rows:
        it, v = r.get("iteration"), r.get(key)
        # rows of another shape (a hand-edited or foreign file) are skipped, not a traceback
        if isinstance(it, int) and not isinstance(it, bool) and isinstance(v, (int, float)) and not isinstance(v, bool) \
                and math.isfinite(v):
            last[it] = float(v)
    its = sorted(last)
    return its, [last[i] for i in its]


def eval_keys(rows: List[dict]) -> List[str]:
    """Return the evaluation metrics of ``rows`` to draw: box AP, AP50, AP75 and proposal AR@100, AR@1000,
    under any dataset prefix, sorted."""
    return sorted({k for r in rows for k in r if any(k == e or k.endswith("/" + e) for e in _EVAL)})


def plot_run(path: str, output: str = "") -> str:
    """Write a PNG with losses, learning rate and ``bbox/AP*`` (or ``box_proposals/AR@*``) of the run at
    ``path``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    run_dir = path if os.path.isdir(path) else os.path.dirname(path)
    output = output or os.path.join(run_dir, "curves.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k in _LOSSES:
        x, y = _series(rows, k)
        if x:
            axes[0].plot(x, y, label=k)
    axes[0].set(xlabel="iteration", ylabel="loss (median of 20 iterations)", yscale="log", title="losses")
    axes[0].legend(fontsize=8)
    x, y = _series(rows, "lr")
    axes[1].plot(x, y)
    axes[1].set(xlabel="iteration", ylabel="learning rate", title="learning rate")
    keys = eval_keys(rows)
    for k in keys:
        x, y = _series(rows, k)
        if x:
            axes[2].plot(x, y, marker="o", label=k)
    recall_only = bool(keys) and all("box_proposals/" in k for k in keys)
    axes[2].set(xlabel="iteration", ylabel="proposal recall (%)" if recall_only else "COCO AP (%)",
                title="proposal recall" if recall_only else "box AP", ylim=(0, 100))
    if keys:
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, output, dpi=100)
    plt.close(fig)
    return output


def main(argv=None) -> None:
    """Command line: plot one run folder (or metrics.json) into a PNG, and redraw its evaluation pictures."""

    p = argparse.ArgumentParser(description="Plot losses, learning rate and box AP of a detection run, and draw "
                                            "its evaluation pictures (precision-recall, AP per class, confusion) again")
    p.add_argument("run", help="output folder of tools/train_net.py, or its metrics.json")
    p.add_argument("-o", "--output", default="", help="PNG path (default: <run>/curves.png)")
    args = p.parse_args(argv)
    run_dir = args.run if os.path.isdir(args.run) else os.path.dirname(args.run)
    evaluations = find_plot_data(run_dir) if os.path.isdir(args.run) else {}
    metrics = args.run if not os.path.isdir(args.run) else os.path.join(args.run, "metrics.json")
    if os.path.isfile(metrics) or not evaluations:
        print(f"wrote {plot_run(args.run, args.output)}")
    for folder in evaluations:
        print(f"wrote {', '.join(redraw(folder))}")


if __name__ == "__main__":
    sys.exit(cli_main(main))
