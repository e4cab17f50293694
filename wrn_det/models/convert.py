"""Classification weights -> detection backbone weights, for both detection engines.

Inputs: checkpoints of ``tools/train_cls.py`` (``model_best.pth``, ``model_final.pth``,
``model_epoch_XXXX.pth``; their EMA weights with ``use_ema``), the authors' own files
(functional-zoo's WRN-50-2 export, their PyTorch code's CIFAR checkpoints; see
:mod:`wrn_det.models.original_weights`), torchvision state dicts
(``wide_resnet50_2``, ``wide_resnet101_2``, any ResNet) and timm's wide ResNets (a
state dict, or a training checkpoint with ``state_dict`` / ``state_dict_ema``). timm's
ResNet keys are torchvision's; ``module.`` (DataParallel) and ``_orig_mod.``
(``torch.compile``) prefixes are removed.

Every tensor of the network's stem and stages is checked against
``build_model(name)``: a missing key, an unknown key or a wrong shape is an error.
The classifier (the keys outside the stem and the stages) is dropped, and so are
BatchNorm's ``num_batches_tracked`` counters (no weights; older published files lack them).

Outputs:

* a backbone checkpoint for the builtin engine (:func:`builtin_checkpoint`): a torch
  file ``{"model": {network key: tensor}, "wrn_det": {...}}`` whose keys are those of
  the classification network (torchvision's layout for the ImageNet family);
* a detectron2 checkpoint (:func:`d2_checkpoint`): a pickle ``{"model": {key: numpy
  array}, "__author__": "wrn_det", "matching_heuristics": True, "wrn_det": {...}}``
  read by detectron2's ``DetectionCheckpointer``. Its keys are the *feature-protocol*
  keys, ``stem.<...>`` and ``<stage name>.<...>`` (``res2.0.conv1.weight``), the module
  names of ``wrn_det.d2``'s backbones and res5 head; detectron2 matches them by suffix
  to ``backbone.res2...`` (C4), ``backbone.bottom_up.res2...`` (FPN) and
  ``roi_heads.res5.res5...`` (C4 box head), as it does with its own ImageNet pickles.

Nothing here imports detectron2.
"""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import yaml
from torch import nn

from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.fileio import atomic_write, atomic_write_all
from wrn_det.engine.weights_file import read_weights_file, safetensors_writer

from .original_weights import read_original_weights
from .registry import build_model
from .weights import ConversionError, guess_network, is_counter, match_state_dict

__all__ = [
    "ConversionError", "BACKBONE_FORMAT", "D2_AUTHOR",
    "protocol_stem", "protocol_modules", "backbone_key_map", "read_classifier_state",
    "extract_backbone", "builtin_checkpoint", "d2_checkpoint", "to_protocol_keys",
    "save_d2_checkpoint", "read_d2_pickle", "convert_weights", "is_builtin_backbone_checkpoint",
]

BACKBONE_FORMAT = "backbone"   # value of ``ckpt["wrn_det"]["format"]`` in a builtin backbone checkpoint
D2_AUTHOR = "wrn_det"          # ``__author__`` of the detectron2 pickles written here


# ---------------------------------------------------------------------------------------------
# the feature-protocol layout of a network


def protocol_stem(net: nn.Module) -> nn.Module:
    """Return the network's stem as a module whose children keep their names in the network.

    A registered ``stem`` submodule (CIFAR-style nets) is returned as it is. The
    ImageNet wide ResNets build ``stem`` on access from ``conv1``, ``bn1``, ``relu`` and
    ``maxpool``; those are wrapped in a Sequential with the same names, so its keys read
    ``conv1.weight``, ``bn1.running_mean``, ... (the same parameter objects).
    """
    stem = net.stem
    if any(child is stem for child in net._modules.values()):
        return stem
    if isinstance(stem, nn.Sequential):
        names = {id(m): n for n, m in net.named_children()}
        children = [(names.get(id(c), str(i)), c) for i, c in enumerate(stem)]
        if len({n for n, _ in children}) == len(children):
            return nn.Sequential(OrderedDict(children))
    return stem


