"""The original code's ``json_stats:`` log lines, and naming runs by their options.

Our runs also write the original code's log line: :func:`append_json_stats` appends one
``json_stats: {...}`` line per epoch to ``log.txt``, the epoch's figures merged with every
option, as the original ``train.lua`` printed them, so its notebook (``notebooks/sweeper.py``
``loadLog``) and other tools that parse those logs read our runs. :func:`legend_labels` names
runs by their options, as that notebook's sweeper did. Reading and drawing the curves of a
run is :mod:`wrn_det.engine.curves`'s (``tools/plot_logs.py``).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import yaml

from wrn_det.engine import comm
from wrn_det.engine.config import flatten_config as flatten_options
from wrn_det.engine.curves import JSON_STATS_PREFIX
from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.events import read_json_lines
from wrn_det.engine.fileio import json_value

__all__ = ["JSON_STATS_PREFIX", "flatten_options", "json_stats_line", "append_json_stats", "run_options",
           "legend_labels"]

# Per-epoch figures of a json_stats row (ours and the original code's); every other key is an option.
_FIGURE_KEYS = {
    "epoch", "iteration", "lr", "loss", "train_loss", "test_loss", "train_acc", "test_acc", "train_time",
    "test_time", "seconds", "images_per_sec", "eval_seconds", "train_top1_err", "test_top1_err", "test_top5_err",
    "best_test_top1_err", "n_parameters",
}


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
    merged = {**{k: json_value(v) for k, v in stats.items()}, **{k: v for k, v in options.items() if k not in stats}}
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
    return read_json_lines(path, "json_stats:")


def run_options(path: str) -> Dict[str, object]:
    """Return the options a run was made with, as flat ``KEY: value`` pairs.

    ``path`` is what :func:`wrn_det.engine.curves.read_run` takes. The options are the keys of its ``json_stats:``
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
