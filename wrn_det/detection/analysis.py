"""How big and how fast a detector is: parameters and GFLOPs by part, inference time per image.

The parts are those a detection researcher compares: the bottom-up network
(``backbone``), the feature pyramid (``FPN``), the region proposal network's head
(``RPN``) and the box head with its predictor (``RoI heads``; for C4 that is the
network's own next stage). FLOPs are fvcore's count, in which one fused multiply-add
is one flop (as detectron2's ``tools/analyze_model.py`` reports them); operations
without multiply-adds (RoIAlign, NMS, anchor decoding) count nothing. The RoI heads are
counted on ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals per image, the number the RPN
hands them at most, so the figure does not depend on the weights.
"""
import logging
import math
import time
import warnings
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from torch import nn

from wrn_det.data.det_loader import DetectionMapper

__all__ = ["network_input_size", "detector_parameters", "detector_gflops", "benchmark_inference"]


def network_input_size(model: nn.Module, height: int, width: int) -> Tuple[int, int]:
    """Return the size an image of ``height`` x ``width`` has inside the detector (padded to its stride)."""
    d = max(int(getattr(model, "size_divisibility", 0)), 1)
    return int(math.ceil(height / d) * d), int(math.ceil(width / d) * d)


def _parts(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    backbone = model.backbone
    parts = OrderedDict()
    parts["backbone"] = getattr(backbone, "bottom_up", backbone)
    if hasattr(backbone, "fpn"):
        parts["FPN"] = backbone.fpn
    if getattr(model, "rpn", None) is not None:
        parts["RPN"] = model.rpn
    if hasattr(model, "roi_heads"):
        parts["RoI heads"] = model.roi_heads
    return parts


def detector_parameters(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """Return ``{part: {"total", "trainable"}}`` and ``"all"``: parameters of each part and of the whole detector.

    A parameter shared by two parts (the C4 box head is the network's stage) counts once,
    in the part that runs it (the RoI heads). ``trainable`` counts ``requires_grad``
    parameters, so it reflects ``MODEL.BACKBONE.FREEZE_AT`` and frozen BatchNorm.
    """
    parts = _parts(model)
    owner: Dict[int, str] = {}
    for name in reversed(list(parts)):  # later parts win: a shared head stage belongs to the RoI heads
        for p in parts[name].parameters():
            owner.setdefault(id(p), name)
    out = OrderedDict((name, {"total": 0, "trainable": 0}) for name in parts)
    out["all"] = {"total": 0, "trainable": 0}
    for p in model.parameters():
        name = owner.get(id(p), "backbone")
        for key in (name, "all"):
            out[key]["total"] += p.numel()
            out[key]["trainable"] += p.numel() if p.requires_grad else 0
    return out


def _count(module: nn.Module, inputs: tuple) -> int:
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore names the ops it skips (no multiply-adds) and torch.jit deprecations
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())


class _Features(nn.Module):
    """The FPN as a module of tensors in and a tuple out (fvcore traces tensors, not dicts)."""

    def __init__(self, fpn: nn.Module, names):
        super().__init__()
        self.fpn, self.names = fpn, list(names)

    def forward(self, *feats):
        return tuple(self.fpn(OrderedDict(zip(self.names, feats))).values())


@torch.no_grad()
def detector_gflops(model: nn.Module, cfg, height: int = 800, width: int = 1333) -> "OrderedDict[str, float]":
    """Return GFLOPs of each part (see the module docstring) and ``"total"`` for one ``height`` x ``width`` image.

    The image is padded as the detector pads it (:func:`network_input_size`).
    """
    model = model.eval()
    h, w = network_input_size(model, height, width)
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, h, w, device=device)
    parts = _parts(model)
    out = OrderedDict()
    bottom_up = parts["backbone"]
    out["backbone"] = _count(bottom_up, (x,))
    feats = model.backbone(x)
    if "FPN" in parts:
        names = list(model.backbone.in_features)
        low = bottom_up(x)
        out["FPN"] = _count(_Features(model.backbone.fpn, names), tuple(low[n] for n in names))
    if "RPN" in parts:
        rpn = model.rpn
        out["RPN"] = _count(rpn.head, ([feats[f] for f in rpn.in_features],))
    if "RoI heads" in parts:
        heads = model.roi_heads
        r = int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
        pooled = heads.box_roi_pool(feats, [torch.tensor([[0.0, 0.0, 32.0, 32.0]], device=device)], [(h, w)])
        pooled = pooled.new_zeros((r,) + tuple(pooled.shape[1:]))
        box_features = heads.box_head(pooled)
        out["RoI heads"] = _count(heads.box_head, (pooled,)) + _count(heads.box_predictor, (box_features,))
    out["total"] = sum(out.values())
    return OrderedDict((k, v / 1e9) for k, v in out.items())


@torch.no_grad()
def benchmark_inference(model: nn.Module, cfg, height: int, width: int, runs: int, warmup: int = 2) -> dict:
    """Return ``{"median_s", "runs", "device"}``: median seconds of one forward pass of the whole detector
    (pre-processing, backbone, RPN, RoI heads, post-processing) on a random ``height`` x ``width`` image,
    mapped by the test mapper, after ``warmup`` passes, on the model's device."""

    model = model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    inputs = [DetectionMapper(cfg, is_train=False).map_image(image, {"height": height, "width": width,
                                                                     "image_id": 0, "file_name": ""})]
    times = []
    for i in range(warmup + runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "runs": runs, "device": str(device)}
