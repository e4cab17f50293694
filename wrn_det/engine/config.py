"""Config loading in detectron2's style: YAML files with ``_BASE_`` and ``KEY VALUE`` overrides.

fvcore's ``CfgNode`` does the merging; this module turns its exceptions into one-line
:class:`ConfigError` messages that name the file and the key, and finds config files
by name under the repository's ``configs/`` folder. :func:`add_run_config` defines the
keys of a run that both trainers read (seed, logging and trackers, preemption, EMA, mixed precision).
"""
import os
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

from .fileio import json_value, write_text
from .errors import ConfigError, a_type

__all__ = ["CfgNode", "CN", "resolve_config_file", "load_config", "save_config", "config_search_dirs", "add_run_config",
           "RUN_TASKS", "flatten_config"]


class CfgNode(_FvCfgNode):
    """fvcore's CfgNode; YAML files are read with ``_BASE_`` inheritance and no unsafe tags."""


CN = CfgNode

_REPO_ROOT = Path(__file__).resolve().parents[2]

# The run keys' defaults that differ between the tasks, each kept as it was: detection has
# detectron2's (a drawn seed, a log line every 20 iterations, float16) and d2go's EMA decay;
# classification a fixed seed, a log line every 50 iterations, timm's EMA decay and bfloat16
# (no gradient scaler, and it runs on the CPU).
_RUN_DEFAULTS = {
    "detection": {"SEED": -1, "LOG_PERIOD": 20, "EMA_DECAY": 0.999, "AMP_DTYPE": "float16"},
    "classification": {"SEED": 0, "LOG_PERIOD": 50, "EMA_DECAY": 0.9999, "AMP_DTYPE": "bfloat16"},
}

#: The tasks :func:`add_run_config` knows.
RUN_TASKS = tuple(_RUN_DEFAULTS)


def add_run_config(cfg: CfgNode, task: str) -> CfgNode:
    """Add the keys of a run both trainers read to ``cfg`` (in place), with ``task``'s defaults; returns ``cfg``.

    ``task`` is ``"detection"`` or ``"classification"``. The keys and their defaults
    (detection / classification):

    ``SEED`` (-1 / 0): rank ``r`` is seeded with ``SEED + r``; a negative seed draws one
    (recorded in the checkpoints for ``--resume``).
    ``CUDNN_BENCHMARK`` (False / False): let cuDNN pick the fastest convolution algorithms
    (:func:`wrn_det.engine.run.setup_run`).
    ``ALLOW_TF32`` (True / True): float32 matrix products and convolutions on CUDA GPUs with
    TensorFloat-32 units (Ampere and newer) use them (10-bit mantissa inputs, float32
    accumulation: about 1e-3 relative, as detectron2 and timm run); False keeps full float32.
    No effect elsewhere.
    ``LOG_PERIOD`` (20 / 50): iterations between log lines (detection: also between
    ``metrics.json`` rows and TensorBoard points; classification: where a non-finite loss is
    found).
    ``LOGGERS`` (``("tensorboard",)`` for both): where the numbers of ``metrics.json`` also go, some
    of ``"tensorboard"``, ``"mlflow"``, ``"wandb"`` (:mod:`wrn_det.engine.trackers`); ``()`` keeps
    ``metrics.json`` alone.
    ``PREEMPT_SIGNALS`` (SIGTERM, SIGUSR1 for both): signals that stop the run after the current
    iteration with a checkpoint (exit status 3); SLURM sends SIGTERM before killing a job, or
    SIGUSR1 with ``--signal``; ``()`` catches none.
    ``MODEL_EMA.ENABLED`` (False), ``MODEL_EMA.DECAY`` (0.999 / 0.9999): an exponential moving
    average of the weights (d2go's keys), evaluated beside the model and saved in the
    checkpoints; detection also has ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY`` (False): the
    average, not the model, is what ``--eval-only`` evaluates (classification evaluates both).
    ``SOLVER.AMP.ENABLED`` (False), ``SOLVER.AMP.DTYPE`` (float16 / bfloat16): mixed precision
    (autocast) on the run's device: float16 (CUDA, with a gradient scaler) or bfloat16 (CUDA or CPU).

    Raises :class:`ConfigError` for another ``task``.
    """
    if task not in _RUN_DEFAULTS:
        raise ConfigError(f"run config task {task!r}: expected one of {', '.join(RUN_TASKS)}")
    d = _RUN_DEFAULTS[task]
    node = type(cfg)  # nodes of the caller's class: yacs merges a file only into nodes of the root's own class
    cfg.SEED = d["SEED"]
    cfg.CUDNN_BENCHMARK = False
    cfg.ALLOW_TF32 = True
    cfg.LOG_PERIOD = d["LOG_PERIOD"]
    cfg.LOGGERS = ("tensorboard",)
    cfg.PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
    cfg.MODEL_EMA = node()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = d["EMA_DECAY"]
    if task == "detection":
        cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = False
    if "SOLVER" not in cfg:
        cfg.SOLVER = node()
    cfg.SOLVER.AMP = node()
    cfg.SOLVER.AMP.ENABLED = False
    cfg.SOLVER.AMP.DTYPE = d["AMP_DTYPE"]
    return cfg


