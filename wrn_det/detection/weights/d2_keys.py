"""detectron2-engine detector checkpoints -> the builtin detector's keys, without importing detectron2.

A model trained with ``tools/train_net.py --engine detectron2`` is detectron2's
``GeneralizedRCNN`` around the same WRN modules (:mod:`wrn_det.d2`). Its state dict
differs from the builtin detector's in names and in two layouts:

============================================  ============================================
detectron2                                    builtin (torchvision's detection pieces)
============================================  ============================================
``backbone.bottom_up.{stem,res2..}.*`` (FPN)  ``backbone.bottom_up.net.<network keys>``
``backbone.{stem,res2..res4}.*`` (C4)         ``backbone.net.<network keys>``
``backbone.fpn.*``                            ``backbone.fpn.*`` (the same torchvision FPN)
``proposal_generator.rpn_head.conv``          ``rpn.head.conv.0.0`` (``conv.conv<k>`` -> ``conv.<k>.0``)
``proposal_generator.rpn_head.objectness_logits``  ``rpn.head.cls_logits``
``proposal_generator.rpn_head.anchor_deltas`` ``rpn.head.bbox_pred``
``roi_heads.box_head.conv<k>`` / ``fc<k>``    ``roi_heads.box_head.<index>`` (a Sequential)
``roi_heads.res5.<stage>.*`` (C4 head)        ``roi_heads.box_head.res5.*`` = the network's stage
``roi_heads.box_predictor.cls_score``         the same, rows reordered: background is the
                                              *last* class in detectron2, the first here
``roi_heads.box_predictor.bbox_pred``         ``(K + 1) * 4`` rows here (one unused set for the
                                              background first), ``K * 4`` class-specific rows
                                              (or 4 class-agnostic ones) in detectron2
============================================  ============================================

detectron2's cell anchors are not rounded and are listed size-major; torchvision's are
rounded to integers and listed ratio-major. :func:`use_detectron2_anchors` gives the
builtin RPN detectron2's anchors, so its weights mean what they meant in training.

The file is hostile input: every key of the mapping must be present, every tensor must
have the shape the configured detector expects, and keys the mapping does not know are
refused (a mask head, say), each with one line naming the key.
"""
import math
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
from torch import nn

from wrn_det.engine.errors import WrnDetError, a_type
from wrn_det.engine.weights_file import is_detectron2_state  # the reader tells a detectron2 checkpoint by its keys
from wrn_det.models.convert import backbone_key_map

from ..modeling.rpn import StridedAnchorGenerator

__all__ = ["is_detectron2_state", "detectron2_key_plan", "detectron2_to_builtin", "DetectronAnchorGenerator",
           "use_detectron2_anchors"]

# how a detectron2 tensor becomes the builtin one
_SAME, _CLS_SCORE, _BBOX_PRED = "same", "cls_score", "bbox_pred"


def _backbone_plan(model: nn.Module) -> List[Tuple[str, str, str]]:
    backbone = model.backbone
    fpn = hasattr(backbone, "bottom_up")
    wrn = backbone.bottom_up if fpn else backbone
    net = wrn.net
    names = list(net.stage_names)
    last = max(names.index(f) for f in wrn.out_features)
    trunk = {"stem", *names[: last + 1]}
    head = wrn.claimed_stage  # the C4 box head runs it
    d2_prefix, own_prefix = ("backbone.bottom_up.", "backbone.bottom_up.net.") if fpn else ("backbone.", "backbone.net.")
    plan = []
    for net_key, proto_key in backbone_key_map(net).items():
        part = proto_key.split(".", 1)[0]
        if part in trunk:
            plan.append((d2_prefix + proto_key, own_prefix + net_key, _SAME))
        elif part == head:
            # detectron2's WRNRes5ROIHeads holds the stage as roi_heads.res5.<stage name>
            plan.append(("roi_heads.res5." + proto_key, own_prefix + net_key, _SAME))
    if fpn:
        plan += [(f"backbone.fpn.{k}", f"backbone.fpn.{k}", _SAME) for k in backbone.fpn.state_dict()]
    return plan


def _rpn_plan(model: nn.Module) -> List[Tuple[str, str, str]]:
    if getattr(model, "rpn", None) is None:
        return []
    head = model.rpn.head
    plan = []
    convs = list(head.conv)
    for k, block in enumerate(convs):
        d2 = "proposal_generator.rpn_head.conv" + ("" if len(convs) == 1 else f".conv{k}")
        for name in block[0].state_dict():
            plan.append((f"{d2}.{name}", f"rpn.head.conv.{k}.0.{name}", _SAME))
    for d2, own in (("objectness_logits", "cls_logits"), ("anchor_deltas", "bbox_pred")):
        for name in ("weight", "bias"):
            plan.append((f"proposal_generator.rpn_head.{d2}.{name}", f"rpn.head.{own}.{name}", _SAME))
    return plan


def _box_head_plan(model: nn.Module) -> List[Tuple[str, str, str]]:
    box_head = model.roi_heads.box_head
    if hasattr(box_head, "res5"):  # C4: the network's own stage, mapped with the backbone
        return []
    plan, n_conv, n_fc = [], 0, 0
    for i, layer in enumerate(box_head):
        if isinstance(layer, nn.Linear):
            n_fc += 1
            plan += [(f"roi_heads.box_head.fc{n_fc}.{p}", f"roi_heads.box_head.{i}.{p}", _SAME) for p in ("weight", "bias")]
        elif isinstance(layer, nn.Sequential):  # Conv2dNormActivation: conv, norm?, relu
            n_conv += 1
            for key in layer.state_dict():
                sub, rest = key.split(".", 1)
                d2 = f"roi_heads.box_head.conv{n_conv}." + (rest if sub == "0" else f"norm.{rest}")
                plan.append((d2, f"roi_heads.box_head.{i}.{key}", _SAME))
    return plan


