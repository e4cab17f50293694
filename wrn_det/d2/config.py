"""The project's config keys for detectron2's ``get_cfg()``.

    from detectron2.config import get_cfg
    from wrn_det.d2 import add_wrn_config
    cfg = get_cfg()
    add_wrn_config(cfg)
    cfg.merge_from_file("configs/COCO-Detection/wrn34_2_frcnn.yaml")
"""
from fvcore.common.config import CfgNode as _FvCfgNode

from wrn_det.detection.config import add_wrn_config as _add_builtin_wrn_config
from wrn_det.detection.config import get_det_cfg
__all__ = ["add_wrn_config", "missing_builtin_keys"]


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, _FvCfgNode):  # detectron2's CfgNode and ours both derive from fvcore's
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _has(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def missing_builtin_keys(cfg) -> list:
    """Return the dotted keys of the builtin engine's defaults that ``cfg`` does not have."""
    return [k for k, _ in _leaves(get_det_cfg()) if not _has(cfg, k)]


def add_wrn_config(cfg):
    """Add the project's keys to a detectron2 config (in place) and return it.

    First the keys of :func:`wrn_det.detection.config.add_wrn_config` (``MODEL.WRN.*``,
    ``TEST.COCO_EVAL_BACKEND``), then every other key of the builtin engine's defaults
    that detectron2's ``get_cfg()`` lacks, each with the builtin default, so any config
    the builtin engine accepts also merges here. Keys detectron2 already has keep
    detectron2's defaults.
    """
    _add_builtin_wrn_config(cfg)
    defaults = get_det_cfg()
    for key, value in _leaves(defaults):
        if _has(cfg, key):
            continue
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node:
                node[part] = type(cfg)()
            node = node[part]
        node[parts[-1]] = value
    return cfg
