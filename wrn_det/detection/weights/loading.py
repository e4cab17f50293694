"""Detector weights: ``MODEL.WEIGHTS`` for training and evaluation, checkpoints for inference, their class metadata.

A file is one of:

* a detector checkpoint of the builtin engine (``model_XXXXXXX.pth``, ``model_final.pth``),
  which also carries ``"metadata"`` (:func:`checkpoint_metadata`): the training set's class
  names and its contiguous id -> dataset category id map, so that a predictor needs no
  registered dataset;
* a detector checkpoint of the detectron2 engine (``.pth``, or a ``.pkl`` read through the
  restricted unpickler), whose keys :mod:`wrn_det.detection.weights.d2_keys` maps to the builtin ones;
* a backbone (classification network) file: ``tools/convert_weights.py`` output, our
  classification checkpoints, torchvision / timm state dicts.

Every file is matched by the project's one matcher (:func:`wrn_det.models.weights.match_state_dict`);
this module decides what it is matched against and formats the report. Strict
(``MODEL.WRN.STRICT_WEIGHTS``) means: every tensor the detector runs comes from the file
with its shape and finite values, for detector checkpoints as for backbone files.
"""
import json
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from wrn_det.data.catalog import MetadataCatalog, resolve_json_file
from wrn_det.engine.checkpoint import load_checkpoint
from wrn_det.engine.errors import WrnDetError, a_type
from wrn_det.models.convert import backbone_key_map, read_d2_pickle
from wrn_det.models.weights import is_counter, match_state_dict, short_list, strip_wrappers

from . import d2_keys

__all__ = ["METADATA_KEY", "load_detector_weights", "load_inference_weights", "DetectorWeights",
           "checkpoint_metadata", "read_class_metadata", "num_detector_classes", "backbone_network", "unwrap"]

logger = logging.getLogger("wrn_det")

