"""Readers of the weight files the authors of Wide Residual Networks published themselves.

* **functional-zoo's WRN-50-2 export** (``wide-resnet-50-2-export-5ae25d50.pth``, from
  szagoruyko/functional-zoo ``wide-resnet-50-2-export.ipynb``): a flat dict of 108
  tensors (68,849,128 values) trained with fb.resnet.torch. ``conv0`` (7x7, stride 2),
  ``group{g}.block{b}.conv0`` (1x1), ``conv1`` (3x3, stride 2 in block 0 of groups
  g >= 1), ``conv2`` (1x1) and ``group{g}.block0.conv_dim`` (the projection), each with
  ``.weight`` and ``.bias``, and ``fc``; 3, 4, 6, 3 blocks per group, inner width
  2 * 64 * 2^g. BatchNorm is folded into the conv biases. Read into torchvision's
  ``wide_resnet50_2`` layout (any ``wide_resnet{50,101,152}_{k}`` export of the same
  form is read too) with every BatchNorm set to weight 1, running mean 0, running
  variance ``1 - eps`` and bias = the folded bias, so that the eval-mode output is the
  export's: ``(x - 0) / sqrt(1 - eps + eps) * 1 + b = x + b``. Such BatchNorm layers
  only make sense frozen (eval mode / FrozenBN): trained, they would normalise by
  batch statistics the folded weights never saw.
* **checkpoints of the authors' PyTorch port** (``pytorch/main.py`` writes ``model.pt7``
  = ``{'params': ..., 'epoch': ..., 'optimizer': ...}``; ``pytorch/resnet.py`` names the
  tensors): ``conv0``, ``group{g}.block{b}.bn0`` / ``conv0`` / ``bn1`` / ``conv1`` /
  ``convdim``, a final ``bn`` and ``fc`` (conv keys without ``.weight``). Read into
  ``wrn_{6n+4}_{k}``.

:func:`read_original_weights` recognises both (a bare ``params`` dict of the port too)
and returns ``None`` for anything else. A file that looks like one of them but is not
exactly it (a missing, extra or wrongly shaped tensor, a value that is not a finite
float tensor) is a :class:`~wrn_det.models.weights.ConversionError` whose one line
names the layout it looks like.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from wrn_det.engine.errors import a_type

from .registry import build_model
from .weights import ConversionError, blocks_per_stage, short_list
from .wide_resnet import IMAGENET_DEPTHS

__all__ = ["FUNCTIONAL_ZOO", "PYTORCH_PORT", "FOLDED_BN_WARNING", "read_original_weights",
           "read_functional_zoo", "read_pytorch_port", "unfold_batchnorm"]

FUNCTIONAL_ZOO = "functional_zoo"   # ``info["kind"]`` of a functional-zoo export
PYTORCH_PORT = "wrn_pytorch"        # ``info["kind"]`` of a checkpoint of the authors' PyTorch code

FOLDED_BN_WARNING = (
    "the functional-zoo export has BatchNorm folded into its convolutions; the converted BatchNorm layers "
    "(weight 1, mean 0, variance 1 - eps) reproduce it in eval mode only, so fine-tune with frozen BatchNorm "
    "(MODEL.WRN.NORM FrozenBN, the default) and not with BN or SyncBN")

_ZOO_NAME = "the functional-zoo WRN-50-2 export layout (wide-resnet-50-2-export-5ae25d50.pth; BatchNorm folded)"
_PORT_NAME = "a checkpoint of the authors' PyTorch WRN code (pytorch/main.py: {'params': ...})"
_ZOO_KEY = re.compile(r"group(\d+)\.block(\d+)\.(conv[012]|conv_dim)\.(weight|bias)")
_PORT_KEY = re.compile(r"group(\d+)\.block(\d+)\.(conv[01]|convdim|bn[01]\.\w+)")


def _check_tensors(params: dict, expected: Dict[str, Tuple[int, ...]], source: str, layout: str) -> None:
    """Raise ConversionError (one line naming ``layout``) unless ``params`` holds exactly ``expected``.

    ``expected``: key -> shape. Every value must be a floating-point tensor of that shape
    with finite values.
    """
    missing = [k for k in expected if k not in params]
    if missing:
        raise ConversionError(f"{source} looks like {layout} but lacks {len(missing)} of its {len(expected)} "
                              f"tensors: {short_list(missing, sort=True)}")
    extra = [k for k in params if k not in expected]
    if extra:
        raise ConversionError(f"{source} looks like {layout} but has {len(extra)} tensors that layout does not "
                              f"have: {short_list(extra, sort=True)}")
    for k, shape in expected.items():
        v = params[k]
        if not torch.is_tensor(v) or not v.is_floating_point():
            what = f"a {v.dtype} tensor" if torch.is_tensor(v) else a_type(v)
            raise ConversionError(f"{source} looks like {layout} but {k} is {what}, not floating-point weights")
        if tuple(v.shape) != tuple(shape):
            raise ConversionError(f"{source} looks like {layout} but {k} has shape {tuple(v.shape)}; "
                                  f"expected {tuple(shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ConversionError(f"{source} looks like {layout} but {k} holds NaN or infinite values")


def _out_channels(params: dict, key: str, source: str, layout: str) -> int:
    """Return the output channels of the conv weight ``params[key]``; ConversionError if it is not one."""
    w = params.get(key)
    if not torch.is_tensor(w) or w.dim() != 4:
        what = f"a tensor of shape {tuple(w.shape)}" if torch.is_tensor(w) else a_type(w)
        raise ConversionError(f"{source} looks like {layout} but {key} is {what}, not a 4-d conv weight")
    return int(w.shape[0])


def _meta_net(name: str, params: dict) -> nn.Module:
    """Return ``build_model(name)`` on the meta device, with as many classes as ``params["fc.weight"]`` has."""
    fc = params.get("fc.weight")
    classes = int(fc.shape[0]) if torch.is_tensor(fc) and fc.dim() == 2 and fc.shape[0] > 0 else None
    with torch.device("meta"):  # shapes and BatchNorm eps only: nothing allocated
        return build_model(name, num_classes=classes)


def unfold_batchnorm(bias: torch.Tensor, eps: float) -> "OrderedDict[str, torch.Tensor]":
    """Return BatchNorm tensors that, in eval mode, add ``bias`` and change nothing else.

    ``weight`` 1, ``running_mean`` 0, ``running_var`` ``1 - eps`` (so ``sqrt(var + eps)``
    is 1), ``bias`` = ``bias``, ``num_batches_tracked`` 0.
    """
    bias = bias.detach().float()
    return OrderedDict([
        ("weight", torch.ones_like(bias)), ("bias", bias.clone()),
        ("running_mean", torch.zeros_like(bias)), ("running_var", torch.full_like(bias, 1.0 - eps)),
        ("num_batches_tracked", torch.tensor(0)),
    ])


# ---------------------------------------------------------------------------------------------
# functional-zoo


def _looks_like_functional_zoo(obj) -> bool:
    return (isinstance(obj, dict) and "conv0.weight" in obj
            and any(isinstance(k, str) and _ZOO_KEY.fullmatch(k) for k in obj))


def _zoo_name(params: dict, source: str) -> str:
    blocks = blocks_per_stage(params, r"group(\d+)\.block(\d+)\.conv0\.weight\Z")
    counts = tuple(len(b) for b in blocks.values())
    depth = next((d for d, (kind, c) in IMAGENET_DEPTHS.items() if kind == "bottleneck" and c == counts), None)
    if sorted(blocks) != [0, 1, 2, 3] or depth is None:
        known = ", ".join(f"{c} ({d})" for d, (kind, c) in IMAGENET_DEPTHS.items() if kind == "bottleneck")
        raise ConversionError(f"{source} looks like {_ZOO_NAME} but has blocks {counts} in groups {sorted(blocks)}; "
                              f"a bottleneck network has 4 groups of {known} blocks")
    width = _out_channels(params, "group0.block0.conv0.weight", source, _ZOO_NAME)
    if width < 64 or width % 64:
        raise ConversionError(f"{source} looks like {_ZOO_NAME} but group0.block0.conv0.weight has "
                              f"{width} output channels; expected 64 * k")
    return f"wide_resnet{depth}_{width // 64}"


def _zoo_pairs(net: nn.Module) -> List[Tuple[str, str, str]]:
    """Return ``(export base, conv module name, BatchNorm module name)`` for every conv of ``net``."""
    pairs = [("conv0", "conv1", "bn1")]
    for name, _ in net.named_modules():
        m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv(\d)|downsample\.0)", name)
        if not m:
            continue
        g, b = int(m.group(1)) - 1, m.group(2)
        block = f"layer{g + 1}.{b}"
        if m.group(4):
            i = int(m.group(4))
            pairs.append((f"group{g}.block{b}.conv{i - 1}", name, f"{block}.bn{i}"))
        else:
            pairs.append((f"group{g}.block{b}.conv_dim", name, f"{block}.downsample.1"))
    return pairs


def read_functional_zoo(params: dict, source: str) -> Tuple["OrderedDict[str, torch.Tensor]", str]:
    """Return ``(state dict, model name)`` for a functional-zoo export ``params``.

    The state dict has torchvision's keys (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
    ..., ``fc.*``) and BatchNorm layers from :func:`unfold_batchnorm`. Raises
    :class:`ConversionError` naming the layout for a missing, extra or misshaped tensor.
    """
    name = _zoo_name(params, source)
    net = _meta_net(name, params)
    modules = dict(net.named_modules())
    # the stem's layers are saved under torchvision's top-level keys (conv1, bn1): name them so here too
    modules.update({k[len("stem."):]: m for k, m in list(modules.items()) if k.startswith("stem.")})
    pairs = _zoo_pairs(net)
    expected = OrderedDict()
    for base, conv, _ in pairs:
        expected[f"{base}.weight"] = tuple(modules[conv].weight.shape)
        expected[f"{base}.bias"] = (modules[conv].out_channels,)
    expected["fc.weight"] = tuple(net.fc.weight.shape)
    expected["fc.bias"] = tuple(net.fc.bias.shape)
    _check_tensors(params, expected, source, _ZOO_NAME)
    state = OrderedDict()
    for base, conv, bn in pairs:
        state[f"{conv}.weight"] = params[f"{base}.weight"].detach().float()
        for k, v in unfold_batchnorm(params[f"{base}.bias"], modules[bn].eps).items():
            state[f"{bn}.{k}"] = v
    state["fc.weight"] = params["fc.weight"].detach().float()
    state["fc.bias"] = params["fc.bias"].detach().float()
    own = net.state_dict()
    return OrderedDict((k, state[k]) for k in own), name


# ---------------------------------------------------------------------------------------------
# the authors' PyTorch port (CIFAR WRNs)


def _port_params(obj):
    if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
        obj = obj["params"]
    if isinstance(obj, dict) and "conv0" in obj and any(isinstance(k, str) and _PORT_KEY.fullmatch(k) for k in obj):
        return obj
    return None


def _port_key(key: str) -> Optional[str]:
    """Return the port's name for a ``wrn_{d}_{k}`` state-dict key (None for counters)."""
    if key.endswith("num_batches_tracked"):
        return None
    if key == "stem.weight":
        return "conv0"
    if key.startswith("stage3.post_act.bn."):
        return "bn." + key[len("stage3.post_act.bn."):]
    if key.startswith("fc."):
        return key
    m = re.fullmatch(r"stage(\d)\.(\d+)\.(\w+)\.(\w+)", key)
    g, b, module, tensor = int(m.group(1)) - 1, m.group(2), m.group(3), m.group(4)
    base = f"group{g}.block{b}."
    return base + {"bn1": f"bn0.{tensor}", "bn2": f"bn1.{tensor}", "conv1": "conv0", "conv2": "conv1",
                   "shortcut": "convdim"}[module]


