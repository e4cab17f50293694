"""Training curves of both kinds of run: read a run, tell its kind, draw its figure (``tools/plot_logs.py``).

A run is an output folder (its ``metrics.json``), a ``metrics.json``, or a log whose lines
hold ``json_stats: {...}`` (the original code's logs, and the ``log.txt`` of ``tools/train_cls.py``).

* classification runs write one row per epoch (``epoch``, ``train_top1_err``, ``test_loss``
  ...; the original logs ``train_acc``, ``test_acc``, ``loss``): :func:`read_run` reduces
  them to error and loss per epoch and :func:`plot_classification` overlays several runs;
* detection runs write rows keyed by ``iteration`` alone (losses and learning rate every
  ``LOG_PERIOD``, the evaluation's ``bbox/AP*`` or ``box_proposals/AR@*``):
  :func:`plot_detection` draws one run's losses, learning rate and AP (or proposal recall).

:func:`run_kind` tells the two apart from the rows.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import WrnDetError
from .events import read_json_lines, read_metrics
from .fileio import save_figure

__all__ = ["CLASSIFICATION", "DETECTION", "CURVE_KEYS", "JSON_STATS_PREFIX", "read_run", "run_kind", "eval_keys",
           "plot_classification", "plot_detection"]

CLASSIFICATION, DETECTION = "classification", "detection"

#: How the original code's per-epoch log lines start (``train.lua``'s ``log``, ``pytorch/main.py``).
JSON_STATS_PREFIX = "json_stats: "

#: The per-epoch series a classification run is reduced to (errors in percent).
CURVE_KEYS = ("train_err", "test_err", "train_loss", "test_loss")

_LOSSES = ("total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc")
# evaluation metrics drawn, with or without a "<dataset>/" prefix (several test datasets)
_EVAL = ("bbox/AP", "bbox/AP50", "bbox/AP75", "box_proposals/AR@100", "box_proposals/AR@1000")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pct_err(acc) -> Optional[float]:
    # the original logs hold accuracies in percent
    return 100.0 - float(acc) if _number(acc) else None


def _normalise(row: dict, where: str = "") -> dict:
    """Map one per-epoch row of either format to ``{"epoch", "train_err", "test_err", "train_loss", "test_loss"}``.

    Values that are not finite numbers are left out (None); an ``epoch`` that is not a
    number raises :class:`WrnDetError` naming ``where``.
    """
    if not _number(row["epoch"]):
        raise WrnDetError(f"{where}: epoch is {row['epoch']!r:.40}; expected a number")
    out = {"epoch": float(row["epoch"])}
    out["train_err"] = row.get("train_top1_err", _pct_err(row.get("train_acc")))
    out["test_err"] = row.get("test_top1_err", _pct_err(row.get("test_acc")))
    # this project: train_loss; original PyTorch code: train_loss; original Lua code: loss
    out["train_loss"] = row.get("train_loss", row.get("loss"))
    out["test_loss"] = row.get("test_loss")
    for k in CURVE_KEYS:
        v = out[k]
        out[k] = float(v) if _number(v) else None
    return out


def run_kind(rows: Sequence[dict]) -> str:
    """Return :data:`CLASSIFICATION` when a row has an ``epoch`` (per-epoch rows), else :data:`DETECTION`."""
    return CLASSIFICATION if any("epoch" in r for r in rows) else DETECTION


def read_run(path: str) -> Tuple[str, List[dict]]:
    """Return ``(label, rows)`` for a run folder, a ``metrics.json`` or a log with ``json_stats:`` lines.

    The label is the run's folder name (or the log's file name). For a classification run
    (:func:`run_kind`) each row holds ``epoch`` and the :data:`CURVE_KEYS` (None where the
    log lacks one), sorted by epoch; a later row for the same epoch (a resumed run) wins. A
    detection run's rows are its ``metrics.json`` rows as written. Raises :class:`WrnDetError`
    for a path without readable rows.
    """
    label = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        candidates = [os.path.join(path, "metrics.json"), os.path.join(path, "log.txt")]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise WrnDetError(f"{path}: no metrics.json (a wrn_det run) nor log.txt (the original code's log) in it")
        path = found[0]
    elif not os.path.isfile(path):
        raise WrnDetError(f"{path}: no such run folder or log file")
    else:
        label = os.path.splitext(label)[0] if label not in ("metrics.json", "log.txt") else \
            os.path.basename(os.path.dirname(os.path.abspath(path)))
    with open(path, errors="replace") as f:
        stats = "json_stats:" in f.read()
    rows = read_json_lines(path, "json_stats:") if stats else read_metrics(path)
    if not stats and run_kind(rows) == DETECTION:
        if not any(_number(r.get("iteration")) for r in rows):
            raise WrnDetError(f"{path}: no rows with an 'epoch' (a classification run) or an 'iteration' "
                              "(a detection run) found")
        return label, rows
    by_epoch: Dict[float, dict] = {}
    for r in rows:
        if "epoch" in r:
            n = _normalise(r, path)
            by_epoch[n["epoch"]] = n
    if not by_epoch:
        raise WrnDetError(f"{path}: no per-epoch rows (objects with an 'epoch' key) found")
    return label, [by_epoch[e] for e in sorted(by_epoch)]


def _pyplot():
    """Return matplotlib's pyplot drawing to files (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_path: str, title: str) -> str:
    """Write ``fig`` (titled ``title`` if given) to ``out_path`` atomically and close it; returns the path."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_path, dpi=100)
    _pyplot().close(fig)
    return out_path


def plot_classification(runs: Sequence[Tuple[str, List[dict]]], out_path: str, title: str = "") -> str:
    """Draw error and loss per epoch of every classification run (train dashed, test solid) into a PNG; returns its path.

    ``runs`` are ``(label, rows)`` of :func:`read_run`.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs):
        c = colours[i % len(colours)]
        for ax, key, style, suffix in ((ax_err, "train_err", "--", "train"), (ax_err, "test_err", "-", "test"),
                                       (ax_loss, "train_loss", "--", "train"), (ax_loss, "test_loss", "-", "test")):
            pts = [(r["epoch"], r[key]) for r in rows if r[key] is not None]
            if pts:
                # markers, so a run of a single epoch still shows
                ax.plot(*zip(*pts), style, marker=".", color=c, label=f"{label} {suffix}")
    ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="error")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    if any(r["train_loss"] or r["test_loss"] for _, rows in runs for r in rows):
        ax_loss.set_yscale("log")
    for ax in (ax_err, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, out_path, title)


def _series(rows: List[dict], key: str) -> Tuple[List[int], List[float]]:
    # a resumed run appends to metrics.json; the last value logged for an iteration wins
    last: Dict[int, float] = {}
    for r in rows:
        it, v = r.get("iteration"), r.get(key)
        # rows of another shape (a hand-edited or foreign file) are skipped, not a traceback
        if isinstance(it, int) and not isinstance(it, bool) and _number(v):
            last[it] = float(v)
    its = sorted(last)
    return its, [last[i] for i in its]


def eval_keys(rows: List[dict]) -> List[str]:
    """Return the evaluation metrics of detection ``rows`` to draw: box AP, AP50, AP75 and proposal AR@100, AR@1000,
    under any dataset prefix, sorted."""
    return sorted({k for r in rows for k in r if any(k == e or k.endswith("/" + e) for e in _EVAL)})


def plot_detection(rows: List[dict], out_path: str, title: str = "") -> str:
    """Draw a detection run's losses, learning rate and ``bbox/AP*`` (or ``box_proposals/AR@*``) per iteration
    into a PNG; returns its path.

    ``rows`` are the run's ``metrics.json`` rows (:func:`read_run`).
    """
    plt = _pyplot()
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
    return _save(fig, out_path, title)