def protocol_modules(net: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Return ``{"stem": stem, <stage name>: stage, ...}``: the backbone pieces under their protocol names."""
    mods = OrderedDict(stem=protocol_stem(net))
    for name in net.stage_names:
        mods[name] = net.get_stage(name)
    return mods


def backbone_key_map(net: nn.Module) -> "OrderedDict[str, str]":
    """Return ``network state-dict key -> protocol key`` for every tensor of the stem and the stages.

    ``conv1.weight -> stem.conv1.weight`` and ``layer1.0.conv1.weight -> res2.0.conv1.weight``
    for the ImageNet family; ``stage1.0.bn1.weight -> stage1.0.bn1.weight`` for the CIFAR
    family. Keys of the classifier are not in the result. Order: the network's state dict.
    """
    by_id: Dict[int, str] = {}
    for key, tensor in net.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), key)
    protocol: Dict[str, str] = {}
    for prefix, module in protocol_modules(net).items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            net_key = by_id.get(id(tensor))
            if net_key is None:  # pragma: no cover - a stem that copies tensors would break the protocol
                raise ConversionError(f"{type(net).__name__}: the tensor {prefix}.{key} is not in the network's state dict")
            protocol.setdefault(net_key, f"{prefix}.{key}")
    return OrderedDict((k, protocol[k]) for k in by_id.values() if k in protocol)


# ---------------------------------------------------------------------------------------------
# reading classification checkpoints


def _name_from_config_text(text: str) -> Optional[str]:
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    name = (cfg or {}).get("MODEL", {}).get("NAME") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and name else None


def read_classifier_state(path: str, use_ema: bool = False) -> Tuple["OrderedDict[str, torch.Tensor]", dict]:
    """Read the network weights of a classification checkpoint.

    Returns ``(state_dict, info)``: the weights with ``module.`` / ``_orig_mod.`` prefixes
    removed, and ``info`` with ``kind`` (``wrn_det``: a checkpoint of our trainer,
    ``timm``: a timm training checkpoint, ``state_dict``: a bare state dict as torchvision
    and timm publish them, ``wrn_det_backbone``: a builtin backbone checkpoint written
    by this module; ``functional_zoo`` / ``wrn_pytorch``: the authors' own layouts, read by
    :mod:`wrn_det.models.original_weights`, whose ``info`` also has ``warnings``),
    ``ema`` (whether the EMA weights were taken) and ``model_name`` (the
    network named in the checkpoint's config or in ``config.yaml`` beside it, else None).
    Any format the one reader reads (:func:`~wrn_det.engine.weights_file.read_weights_file`:
    ``.pth``/``.bin``, ``.safetensors``). Raises :class:`ConversionError` (one line) for anything else.
    """
    wf = read_weights_file(path)
    ckpt = wf.contents
    original = read_original_weights(ckpt, path, use_ema)  # the authors' layouts (functional-zoo, PyTorch port)
    if original is not None:
        return original
    info = {"kind": None, "ema": False, "model_name": None}
    main = wf.model
    if main is not None and "model" in ckpt:
        meta = ckpt.get("wrn_det")
        if isinstance(meta, dict) and meta.get("format") == BACKBONE_FORMAT:
            info["kind"], info["model_name"] = "wrn_det_backbone", meta.get("model_name")
        else:
            info["kind"] = "wrn_det"
        if isinstance(ckpt.get("config"), str):
            info["model_name"] = _name_from_config_text(ckpt["config"])
    elif main is not None and "state_dict" in ckpt:
        info["kind"] = "timm"
    elif main is not None:
        info["kind"] = "state_dict"
    else:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(f"{path}: no network weights found; expected a state dict, a wrn_det checkpoint "
                              f"({{'model': ..., 'ema': ...}}) or a timm checkpoint ({{'state_dict': ...}}), got {keys}")
    if use_ema:
        ema = wf.ema
        if ema is None:
            raise ConversionError(f"{path}: --ema was asked for but the checkpoint holds no EMA weights "
                                  "('ema' of tools/train_cls.py with MODEL_EMA.ENABLED, or timm's 'state_dict_ema')")
        main, info["ema"] = ema, True
    if info["model_name"] is None:
        cfg_file = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
        if info["kind"] == "wrn_det" and os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                info["model_name"] = _name_from_config_text(f.read())
    return main, info


def extract_backbone(state: Dict[str, torch.Tensor], model_name: str, source: str = "the checkpoint"
                     ) -> Tuple["OrderedDict[str, torch.Tensor]", nn.Module, List[str]]:
    """Check ``state`` against ``build_model(model_name)`` and keep the backbone tensors.

    Returns ``(backbone, net, dropped)``: the stem and stage tensors under the network's
    keys, in its order (floating-point tensors as float32; BatchNorm ``num_batches_tracked``
    counters left out); the freshly built network (for its key layout); the checkpoint
    keys left out as not part of the backbone (the classifier). Raises
    :class:`ConversionError` naming ``source`` when a backbone tensor is missing or has
    another shape, or when the checkpoint has keys the network does not have.
    """
    try:
        net = build_model(model_name)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"model {model_name!r}: {e}") from None
    keymap = backbone_key_map(net)
    required = [k for k in keymap if not is_counter(k)]
    loadable, report = match_state_dict(state, net.state_dict(), required=required, source=source)
    if not report.ok:
        guess = report.looks_like
        hint = f" (its layout looks like {guess!r}; pass --model {guess})" if guess and guess != model_name else ""
        raise ConversionError(f"{source} does not fit the {len(required)} backbone tensors of {model_name}: "
                              f"{report.problems()}{hint}")
    backbone = OrderedDict()
    for k in required:
        v = loadable[k].detach()
        backbone[k] = (v.float() if v.is_floating_point() else v).contiguous()
    dropped = [k for k in state if k not in keymap]
    return backbone, net, dropped


# ---------------------------------------------------------------------------------------------
# writing


def builtin_checkpoint(backbone: Dict[str, torch.Tensor], model_name: str, **meta) -> dict:
    """Return the builtin engine's backbone checkpoint: ``{"model": backbone, "wrn_det": {...}}``.

    ``backbone`` is keyed as the classification network; ``meta`` (source file, EMA, ...)
    is stored beside ``format`` and ``model_name``. The dict survives ``weights_only`` loads.
    """
    return {"model": OrderedDict(backbone),
            "wrn_det": {"format": BACKBONE_FORMAT, "version": 1, "model_name": model_name, **meta}}


def is_builtin_backbone_checkpoint(ckpt) -> bool:
    """Return True when ``ckpt`` (a loaded dict) is a backbone checkpoint written by :func:`builtin_checkpoint`."""
    meta = ckpt.get("wrn_det") if isinstance(ckpt, dict) else None
    return isinstance(meta, dict) and meta.get("format") == BACKBONE_FORMAT and isinstance(ckpt.get("model"), dict)


def to_protocol_keys(backbone: Dict[str, torch.Tensor], net: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Return ``backbone`` (network keys) re-keyed to the protocol keys of ``net``.

    ``num_batches_tracked`` counters, if any, are dropped (detectron2's frozen BN has
    none). Keys that are not backbone keys of ``net`` raise :class:`ConversionError`.
    """
    keymap = backbone_key_map(net)
    out = OrderedDict()
    for k, v in backbone.items():
        if k not in keymap:
            raise ConversionError(f"{k} is not a backbone tensor of {type(net).__name__}")
        if is_counter(k):
            continue
        out[keymap[k]] = v
    return out


def d2_checkpoint(backbone: Dict[str, torch.Tensor], net: nn.Module, model_name: str, **meta) -> dict:
    """Return a detectron2 checkpoint dict of the backbone: protocol keys, numpy arrays.

    ``{"model": {protocol key: float32 ndarray}, "__author__": "wrn_det",
    "matching_heuristics": True, "wrn_det": {...}}``; detectron2's checkpointer matches
    the keys by suffix (see the module docstring).
    """
    model = OrderedDict((k, v.cpu().numpy()) for k, v in to_protocol_keys(backbone, net).items())
    return {"model": model, "__author__": D2_AUTHOR, "matching_heuristics": True,
            "wrn_det": {"format": "detectron2", "version": 1, "model_name": model_name, **meta}}


def _pickle_to(obj, path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def save_d2_checkpoint(ckpt: dict, path: str) -> str:
    """Pickle ``ckpt`` (from :func:`d2_checkpoint`) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: _pickle_to(ckpt, tmp))


def read_d2_pickle(path: str) -> dict:
    """Return the dict stored in a detectron2 weights pickle (``.pkl``), as the one reader reads it.

    Only numpy arrays of plain dtypes, numbers, strings and plain containers are built
    (:func:`wrn_det.engine.weights_file.read_weights_file`, through the restricted
    unpickler); anything else, a missing or a corrupt file raises :class:`ConversionError`
    with one line naming the file.
    """
    try:
        return read_weights_file(path).contents
    except WrnDetError as e:
        raise ConversionError(str(e)) from None


def convert_weights(src: str, model_name: Optional[str] = None, builtin_out: Optional[str] = None,
                    d2_out: Optional[str] = None, use_ema: bool = False, safetensors_out: Optional[str] = None) -> dict:
    """Convert the classification checkpoint ``src`` and write the requested outputs.

    ``model_name``: the ``wrn_det.models`` network; when None, the name stored with a
    wrn_det checkpoint is used, else the one the key layout shows. ``builtin_out`` /
    ``d2_out`` / ``safetensors_out``: paths of the builtin backbone checkpoint, of the
    detectron2 pickle and of the backbone as safetensors (the builtin checkpoint's tensors, its
    description in the header; it serves both engines; any may be None). All files go to
    temporary files first and are renamed at the end, so a failure leaves no partial file.
    Returns a summary dict (``model_name``, ``kind``, ``ema``, ``num_tensors``,
    ``num_params``, ``dropped``, ``written``).
    """
    if not builtin_out and not d2_out and not safetensors_out:
        raise ConversionError("nothing to write: give a builtin (.pth), a detectron2 (.pkl) and/or a .safetensors "
                              "output path")
    state, info = read_classifier_state(src, use_ema=use_ema)
    name = model_name or info["model_name"] or guess_network(state)
    if not name:
        raise ConversionError(f"{src}: cannot tell which network these weights are for; pass --model NAME "
                              "(a wrn_det.models name such as wide_resnet50_2 or wrn_28_10)")
    if info["model_name"] and model_name and info["model_name"] != model_name:
        raise ConversionError(f"{src} was trained as {info['model_name']!r} but --model says {model_name!r}")
    backbone, net, dropped = extract_backbone(state, name, source=src)
    meta = {"source": os.path.abspath(src), "source_kind": info["kind"], "ema": info["ema"]}
    writers = []
    if builtin_out:
        writers.append((builtin_out, lambda tmp: torch.save(builtin_checkpoint(backbone, name, **meta), tmp)))
    if d2_out:
        writers.append((d2_out, lambda tmp: _pickle_to(d2_checkpoint(backbone, net, name, **meta), tmp)))
    if safetensors_out:
        ckpt = builtin_checkpoint(backbone, name, **meta)
        writers.append((safetensors_out, safetensors_writer(ckpt["model"], wrn_det=ckpt["wrn_det"])))
    written = atomic_write_all(writers)
    own = net.state_dict(keep_vars=True)
    n_params = sum(own[k].numel() for k in backbone if isinstance(own[k], nn.Parameter))
    return {"model_name": name, "kind": info["kind"], "ema": info["ema"], "num_tensors": len(backbone),
            "num_params": n_params, "dropped": dropped, "written": written, "warnings": info.get("warnings", [])}