def _port_name(params: dict, source: str) -> str:
    blocks = blocks_per_stage(params, r"group(\d+)\.block(\d+)\.conv0\Z")
    counts = [len(b) for b in blocks.values()]
    if sorted(blocks) != [0, 1, 2] or len(set(counts)) != 1:
        raise ConversionError(f"{source} looks like {_PORT_NAME} but has {counts} blocks in groups {sorted(blocks)}; "
                              "a WRN-d-k has 3 groups of (d - 4) / 6 blocks each")
    width = _out_channels(params, "group0.block0.conv0", source, _PORT_NAME)
    if width < 16 or width % 16:
        raise ConversionError(f"{source} looks like {_PORT_NAME} but group0.block0.conv0 has {width} output "
                              "channels; wrn_det's WRNs have 16 * k for an integer widening factor k")
    return f"wrn_{6 * counts[0] + 4}_{width // 16}"


def read_pytorch_port(params: dict, source: str) -> Tuple["OrderedDict[str, torch.Tensor]", str]:
    """Return ``(state dict, model name)`` for the ``params`` of the authors' PyTorch port.

    The state dict has the keys of ``wrn_{d}_{k}`` (``stem.weight``, ``stage1.0.bn1.weight``, ...,
    ``fc.*``; BatchNorm counters 0). Raises :class:`ConversionError` naming the layout for a
    missing, extra or misshaped tensor.
    """
    name = _port_name(params, source)
    own = _meta_net(name, params).state_dict()
    names = OrderedDict((k, _port_key(k)) for k in own)
    expected = OrderedDict((p, tuple(own[k].shape)) for k, p in names.items() if p is not None)
    _check_tensors(params, expected, source, _PORT_NAME)
    return OrderedDict((k, params[p].detach().float() if p is not None else torch.tensor(0))
                       for k, p in names.items()), name


