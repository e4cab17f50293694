"""Detector checkpoints for inference: the class metadata they carry, strict loading of both engines' files.

A checkpoint of the builtin trainer (``model_XXXXXXX.pth``, ``model_final.pth``) holds,
beside the weights, ``"metadata"`` (:func:`checkpoint_metadata`): the training set's
class names and its contiguous id -> dataset category id map, so that a predictor needs
no registered dataset to name what it finds or to write COCO results.

:func:`load_detector_weights` loads such a file into a builtin detector, or a
checkpoint of the detectron2 engine (``tools/train_net.py --engine detectron2``),
whose keys are mapped by :mod:`wrn_det.detection.d2_keys`. Unlike training's weight
loading, which tolerates gaps (a backbone file, another head), this is strict: every
tensor the detector runs must come from the file with its shape and finite values.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

from wrn_det.engine.checkpoint import load_checkpoint
from wrn_det.engine.errors import WrnDetError

__all__ = ["METADATA_KEY", "checkpoint_metadata", "read_class_metadata", "load_detector_weights",
           "num_detector_classes", "DetectorWeights"]

logger = logging.getLogger("wrn_det")

METADATA_KEY = "metadata"


def checkpoint_metadata(cfg) -> dict:
    """Return the class metadata of the training datasets to store in a detector checkpoint.

    ``{"thing_classes": [name, ...], "contiguous_id_to_thing_dataset_id": {contiguous id:
    category id}, "datasets": [name, ...]}`` taken from the metadata of the first dataset
    of ``DATASETS.TRAIN`` that has been loaded (its class list); ``{}`` when none has.
    Plain types only, so the checkpoint still loads with ``torch.load(weights_only=True)``.
    """
    from wrn_det.data.catalog import MetadataCatalog

    for name in cfg.DATASETS.TRAIN:
        meta = MetadataCatalog.get(name)
        names = meta.get("thing_classes")
        if names:
            id_map = meta.get("contiguous_id_to_thing_dataset_id") or {i: i + 1 for i in range(len(names))}
            return {"thing_classes": [str(n) for n in names],
                    "contiguous_id_to_thing_dataset_id": {int(k): int(v) for k, v in id_map.items()},
                    "datasets": [str(n) for n in cfg.DATASETS.TRAIN]}
    return {}


def read_class_metadata(ckpt, path: str, num_classes: int) -> Optional[dict]:
    """Return the checked ``"metadata"`` of a loaded checkpoint, or None when it has none.

    The result holds ``thing_classes`` (``num_classes`` strings) and
    ``contiguous_id_to_thing_dataset_id`` (ids ``0..num_classes-1`` to distinct ints).
    Raises :class:`WrnDetError` naming the file and the entry when the metadata is
    malformed or does not fit a detector of ``num_classes`` classes.
    """
    meta = ckpt.get(METADATA_KEY) if isinstance(ckpt, dict) else None
    if meta is None or meta == {}:
        return None
    where = f"checkpoint {path}: {METADATA_KEY!r}"
    if not isinstance(meta, dict):
        raise WrnDetError(f"{where} is a {type(meta).__name__}; expected a dict with thing_classes")
    names = meta.get("thing_classes")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise WrnDetError(f"{where}: thing_classes must be a list of strings, got {type(names).__name__}")
    if len(names) != num_classes:
        raise WrnDetError(f"{where}: {len(names)} thing_classes but the detector has {num_classes} classes "
                          "(MODEL.ROI_HEADS.NUM_CLASSES)")
    id_map = meta.get("contiguous_id_to_thing_dataset_id", {i: i + 1 for i in range(num_classes)})
    if (not isinstance(id_map, dict) or sorted(id_map) != list(range(num_classes))
            or not all(type(v) is int for v in id_map.values()) or len(set(id_map.values())) != num_classes):
        raise WrnDetError(f"{where}: contiguous_id_to_thing_dataset_id must map 0..{num_classes - 1} to distinct "
                          f"integer category ids, got {_short_repr(id_map)}")
    return {"thing_classes": list(names), "contiguous_id_to_thing_dataset_id": dict(id_map),
            "datasets": [str(d) for d in meta.get("datasets", [])] if isinstance(meta.get("datasets"), list) else []}


def _short_repr(obj, n: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= n else text[:n] + "..."


def num_detector_classes(model: torch.nn.Module) -> int:
    """Return the number of object classes of a builtin detector (its predictor's outputs less background)."""
    return int(model.roi_heads.box_predictor.cls_score.out_features) - 1


class DetectorWeights(dict):
    """What :func:`load_detector_weights` found: ``path``, ``engine`` (``builtin`` or ``detectron2``),
    ``thing_classes``, ``contiguous_id_to_thing_dataset_id``, ``classes_from`` (where the names came from)."""


def _alias_groups(model: torch.nn.Module) -> Dict[str, List[str]]:
    """Return ``key -> every state-dict key of the same tensor`` (a C4 box head shares the network's stage)."""
    by_id: Dict[int, List[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(k)
    return {k: keys for keys in by_id.values() for k in keys}


def _model_state(ckpt, path: str) -> "OrderedDict[str, torch.Tensor]":
    state = None
    if isinstance(ckpt, dict):
        # a trainer's checkpoint holds the weights under "model"; a bare state dict holds only arrays
        state = ckpt["model"] if "model" in ckpt else (ckpt if ckpt and all(
            hasattr(v, "shape") for v in ckpt.values()) else None)
    if not isinstance(state, dict) or not state:
        raise WrnDetError(f"checkpoint {path} holds no model state dict (expected a dict with 'model')")
    out = OrderedDict()
    for k, v in state.items():
        if not isinstance(k, str):
            raise WrnDetError(f"checkpoint {path}: model key {k!r} is not a string")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _check_tensor(key: str, value, path: str) -> torch.Tensor:
    """Return ``value`` as a tensor (numpy arrays of numbers are converted), refusing anything else and NaN/inf."""
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise WrnDetError(f"checkpoint {path}: {key} is a {type(value).__name__}, not a tensor")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise WrnDetError(f"checkpoint {path}: {key} holds non-finite values (NaN or inf); the file is corrupt "
                          "or training diverged")
    return value


def _unused_keys(model: torch.nn.Module) -> set:
    """Return the state-dict keys of backbone tensors the detector never runs (classifier, stages past the trunk)."""
    backbone = model.backbone
    wrn = getattr(backbone, "bottom_up", backbone)
    net = getattr(wrn, "net", None)
    if net is None or not hasattr(net, "stage_names"):
        return set()
    names = list(net.stage_names)
    last = max(names.index(f) for f in wrn.out_features)
    run = names[: last + 1] + ([wrn.head_stage] if getattr(wrn, "head_stage", None) else [])
    parts = [net.stem] + [net.get_stage(n) for n in run]
    ran = {id(t) for m in parts for t in list(m.parameters()) + list(m.buffers())}
    prefix = "backbone.net." if wrn is backbone else "backbone.bottom_up.net."
    return {k for k, t in model.state_dict(keep_vars=True).items() if k.startswith(prefix) and id(t) not in ran}


def _load_builtin(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    aliases = _alias_groups(model)
    optional = _unused_keys(model)
    missing, wrong = [], []
    new = OrderedDict()
    for k, t in own.items():
        if k in new:
            continue
        src = next((a for a in aliases.get(k, [k]) if a in state), None)
        if src is None:
            if k not in optional and not k.endswith("num_batches_tracked"):
                missing.append(k)
            continue
        v = _check_tensor(src, state[src], path)
        if tuple(v.shape) != tuple(t.shape):
            wrong.append(f"{src} {tuple(v.shape)} (the model has {tuple(t.shape)})")
            continue
        for a in aliases.get(k, [k]):
            new[a] = v
    unknown = sorted(k for k in state if k not in own)
    problems = []
    if missing:
        problems.append(f"{len(missing)} detector tensors missing ({_short(missing)})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape ({_short(wrong, 2)})")
    if unknown:
        problems.append(f"{len(unknown)} keys unknown to this detector ({_short(unknown)})")
    if problems:
        raise WrnDetError(f"checkpoint {path} does not fit the configured detector: {'; '.join(problems)}; "
                          "use the config it was trained with")
    model.load_state_dict(new, strict=False)


def _short(keys: List[str], n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _classes_from_config(cfg, num_classes: int):
    """Return (names, id map, where) from the training datasets named in ``cfg``, without loading images.

    Used for checkpoints without metadata (detectron2's, older builtin ones). Reads the
    ``categories`` of the dataset's COCO JSON when the file exists; otherwise names the
    classes by their contiguous id.
    """
    import json

    from wrn_det.data.catalog import MetadataCatalog, datasets_root, shapes_paths

    for name in list(cfg.DATASETS.TRAIN) if cfg is not None else []:
        meta = MetadataCatalog.get(name)
        if meta.get("thing_classes"):
            names = list(meta["thing_classes"])
            id_map = dict(meta.get("contiguous_id_to_thing_dataset_id") or {i: i + 1 for i in range(len(names))})
        else:
            json_file = meta.get("json_file") or (os.path.join(datasets_root(), meta["json_rel"]) if "json_rel" in meta
                                                  else shapes_paths(meta["shapes_split"])[0] if "shapes_split" in meta
                                                  else None)
            if not json_file or not os.path.isfile(json_file):
                continue
            try:
                with open(json_file) as f:
                    cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
                names = [str(c["name"]) for c in cats]
                id_map = {i: int(c["id"]) for i, c in enumerate(cats)}
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if len(names) == num_classes:
            return names, id_map, f"dataset {name}"
    return [f"class {i}" for i in range(num_classes)], {i: i + 1 for i in range(num_classes)}, "numbering"


def load_detector_weights(model: torch.nn.Module, path: str, cfg=None) -> DetectorWeights:
    """Load a builtin or detectron2-engine detector checkpoint at ``path`` into ``model``; returns what it found.

    A detectron2 checkpoint is recognised by its key names, mapped to the builtin ones
    (:func:`wrn_det.detection.d2_keys.detectron2_to_builtin`) and the model's anchors are
    set to detectron2's (unrounded, detectron2's order), so that the model computes what
    detectron2 computes. Class names come from the checkpoint's metadata, else from the
    training datasets of ``cfg`` (their COCO JSON), else ``"class <i>"``. Raises
    :class:`WrnDetError` (one line naming the file) for a missing, unreadable or
    malformed file, or one that does not fit the detector.
    """
    from . import d2_keys

    if not path:
        raise WrnDetError("no detector weights given: set MODEL.WEIGHTS (or weights=) to a trained "
                          "model_final.pth")
    try:
        if str(path).endswith(".pkl"):
            from wrn_det.models.convert import read_d2_pickle

            ckpt = read_d2_pickle(path)
        else:
            ckpt = load_checkpoint(path)
    except WrnDetError as e:
        raise WrnDetError(f"MODEL.WEIGHTS: {e}") from None
    except OSError as e:  # torch.load on a truncated archive fails while seeking in it
        raise WrnDetError(f"MODEL.WEIGHTS: checkpoint file {path!r} cannot be read as a torch checkpoint of tensors: "
                          f"{e.strerror or e}") from None
    state = _model_state(ckpt, path)
    num_classes = num_detector_classes(model)
    if d2_keys.is_detectron2_state(state):
        state = d2_keys.detectron2_to_builtin(state, model, path)
        d2_keys.use_detectron2_anchors(model)
        engine = "detectron2"
    else:
        engine = "builtin"
    _load_builtin(model, state, path)
    meta = read_class_metadata(ckpt, path, num_classes)
    if meta is not None:
        names, id_map, where = meta["thing_classes"], meta["contiguous_id_to_thing_dataset_id"], "checkpoint"
    else:
        names, id_map, where = _classes_from_config(cfg, num_classes)
        logger.info("%s carries no class names; using those of the %s", path, where)
    logger.info("loaded the %s-engine detector checkpoint %s (%d classes)", engine, path, num_classes)
    return DetectorWeights(path=str(path), engine=engine, thing_classes=names,
                           contiguous_id_to_thing_dataset_id=id_map, classes_from=where)
