"""Training curves: read runs (``metrics.json`` or the original code's ``json_stats:`` logs) and plot them."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.fileio import save_figure

__all__ = ["read_run", "plot_curves", "CURVE_KEYS"]

#: The per-epoch series a run is reduced to (errors in percent).
CURVE_KEYS = ("train_err", "test_err", "train_loss", "test_loss")


def _pct_err(acc) -> Optional[float]:
    # the original logs hold accuracies in percent
    return None if acc is None else 100.0 - float(acc)


def _normalise(row: dict) -> Optional[dict]:
    """Map one log row of either format to ``{"epoch", "train_err", "test_err", "train_loss", "test_loss"}``."""
    if "epoch" not in row:
        return None
    out = {"epoch": float(row["epoch"])}
    out["train_err"] = row.get("train_top1_err", _pct_err(row.get("train_acc")))
    out["test_err"] = row.get("test_top1_err", _pct_err(row.get("test_acc")))
    # this project: train_loss; original PyTorch code: train_loss; original Lua code: loss
    out["train_loss"] = row.get("train_loss", row.get("loss"))
    out["test_loss"] = row.get("test_loss")
    for k in CURVE_KEYS:
        v = out[k]
        out[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


def _parse_lines(path: str, prefix: Optional[str]) -> List[dict]:
    rows = []
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            if prefix is not None:
                at = line.find(prefix)
                if at < 0:
                    continue
                line = line[at + len(prefix):]
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise WrnDetError(f"{path}:{n}: not a JSON object ({e.msg}); expected one JSON object per line") from None
    return rows


def read_run(path: str) -> Tuple[str, List[dict]]:
    """Return ``(label, rows)`` for a run folder, a ``metrics.json`` or a log with ``json_stats:`` lines.

    Each row holds ``epoch`` and the :data:`CURVE_KEYS` (None where the log lacks
    one), sorted by epoch; a later row for the same epoch (a resumed run) wins.
    Raises :class:`WrnDetError` for a path without readable metrics.
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
        text = f.read()
    raw = _parse_lines(path, "json_stats:" if "json_stats:" in text else None)
    by_epoch: Dict[float, dict] = {}
    for r in raw:
        n = _normalise(r) if isinstance(r, dict) else None
        if n is not None:
            by_epoch[n["epoch"]] = n
    if not by_epoch:
        raise WrnDetError(f"{path}: no per-epoch rows (objects with an 'epoch' key) found")
    return label, [by_epoch[e] for e in sorted(by_epoch)]


def plot_curves(runs: Sequence[Tuple[str, List[dict]]], out_path: str, title: str = "") -> str:
    """Draw error and loss per epoch for every run (train dashed, test solid) into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out_path, dpi=100)
    plt.close(fig)
    return out_path