# ---------------------------------------------------------------------------------------------


def read_original_weights(obj, source: str, use_ema: bool = False
                          ) -> Optional[Tuple["OrderedDict[str, torch.Tensor]", dict]]:
    """Return ``(state dict, info)`` when ``obj`` (a loaded file) is in one of the authors' layouts, else None.

    ``info`` is as :func:`wrn_det.models.convert.read_classifier_state` gives it: ``kind``
    (:data:`FUNCTIONAL_ZOO` or :data:`PYTORCH_PORT`), ``ema`` (False), ``model_name``, plus
    ``warnings`` (lines for the user; the folded-BatchNorm caveat of the export). Raises
    :class:`ConversionError` when the file looks like one of the layouts but is not exactly it,
    or when ``use_ema`` is asked for (neither layout holds EMA weights).
    """
    if _looks_like_functional_zoo(obj):
        kind, warnings = FUNCTIONAL_ZOO, [FOLDED_BN_WARNING]
        reader, params, layout = read_functional_zoo, obj, _ZOO_NAME
    elif _port_params(obj) is not None:
        kind, warnings = PYTORCH_PORT, []
        reader, params, layout = read_pytorch_port, _port_params(obj), _PORT_NAME
    else:
        return None
    if use_ema:
        raise ConversionError(f"{source}: --ema was asked for but {layout} holds no EMA weights")
    state, name = reader(params, source)
    return state, {"kind": kind, "ema": False, "model_name": name, "warnings": warnings}