METADATA_KEY = "metadata"
# where the classification network sits inside the builtin detectors (C4, FPN)
_NET_PREFIXES = ("backbone.net.", "backbone.bottom_up.net.")


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DistributedDataParallel (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def backbone_network(model: nn.Module) -> Tuple[str, Optional[nn.Module]]:
    """Return ``(state-dict prefix, network)`` of the classification network inside a detector, or ``("", None)``."""
    model = unwrap(model)
    own = model.state_dict()
    for prefix in _NET_PREFIXES:
        if any(k.startswith(prefix) for k in own):
            net = model
            for part in prefix.strip(".").split("."):
                net = getattr(net, part)
            return prefix, net
    return "", None


# ------------------------------------------------------------------------------------------ metadata


def checkpoint_metadata(cfg, catalog=MetadataCatalog) -> dict:
    """Return the class metadata of the training datasets to store in a detector checkpoint.

    ``{"thing_classes": [name, ...], "contiguous_id_to_thing_dataset_id": {contiguous id:
    category id}, "datasets": [name, ...]}`` from the first dataset of ``DATASETS.TRAIN``
    whose metadata in ``catalog`` (the project's, or detectron2's on that engine) has its
    class list; ``{}`` when none has. Plain types only, so the checkpoint still loads with
    ``torch.load(weights_only=True)``.
    """
    for name in cfg.DATASETS.TRAIN:
        meta = catalog.get(name)
        names = meta.get("thing_classes")
        if names:
            id_map = meta.get("contiguous_id_to_thing_dataset_id")
            if not id_map and meta.get("thing_dataset_id_to_contiguous_id"):
                id_map = {v: k for k, v in meta.get("thing_dataset_id_to_contiguous_id").items()}
            id_map = id_map or {i: i + 1 for i in range(len(names))}
            return {"thing_classes": [str(n) for n in names],
                    "contiguous_id_to_thing_dataset_id": {int(k): int(v) for k, v in id_map.items()},
                    "datasets": [str(n) for n in cfg.DATASETS.TRAIN]}
    return {}


def _short_repr(obj, n: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= n else text[:n] + "..."


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
        raise WrnDetError(f"{where} is {a_type(meta)}; expected a dict with thing_classes")
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


def num_detector_classes(model: nn.Module) -> int:
    """Return the number of object classes of a builtin detector (its predictor's outputs less background)."""
    return int(unwrap(model).roi_heads.box_predictor.cls_score.out_features) - 1


def _classes_from_config(cfg, num_classes: int):
    """Return (names, id map, where) from the training datasets named in ``cfg``, without loading images.

    Used for checkpoints without metadata (detectron2's, older builtin ones). Reads the
    ``categories`` of the dataset's COCO JSON when the file exists; otherwise names the
    classes by their contiguous id.
    """
    for name in list(cfg.DATASETS.TRAIN) if cfg is not None else []:
        meta = MetadataCatalog.get(name)
        if meta.get("thing_classes"):
            names = list(meta["thing_classes"])
            id_map = dict(meta.get("contiguous_id_to_thing_dataset_id") or {i: i + 1 for i in range(len(names))})
        else:
            try:
                json_file = resolve_json_file(name)
                with open(json_file) as f:
                    cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
                names = [str(c["name"]) for c in cats]
                id_map = {i: int(c["id"]) for i, c in enumerate(cats)}
            except (WrnDetError, OSError, ValueError, KeyError, TypeError):
                continue
        if len(names) == num_classes:
            return names, id_map, f"dataset {name}"
    return [f"class {i}" for i in range(num_classes)], {i: i + 1 for i in range(num_classes)}, "numbering"


# ------------------------------------------------------------------------------------------ loading


def _as_tensor(key: str, value, path: str) -> torch.Tensor:
    """Return ``value`` as a tensor (numpy arrays of numbers are converted), refusing anything else and NaN/inf."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise WrnDetError(f"checkpoint {path}: {key} is {a_type(value)}, not a tensor")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise WrnDetError(f"checkpoint {path}: {key} holds non-finite values (NaN or inf); the file is corrupt "
                          "or training diverged")
    return value


def _read(path: str, key: str) -> dict:
    try:
        return read_d2_pickle(path) if str(path).endswith(".pkl") else load_checkpoint(path)
    except WrnDetError as e:
        raise WrnDetError(f"{key}: {e}") from None


def _model_state(ckpt, path: str, key: str) -> Dict[str, torch.Tensor]:
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not any(hasattr(v, "shape") for v in state.values()):
        raise WrnDetError(f"{key}: {path} holds no state dict of tensors (expected a dict of tensors or "
                          "{'model': ...})")
    bad = next((k for k in state if not isinstance(k, str)), None)
    if bad is not None:
        raise WrnDetError(f"{key}: {path}: model key {bad!r} is not a string")
    return {k: _as_tensor(k, v, path) for k, v in strip_wrappers(state).items()}


def _unused_keys(model: nn.Module) -> set:
    """Return the state-dict keys of network tensors the detector never runs (classifier, stages past the trunk)."""
    prefix, net = backbone_network(model)
    if net is None:
        return set()
    wrn = model.backbone.bottom_up if hasattr(model.backbone, "bottom_up") else model.backbone
    ran = {id(t) for m in wrn.running_modules() for t in list(m.parameters()) + list(m.buffers())}
    return {k for k, t in model.state_dict(keep_vars=True).items() if k.startswith(prefix) and id(t) not in ran}


def _with_aliases(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    # a tensor reachable under several keys (the C4 box head is the network's next stage) may come under any one
    groups: Dict[int, List[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(k)
    out = dict(state)
    for keys in groups.values():
        src = next((k for k in keys if k in state), None)
        if src is not None:
            out.update({k: state[src] for k in keys if k not in state})
    return out


def load_detector_weights(model: nn.Module, path: str, key: str = "MODEL.WEIGHTS", strict: bool = True,
                          use_ema: bool = False) -> dict:
    """Load ``path`` (a detector checkpoint of either engine, or a backbone file) into a builtin detector.

    A detector checkpoint must hold every tensor the detector runs, with its shape, and no
    tensor the detector does not have; a backbone file every stem and stage tensor of the
    network and no stage tensor it lacks (its classifier is ignored). With ``strict``
    (``MODEL.WRN.STRICT_WEIGHTS``) a gap is a :class:`WrnDetError`, else a warning and what
    fits is loaded. ``use_ema`` loads a training checkpoint's EMA weights
    (``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``). Returns the whole checkpoint dict. Raises
    :class:`WrnDetError` (one line naming ``key`` and the file) for a missing, unreadable or
    malformed file, or one none of whose tensors fits.
    """
    model = unwrap(model)
    if not path:
        raise WrnDetError(f"{key}: no weights file given")
    ckpt = _read(path, key)
    if use_ema:
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema"), dict):
            raise WrnDetError(f"{key}: {path} holds no EMA weights (a checkpoint of a run with MODEL_EMA.ENABLED); "
                              "set MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY False to evaluate its model weights")
        ckpt = dict(ckpt, model=ckpt["ema"])
    state = _model_state(ckpt, path, key)
    own = model.state_dict()
    prefix, net = backbone_network(model)
    hint = ""
    if d2_keys.is_detectron2_state(state):
        state = d2_keys.detectron2_to_builtin(state, model, path)
    if net is not None and not any(k in own for k in state):
        what = f"the backbone {type(net).__name__}"
        required = [k for k in backbone_key_map(net) if not is_counter(k)]
        loadable, report = match_state_dict(state, net.state_dict(), required=required, source=path)
        loadable = {prefix + k: v for k, v in loadable.items()}
        hint = report.hint(None)
    else:
        what = f"this {type(model).__name__}"
        unused = _unused_keys(model)
        required = [k for k in own if not is_counter(k) and k not in unused]
        loadable, report = match_state_dict(_with_aliases(state, model), own, required=required, source=path)
    if not loadable:
        raise WrnDetError(f"{key}: none of the {len(state)} tensors in {path} matches this model "
                          f"(e.g. {next(iter(state))!r}){hint}")
    if not report.ok:
        msg = f"{key}: {path} does not fit {what} ({report.total} tensors): {report.problems()}{hint}"
        if strict:
            raise WrnDetError(msg + "; use the config the file was trained with, or set MODEL.WRN.STRICT_WEIGHTS "
                                    "False to load what fits")
        logger.warning("%s (MODEL.WRN.STRICT_WEIGHTS is False: loading what fits)", msg)
    model.load_state_dict(loadable, strict=False)
    logger.info("loaded %d of %d tensors of the model from %s", len(loadable), len(own), path)
    missing = [k for k in own if k not in loadable]
    if missing and "iteration" not in ckpt:
        logger.info("%d model tensors not in the file keep their initialisation: %s", len(missing),
                    short_list(missing, 6))
    return ckpt


class DetectorWeights(dict):
    """What :func:`load_inference_weights` found: ``path``, ``engine`` (``builtin`` or ``detectron2``),
    ``thing_classes``, ``contiguous_id_to_thing_dataset_id``, ``classes_from`` (where the names came from)."""


def load_inference_weights(model: nn.Module, path: str, cfg=None) -> DetectorWeights:
    """Load a trained detector (either engine's checkpoint) strictly into ``model``; returns what it found.

    Class names come from the checkpoint's metadata, else from the training datasets of
    ``cfg`` (their COCO JSON), else ``"class <i>"``. Raises :class:`WrnDetError` (one line
    naming the file) for a missing, unreadable or malformed file, or one that does not fit.
    """
    if not path:
        raise WrnDetError("no detector weights given: set MODEL.WEIGHTS (or weights=) to a trained model_final.pth")
    ckpt = load_detector_weights(model, path, strict=True)
    engine = "detectron2" if d2_keys.is_detectron2_state(_model_state(ckpt, path, "MODEL.WEIGHTS")) else "builtin"
    num_classes = num_detector_classes(model)
    meta = read_class_metadata(ckpt, path, num_classes)
    if meta is not None:
        names, id_map, where = meta["thing_classes"], meta["contiguous_id_to_thing_dataset_id"], "checkpoint"
    else:
        names, id_map, where = _classes_from_config(cfg, num_classes)
        logger.info("%s carries no class names; using those of the %s", path, where)
    logger.info("loaded the %s-engine detector checkpoint %s (%d classes)", engine, path, num_classes)
    return DetectorWeights(path=str(path), engine=engine, thing_classes=names,
                           contiguous_id_to_thing_dataset_id=id_map, classes_from=where)
