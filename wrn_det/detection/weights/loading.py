"""Detector weights: ``MODEL.WEIGHTS`` for training and evaluation, checkpoints for inference, their class metadata.

A file (``.pth``, a detectron2 ``.pkl``, ``.safetensors``) is read once by the project's one
reader (:func:`wrn_det.engine.weights_file.read_weights_file`: tensors checked, metadata,
what kind of file), its keys planned, then matched by the one matcher. It is one of:

* a detector checkpoint of the builtin engine (``model_XXXXXXX.pth``, ``model_final.pth``),
  which also carries ``"metadata"`` (:func:`checkpoint_metadata`): the training set's class
  names and its contiguous id -> dataset category id map, so that a predictor needs no
  registered dataset;
* a detector checkpoint of the detectron2 engine (``.pth``, ``.safetensors``, or a ``.pkl`` read
  through the restricted unpickler), whose keys :mod:`wrn_det.detection.weights.d2_keys` maps to the builtin ones;
* a backbone (classification network) file: ``tools/convert_weights.py`` output, our
  classification checkpoints, torchvision / timm state dicts.

Every file is matched by the project's one matcher (:func:`wrn_det.models.weights.match_state_dict`);
this module decides what it is matched against (the key plan) and formats the report. Strict
(``MODEL.WRN.STRICT_WEIGHTS``) means: every tensor the detector runs comes from the file
with its shape and finite values, for detector checkpoints as for backbone files.
"""
import json
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from wrn_det.data.catalog import MetadataCatalog, resolve_json_file
from wrn_det.engine.errors import WrnDetError, a_type
from wrn_det.engine.weights_file import WeightsFile, read_weights_file
from wrn_det.models.convert import backbone_key_map
from wrn_det.models.weights import is_counter, match_state_dict, short_list

from . import d2_keys

__all__ = ["METADATA_KEY", "load_detector_weights", "load_inference_weights", "DetectorWeights",
           "checkpoint_metadata", "read_class_metadata", "num_detector_classes", "backbone_network", "unwrap",
           "detector_file_fields", "detector_description"]

logger = logging.getLogger("wrn_det")

METADATA_KEY = "metadata"
DETECTOR_FORMAT = "detector"  # ``wrn_det.format`` of a detector's .safetensors
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


def _read(path: str, key: str) -> WeightsFile:
    """Read ``path`` once (:func:`read_weights_file`); every failure is one line starting with ``key``."""
    try:
        return read_weights_file(path)
    except WrnDetError as e:
        raise WrnDetError(f"{key}: {e}") from None


def _weights_of(wf: WeightsFile, key: str, use_ema: bool) -> Dict[str, torch.Tensor]:
    """Return the tensors of ``wf`` to load: its model's, or its EMA's with ``use_ema``."""
    if use_ema:
        if wf.ema is None:
            raise WrnDetError(f"{key}: {wf.path} holds no EMA weights (a checkpoint of a run with MODEL_EMA.ENABLED); "
                              "set MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY False to evaluate its model weights")
        return wf.ema
    if wf.model is None:
        raise WrnDetError(f"{key}: {wf.path} holds no state dict of tensors (expected a dict of tensors or "
                          "{'model': ...})")
    return wf.model


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


def detector_description(wf: WeightsFile) -> dict:
    """Return the ``wrn_det`` description a detector weights file of this project carries (``{}`` for others)."""
    desc = wf.contents.get("wrn_det") if isinstance(wf.contents, dict) else None
    return desc if isinstance(desc, dict) and desc.get("format") == DETECTOR_FORMAT else {}


def detector_file_fields(model: nn.Module, cfg, metadata: dict) -> dict:
    """Return the header fields of a detector's ``.safetensors`` (:func:`~wrn_det.engine.weights_file.save_safetensors`).

    ``metadata``: the class names and ids (as :func:`checkpoint_metadata` makes them);
    ``config``: ``cfg`` as YAML (``MODEL.WEIGHTS`` cleared: the file is the weights); ``wrn_det``: the file's
    description, with the RPN's anchors: always ``detectron2`` (the builtin RPN's anchors are detectron2's), which
    tells earlier releases, whose own anchors were rounded, to load the file with detectron2's.
    """
    desc = {"format": DETECTOR_FORMAT, "version": 1, "engine": "builtin", "anchors": "detectron2",
            "model_name": str(cfg.MODEL.WRN.NAME), "backbone": str(cfg.MODEL.BACKBONE.NAME)}
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # the file is the weights
    return {"metadata": metadata, "config": cfg.dump(), "wrn_det": desc}


