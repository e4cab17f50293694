"""Training curves: read runs (``metrics.json`` or the original code's ``json_stats:`` logs) and plot them.

Our runs also write the original code's log line: :func:`append_json_stats` appends one
``json_stats: {...}`` line per epoch to ``log.txt``, the epoch's figures merged with every
option, as the original ``train.lua`` printed them, so its notebook (``notebooks/sweeper.py``
``loadLog``) and other tools that parse those logs read our runs. :func:`legend_labels` names
runs by their options, as that notebook's sweeper did.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from wrn_det.engine import comm
from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.fileio import save_figure

__all__ = ["read_run", "plot_curves", "CURVE_KEYS", "JSON_STATS_PREFIX", "flatten_options", "json_stats_line",
           "append_json_stats", "run_options", "legend_labels"]

#: How the original code's per-epoch log lines start (``train.lua``'s ``log``, ``pytorch/main.py``).
JSON_STATS_PREFIX = "json_stats: "

# Per-epoch figures of a json_stats row (ours and the original code's); every other key is an option.
_FIGURE_KEYS = {
    "epoch", "iteration", "lr", "loss", "train_loss", "test_loss", "train_acc", "test_acc", "train_time",
    "test_time", "seconds", "images_per_sec", "eval_seconds", "train_top1_err", "test_top1_err", "test_top5_err",
    "best_test_top1_err", "n_parameters",
}

#: The per-epoch series a run is reduced to (errors in percent).
CURVE_KEYS = ("train_err", "test_err", "train_loss", "test_loss")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pct_err(acc) -> Optional[float]:
    # the original logs hold accuracies in percent
    return 100.0 - float(acc) if _number(acc) else None


def _normalise(row: dict, where: str = "") -> Optional[dict]:
    """Map one log row of either format to ``{"epoch", "train_err", "test_err", "train_loss", "test_loss"}``.

    Values that are not finite numbers are left out (None); an ``epoch`` that is not a
    number raises :class:`WrnDetError` naming ``where``.
    """
    if "epoch" not in row:
        return None
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
        n = _normalise(r, path) if isinstance(r, dict) else None
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


# ---------------------------------------------------------------------------------------------
# the original code's json_stats lines, and naming runs by their options


def _json_value(v):
    """Return ``v`` as strict JSON accepts it: tuples as lists, non-finite floats as None."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return v


def flatten_options(cfg, prefix: str = "") -> Dict[str, object]:
    """Return a config (a CfgNode or nested dict) as ``{"MODEL.NAME": value, ...}`` with JSON-ready values."""
    out: Dict[str, object] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_options(v, key + "."))
        else:
            out[key] = _json_value(v)
    return out


def json_stats_line(row: dict, options: dict) -> str:
    """Return the original code's log line for one epoch: ``json_stats: {...}``.

    The object holds the epoch's figures of ``row`` (this project's names: ``train_loss``,
    ``test_top1_err``, ...), the original code's names for them (``loss``, ``train_acc``,
    ``test_acc``, ``train_time``, ``test_time``; accuracies in percent) and every option
    of ``options`` (flat keys such as ``MODEL.NAME``), as ``train.lua`` merged its ``opt``.
    """
    stats = dict(row)
    if "train_loss" in row:
        stats["loss"] = row["train_loss"]  # train.lua's name for the training loss
    if "train_top1_err" in row:
        stats["train_acc"] = 100.0 - row["train_top1_err"]
    if "test_top1_err" in row:
        stats["test_acc"] = 100.0 - row["test_top1_err"]
    if "seconds" in row:
        stats["train_time"] = row["seconds"]
    if "eval_seconds" in row:
        stats["test_time"] = row["eval_seconds"]
    merged = {**{k: _json_value(v) for k, v in stats.items()}, **{k: v for k, v in options.items() if k not in stats}}
    return JSON_STATS_PREFIX + json.dumps(merged, allow_nan=False)


def append_json_stats(output_dir: str, row: dict, cfg) -> Optional[str]:
    """Append the ``json_stats:`` line of ``row`` and the options of ``cfg`` to ``output_dir/log.txt``.

    Only the main process writes (other ranks return None without writing); returns the line.
    The line starts the file's line, without the logger's time stamp, as in the original logs.
    """
    if not comm.is_main_process() or not output_dir:
        return None
    line = json_stats_line(row, flatten_options(cfg))
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "log.txt"), "a") as f:  # appended like the logger's own lines
        f.write(line + "\n")
    return line


def _json_stats_rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, errors="replace") as f:
        if "json_stats:" not in f.read():
            return []
    return [r for r in _parse_lines(path, "json_stats:") if isinstance(r, dict)]


def run_options(path: str) -> Dict[str, object]:
    """Return the options a run was made with, as flat ``KEY: value`` pairs.

    ``path`` is what :func:`read_run` takes. The options are the keys of its ``json_stats:``
    lines that keep one value over all epochs (less the per-epoch figures), which covers the
    original code's logs (``model``, ``depth``, ``widen_factor``, ...) and ours (``MODEL.NAME``,
    ...); a run without such lines gives its ``config.yaml``, flattened. Empty when neither exists.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    log = os.path.join(path, "log.txt") if os.path.isdir(path) else path
    rows = _json_stats_rows(log)
    if rows:
        opts = {}
        for k, v in rows[0].items():
            if k in _FIGURE_KEYS or k.startswith("ema_"):
                continue
            if all(json.dumps(r.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for r in rows):
                opts[k] = v
        return opts
    cfg_file = os.path.join(folder, "config.yaml")
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file) as f:
                cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise WrnDetError(f"{cfg_file}: not a YAML config ({' '.join(str(e).split())[:200]})") from None
        return flatten_options(cfg) if isinstance(cfg, dict) else {}
    return {}


def _label_value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def legend_labels(paths: Sequence[str], keys: Sequence[str], names: Optional[Sequence[str]] = None) -> List[str]:
    """Return one legend label per run of ``paths``: ``KEY=value, KEY=value`` for ``keys``.

    ``keys == ["auto"]`` takes the options whose values differ between the runs, as the
    original notebook's sweeper did (less the output folder: ``OUTPUT_DIR``, ``save``). A key
    a run lacks reads ``KEY=not present`` (the sweeper's words); runs left with the same label
    get their name (``names``, default: the last part of each path) added. Raises
    :class:`WrnDetError` when a key is in none of the runs' options.
    """
    options = [run_options(p) for p in paths]
    keys = [k.strip() for k in keys if k.strip()]
    if keys == ["auto"]:
        # where a run was saved differs from run to run and says nothing about it
        every = sorted({k for o in options for k in o} - {"OUTPUT_DIR", "save"})
        keys = [k for k in every
                if len({json.dumps(o.get(k, "not present"), sort_keys=True) for o in options}) > 1]
    for k in keys:
        if not any(k in o for o in options):
            known = sorted({x for o in options for x in o})
            raise WrnDetError(f"--legend key {k!r} is in none of the runs' options (json_stats lines or config.yaml); "
                              f"they have {', '.join(known[:6]) or 'none'}{' ...' if len(known) > 6 else ''}")
    names = list(names) if names is not None else [os.path.basename(os.path.normpath(p)) for p in paths]
    labels = [", ".join(f"{k}={_label_value(o[k])}" if k in o else f"{k}=not present" for k in keys) or n
              for o, n in zip(options, names)]
    return [f"{lab} ({n})" if labels.count(lab) > 1 else lab for lab, n in zip(labels, names)]
