"""detectron2-engine detector checkpoints -> the builtin detector's keys, without importing detectron2.

A model trained with ``tools/train_net.py --engine detectron2`` is detectron2's
``GeneralizedRCNN`` around the same WRN modules (:mod:`wrn_det.d2`). Its state dict
differs from the builtin detector's in names and in three layouts (the third, the RPN
head's anchor order, is described below the table):

============================================  ============================================
detectron2                                    builtin (torchvision's state-dict layout)
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

The builtin RPN's anchors are detectron2's (:func:`~wrn_det.detection.modeling.rpn.cell_anchors`),
listed ratio-major where detectron2 lists them size-major: with several sizes on a level (the C4
configs) the RPN head's objectness and delta rows are reordered (:func:`rpn_anchor_order`), so
its weights mean what they meant in training.

The file is hostile input: every key of the mapping must be present, every tensor must
have the shape the configured detector expects, and keys the mapping does not know are
refused (a mask head, say), each with one line naming the key.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from wrn_det.engine.errors import WrnDetError, a_type
from wrn_det.engine.weights_file import is_detectron2_state  # the reader tells a detectron2 checkpoint by its keys
from wrn_det.models.convert import backbone_key_map

__all__ = ["is_detectron2_state", "detectron2_key_plan", "detectron2_to_builtin", "rpn_anchor_order"]

# how a detectron2 tensor becomes the builtin one
_SAME, _CLS_SCORE, _BBOX_PRED, _RPN_ANCHORS = "same", "cls_score", "bbox_pred", "rpn_anchors"


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
            plan.append((f"proposal_generator.rpn_head.{d2}.{name}", f"rpn.head.{own}.{name}", _RPN_ANCHORS))
    return plan


def rpn_anchor_order(model: nn.Module) -> Optional[List[int]]:
    """Return, for every cell anchor of the builtin RPN, the index of the same anchor in detectron2's RPN head.

    The builtin lists a level's anchors ratio-major, detectron2 size-major; with one size
    or one ratio per level the two lists are the same. Returns None for a model without an
    RPN. Raises :class:`WrnDetError` when levels differ in their numbers of sizes and ratios
    (no single reordering of the shared head fits every level).
    """
    rpn = getattr(model, "rpn", None)
    if rpn is None:
        return None
    ag = rpn.anchor_generator
    shapes = {(len(s), len(r)) for s, r in zip(ag.sizes, ag.aspect_ratios)}
    if len(shapes) > 1 and any(s > 1 and r > 1 for s, r in shapes):
        raise WrnDetError(f"detectron2 checkpoints: the RPN levels have different numbers of anchor sizes and ratios "
                          f"{sorted(shapes)}; their shared head's rows cannot be mapped")
    sizes, ratios = next(iter(shapes))
    # builtin anchor j = (ratio j // sizes, size j % sizes); detectron2's index of it: size * ratios + ratio
    return [(j % sizes) * ratios + j // sizes for j in range(sizes * ratios)]


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

    ``model`` is a builtin ``GeneralizedRCNN`` (FPN or C4) or ``ProposalNetwork``; ``how`` is
    ``same``, ``rpn_anchors`` for the RPN head's rows (reordered as :func:`rpn_anchor_order`
    says), or ``cls_score`` / ``bbox_pred`` for the predictor's reordered rows.
    """
    if not hasattr(model, "roi_heads"):
        if getattr(model, "rpn", None) is None:
            raise WrnDetError(f"detectron2 checkpoints load into GeneralizedRCNN and ProposalNetwork detectors, "
                              f"not {type(model).__name__}")
        return _backbone_plan(model) + _rpn_plan(model)
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


def _convert(how: str, v: torch.Tensor, expected: torch.Size, key: str, path: str,
             anchor_order: Optional[List[int]] = None) -> torch.Tensor:
    rows = expected[0] if len(expected) else 0
    if how == _RPN_ANCHORS and tuple(v.shape) == tuple(expected) and anchor_order is not None:
        per_anchor = v.view(len(anchor_order), -1, *v.shape[1:])  # objectness: 1 row per anchor, deltas: 4
        return per_anchor[anchor_order].reshape(v.shape)
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
    order = rpn_anchor_order(model)
    for d2, key, how in plan:
        if d2 not in state:
            continue
        out[key] = _convert(how, _as_tensor(state[d2], d2, path), own[key].shape, d2, path, order)
    return out