def _key_plan(model: nn.Module, wf: WeightsFile, state: Dict[str, torch.Tensor]):
    """Return how the file's tensors meet the detector: ``(state, target, required, prefix, what, hint)``.

    A detectron2-engine detector's keys are mapped to the builtin ones (the RPN head's rows in the
    builtin anchor order); a file none of whose keys the detector has is a backbone file,
    matched against the classification network inside the detector (whose keys then get
    ``prefix``); anything else is matched against the whole detector, every tensor it runs
    required.
    """
    own = model.state_dict()
    prefix, net = backbone_network(model)
    if wf.engine == "detectron2":
        state = d2_keys.detectron2_to_builtin(state, model, wf.path)
    if net is not None and not any(k in own for k in state):
        required = [k for k in backbone_key_map(net) if not is_counter(k)]
        return state, net.state_dict(), required, prefix, f"the backbone {type(net).__name__}", True
    unused = _unused_keys(model)
    required = [k for k in own if not is_counter(k) and k not in unused]
    return _with_aliases(state, model), own, required, "", f"this {type(model).__name__}", False


def load_detector_weights(model: nn.Module, path: str, key: str = "MODEL.WEIGHTS", strict: bool = True,
                          use_ema: bool = False) -> dict:
    """Load ``path`` (a detector checkpoint of either engine, or a backbone file) into a builtin detector.

    The file is read once (:func:`~wrn_det.engine.weights_file.read_weights_file`: ``.pth``,
    detectron2 ``.pkl``, ``.safetensors``), its keys planned (:func:`_key_plan`), then matched
    by the one matcher. A detector checkpoint must hold every tensor the detector runs, with
    its shape, and no tensor the detector does not have; a backbone file every stem and stage
    tensor of the network and no stage tensor it lacks (its classifier is ignored). With
    ``strict`` (``MODEL.WRN.STRICT_WEIGHTS``) a gap is a :class:`WrnDetError`, else a warning
    and what fits is loaded. ``use_ema`` loads a training checkpoint's EMA weights
    (``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``). Returns the whole checkpoint dict (a
    safetensors file's in the same layout). Raises :class:`WrnDetError` (one line naming
    ``key`` and the file) for a missing, unreadable or malformed file, or one none of whose
    tensors fits.
    """
    model = unwrap(model)
    if not path:
        raise WrnDetError(f"{key}: no weights file given")
    wf = _read(path, key)
    return _load_weights_file(model, wf, key, strict, use_ema)


def _load_weights_file(model: nn.Module, wf: WeightsFile, key: str, strict: bool, use_ema: bool = False) -> dict:
    path = wf.path
    state = _weights_of(wf, key, use_ema)
    state, target, required, prefix, what, backbone_file = _key_plan(model, wf, state)
    loadable, report = match_state_dict(state, target, required=required, source=path)
    hint = report.hint(None) if backbone_file else ""
    loadable = OrderedDict((prefix + k, v) for k, v in loadable.items())
    if not loadable:
        raise WrnDetError(f"{key}: none of the {len(state)} tensors in {path} matches this model "
                          f"(e.g. {next(iter(state))!r}){hint}")
    if not report.ok:
        msg = f"{key}: {path} does not fit {what} ({report.total} tensors): {report.problems()}{hint}"
        if strict:
            raise WrnDetError(msg + "; use the config the file was trained with, or set MODEL.WRN.STRICT_WEIGHTS "
                                    "False to load what fits")
        logger.warning("%s (MODEL.WRN.STRICT_WEIGHTS is False: loading what fits)", msg)
    own = model.state_dict()
    model.load_state_dict(loadable, strict=False)
    logger.info("loaded %d of %d tensors of the model from %s", len(loadable), len(own), path)
    missing = [k for k in own if k not in loadable]
    if missing and not (isinstance(wf.contents, dict) and "iteration" in wf.contents):
        logger.info("%d model tensors not in the file keep their initialisation: %s", len(missing),
                    short_list(missing, 6))
    contents = wf.contents if isinstance(wf.contents, dict) else {}
    return dict(contents, model=wf.ema) if use_ema else contents


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
    wf = _read(path, "MODEL.WEIGHTS")
    ckpt = _load_weights_file(unwrap(model), wf, "MODEL.WEIGHTS", strict=True)
    engine = wf.engine or "builtin"
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