def flatten_config(cfg, prefix: str = "") -> Dict[str, object]:
    """Return a config (a CfgNode or nested dict) as ``{"MODEL.NAME": value, ...}`` with JSON-ready values."""
    out: Dict[str, object] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = json_value(v)
    return out


def config_search_dirs() -> List[Path]:
    """Return the folders searched for a config given by file name: ./configs, then the repository's configs/."""
    dirs = [Path.cwd() / "configs", _REPO_ROOT / "configs"]
    out = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def resolve_config_file(name_or_path: str) -> str:
    """Return the path of a config file given as a path or as a file name under ``configs/``.

    ``wrn34_2_frcnn.yaml`` and ``COCO-Detection/wrn34_2_frcnn.yaml`` both resolve to
    ``configs/COCO-Detection/wrn34_2_frcnn.yaml``. Raises :class:`ConfigError` if nothing
    or more than one file matches.
    """
    if not name_or_path:
        raise ConfigError("no config file given: pass --config-file PATH_OR_NAME")
    p = Path(name_or_path)
    if p.is_file():
        return str(p)
    dirs = config_search_dirs()
    for d in dirs:
        cand = d / name_or_path
        if cand.is_file():
            return str(cand)
    matches = []
    for d in dirs:
        for cand in sorted(d.rglob(p.name)):
            if cand.is_file() and str(cand).endswith(str(name_or_path)) and cand.resolve() not in [m.resolve() for m in matches]:
                matches.append(cand)
    if len(matches) == 1:
        return str(matches[0])
    if len(matches) > 1:
        raise ConfigError(
            f"config name {name_or_path!r} is ambiguous: it matches "
            + ", ".join(str(m) for m in matches) + "; pass the path"
        )
    where = ", ".join(str(d) for d in dirs) or "no configs/ folder"
    raise ConfigError(f"config file {name_or_path!r} not found as a path nor under {where}")


def _merge_error(source: str, exc: Exception) -> ConfigError:
    msg = str(exc.args[0]) if exc.args else str(exc)
    msg = " ".join(msg.split())
    if "Non-existent config key" in msg or "Non-existent key" in msg:
        key = msg.split(":", 1)[-1].strip().strip("'\"")
        return ConfigError(f"{source}: unknown config key {key!r} (not in the defaults; check its spelling)")
    return ConfigError(f"{source}: {msg}")


def _check_yaml_chain(path: str, seen: Optional[List[str]] = None) -> None:
    """Raise :class:`ConfigError` unless ``path`` and every ``_BASE_`` it names is a YAML mapping, without cycles."""
    seen = list(seen or [])
    real = os.path.realpath(path)
    if real in seen:
        chain = " -> ".join(os.path.basename(p) for p in seen + [real])
        raise ConfigError(f"{path}: _BASE_ files form a cycle ({chain}); expected a chain that ends")
    if not os.path.isfile(path):
        raise ConfigError(f"{seen[-1] if seen else path}: cannot read {path!r}: file not found (check _BASE_)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as a YAML text file ({e})") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a YAML mapping of config keys (MODEL: ..., SOLVER: ...)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level is {a_type(data)}; expected a YAML mapping of config keys")
    base = data.get("_BASE_")
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _BASE_ is {a_type(base)}; expected the path of one config file")
        if not base.startswith(("/", "~")) and "://" not in base:
            base = os.path.join(os.path.dirname(path), base)
        _check_yaml_chain(os.path.expanduser(base), seen + [real])


def load_config(defaults: CfgNode, config_file: Optional[str], opts: Optional[List[str]] = None) -> CfgNode:
    """Return a frozen copy of ``defaults`` merged with ``config_file`` and ``KEY VALUE`` ``opts``.

    An unknown key, a value of the wrong type, an unreadable file, an odd number of
    overrides or a bad ``_BASE_`` all raise :class:`ConfigError` naming the file or key.
    """
    cfg = defaults.clone()
    cfg.defrost()
    if config_file:
        path = resolve_config_file(config_file)
        _check_yaml_chain(path)
        try:
            cfg.merge_from_file(path, allow_unsafe=False)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise _merge_error(path, e) from None
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: cannot read {e.filename!r}: file not found (check _BASE_)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    opts = list(opts or [])
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise _merge_error("command-line override", e) from None
    cfg.freeze()
    return cfg


def save_config(cfg: CfgNode, path: str) -> str:
    """Write ``cfg`` as YAML to ``path`` atomically; returns the path."""

    return write_text(path, cfg.dump())