def detectron2_key_plan(model: nn.Module) -> List[Tuple[str, str, str]]:
    """Return ``(detectron2 key, builtin key, how)`` for every tensor a detectron2 checkpoint of ``model`` holds.

    ``model`` is a builtin ``GeneralizedRCNN`` (FPN or C4); ``how`` is ``same``, or
    ``cls_score`` / ``bbox_pred`` for the predictor's reordered rows.
    """
    if not hasattr(model, "roi_heads"):
        raise WrnDetError(f"detectron2 checkpoints load into GeneralizedRCNN detectors, not {type(model).__name__}")
    plan = _backbone_plan(model) + _rpn_plan(model) + _box_head_plan(model)
    for p in ("weight", "bias"):
        plan.append((f"roi_heads.box_predictor.cls_score.{p}", f"roi_heads.box_predictor.cls_score.{p}", _CLS_SCORE))
        plan.append((f"roi_heads.box_predictor.bbox_pred.{p}", f"roi_heads.box_predictor.bbox_pred.{p}", _BBOX_PRED))
    return plan


def _as_tensor(value, key: str, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.ascontiguousarray(value))
    raise WrnDetError(f"detectron2 checkpoint {path}: {key} is {a_type(value)}, not a tensor")


def _convert(how: str, v: torch.Tensor, expected: torch.Size, key: str, path: str) -> torch.Tensor:
    rows = expected[0] if len(expected) else 0
    if how == _CLS_SCORE:
        # detectron2: classes 0..K-1 then background; builtin: background then classes 1..K
        if v.dim() != len(expected) or v.shape[1:] != expected[1:] or v.shape[0] != rows:
            raise WrnDetError(f"detectron2 checkpoint {path}: {key} has shape {tuple(v.shape)}; this detector "
                              f"needs {tuple(expected)} ({rows - 1} classes + background)")
        return torch.cat([v[-1:], v[:-1]])
    if how == _BBOX_PRED:
        k = rows // 4 - 1
        if v.dim() == len(expected) and v.shape[1:] == expected[1:] and v.shape[0] in (4 * k, 4):
            body = v if v.shape[0] == 4 * k else v.repeat((k,) + (1,) * (v.dim() - 1))  # class-agnostic: every class
            # the background's deltas are never used (its scores are dropped); zeros keep them harmless
            return torch.cat([torch.zeros_like(body[:4]), body])
        raise WrnDetError(f"detectron2 checkpoint {path}: {key} has shape {tuple(v.shape)}; this detector needs "
                          f"{4 * k} class-specific rows (or 4 class-agnostic ones) for {k} classes")
    if tuple(v.shape) != tuple(expected):
        raise WrnDetError(f"detectron2 checkpoint {path}: {key} has shape {tuple(v.shape)}, the configured detector "
                          f"needs {tuple(expected)}; use the config it was trained with")
    return v


def detectron2_to_builtin(state: Dict[str, object], model: nn.Module, path: str = "the checkpoint"
                          ) -> "OrderedDict[str, torch.Tensor]":
    """Return the builtin state dict of ``model`` filled from a detectron2 ``state`` (see the module docstring).

    Raises :class:`WrnDetError` naming ``path`` and the key for a missing key (other than
    BatchNorm's ``num_batches_tracked`` counters), a key the mapping does not know, a
    value that is not an array or a tensor of the wrong shape.
    """
    own = model.state_dict()
    plan = detectron2_key_plan(model)
    out = OrderedDict()
    missing = [d2 for d2, _, _ in plan if d2 not in state and not d2.endswith("num_batches_tracked")]
    if missing:
        raise WrnDetError(f"detectron2 checkpoint {path} lacks {len(missing)} tensors of the configured detector "
                          f"(e.g. {', '.join(missing[:3])}); use the config it was trained with")
    known = {d2 for d2, _, _ in plan}
    unknown = sorted(k for k in state if k not in known)
    if unknown:
        raise WrnDetError(f"detectron2 checkpoint {path} has {len(unknown)} tensors this detector does not have "
                          f"(e.g. {', '.join(unknown[:3])}); only box detectors of wrn_det's configs are supported")
    for d2, key, how in plan:
        if d2 not in state:
            continue
        out[key] = _convert(how, _as_tensor(state[d2], d2, path), own[key].shape, d2, path)
    return out


class DetectronAnchorGenerator(StridedAnchorGenerator):
    """The builtin anchor generator (strides known) with detectron2's cell anchors (``DefaultAnchorGenerator``, offset 0).

    For a size ``s`` and ratio ``a``: ``w = sqrt(s * s / a)``, ``h = a * w``, the box
    ``(-w/2, -h/2, w/2, h/2)`` without rounding, listed size-major (all ratios of the
    first size first), as detectron2's RPN head weights expect.
    """

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        """Return the (len(scales) * len(aspect_ratios), 4) cell anchors of one level, centred on 0."""
        cells = []
        for size in scales:
            area = float(size) ** 2.0
            for ratio in aspect_ratios:
                w = math.sqrt(area / float(ratio))
                h = float(ratio) * w
                cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(cells, dtype=dtype, device=device)


def use_detectron2_anchors(model: nn.Module) -> None:
    """Give ``model``'s RPN (if any) detectron2's anchors of the same sizes and ratios, in place; returns None."""
    rpn = getattr(model, "rpn", None)
    if rpn is None:
        return
    old = rpn.anchor_generator
    # the RPN moves the cell anchors to the features' device and dtype on every call
    rpn.anchor_generator = DetectronAnchorGenerator(old.sizes, old.aspect_ratios, old.strides)
