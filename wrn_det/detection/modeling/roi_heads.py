"""The box RoI heads of the builtin detectors: the pooler, the box heads (FC for FPN, the network's next
stage for C4) and :func:`build_roi_heads`, which assembles them into torchvision's ``RoIHeads``.

``MODEL.FAST_CPU.ROI_ALIGN`` chooses the pooler's CPU kernel, ``MODEL.FAST_CPU.CONV`` the class of
the box head's convolutions (the C4 head runs the backbone network's own stage, built alike).
"""
import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from wrn_det.engine.errors import ConfigError
from wrn_det.models.norm import get_norm

from .base import ConvNormAct, get_conv_layer, in_feature_channels
from .poolers import assign_boxes_to_levels, boxes_to_rois, multilevel_roi_align

__all__ = ["ROIPooler", "FCBoxHead", "Res5BoxHead", "RES5_HEAD_NAMES", "build_roi_heads"]


class ROIPooler(MultiScaleRoIAlign):
    """RoIAlign over one or several feature levels with known strides.

    As torchvision's MultiScaleRoIAlign (same level assignment: canonical box 224 on
    level 4) but with the scales taken from the backbone's strides instead of guessed
    from the first batch, ``aligned`` (detectron2's ``ROIAlignV2``: half-pixel offset)
    selectable, and all levels pooled in one pass by :mod:`wrn_det.detection.modeling.poolers`.
    ``cpu_kernel`` True: that module's CPU kernel on the CPU (torchvision's on CUDA and while
    exporting); False: torchvision's ``roi_align`` everywhere. Calling it returns pooled
    features (R, C, out, out).
    """

    def __init__(self, featmap_names: List[str], strides: List[int], output_size: int, sampling_ratio: int,
                 aligned: bool = True, cpu_kernel: bool = True):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned
        self.cpu_kernel = bool(cpu_kernel)
        self.scales = [1.0 / s for s in strides]
        self.min_level, self.max_level = int(round(math.log2(strides[0]))), int(round(math.log2(strides[-1])))
        self.pooled_size = int(output_size)
        # set when the box head reads channels-last features as they are (FCBoxHead): in
        # inference the pooled features then skip a transposing copy
        self.channels_last_inference = False

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor], image_shapes=None) -> torch.Tensor:
        """Return the pooled features of every box, in the order of the concatenated ``boxes``."""
        feats = [x[name] for name in self.featmap_names]
        rois = boxes_to_rois(boxes)
        levels = None
        if len(feats) > 1:
            levels = assign_boxes_to_levels(rois[:, 1:], self.min_level, self.max_level)
        return multilevel_roi_align(feats, rois, levels, self.scales, self.pooled_size, self.sampling_ratio,
                                    self.aligned, self.channels_last_inference and not torch.is_grad_enabled(),
                                    cpu_kernel=self.cpu_kernel)


class FCBoxHead(FastRCNNConvFCHead):
    """torchvision's ``FastRCNNConvFCHead`` with the convolution class chosen, that also reads channels-last
    pooled features without a copy.

    ``conv_layers`` 3x3 convolutions (:class:`~.base.ConvNormAct` with ``norm_layer``, built by
    ``conv_layer``, default ``nn.Conv2d``), then ``fc_layers`` fully connected layers with ReLU,
    built in torchvision's order with its initialisation (torchvision's constructor fixes
    ``nn.Conv2d``). With no convolutions, the first layer is a fully connected one on the
    flattened (C, P, P) features; for channels-last input (the CPU pooler's layout in
    inference) it runs on the (P, P, C) flattening with its weight's columns permuted alike
    (kept until the weight changes). Same parameters, state-dict keys, initial weights and
    results as torchvision's module.
    """

    def __init__(self, input_size, conv_layers: List[int], fc_layers: List[int],
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        in_channels, in_height, in_width = input_size
        blocks, previous = [], in_channels
        for channels in conv_layers:
            blocks.append(ConvNormAct(previous, channels, 3, norm_layer=norm_layer, conv_layer=conv_layer))
            previous = channels
        blocks.append(nn.Flatten())
        previous = previous * in_height * in_width
        for channels in fc_layers:
            blocks += [nn.Linear(previous, channels), nn.ReLU(inplace=True)]
            previous = channels
        nn.Sequential.__init__(self, *blocks)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the box features (R, FC_DIM) of pooled features ``x`` (R, C, P, P), in either memory layout."""
        fc = self[1] if len(self) > 1 and isinstance(self[0], nn.Flatten) else None
        if (fc is None or not isinstance(fc, nn.Linear) or x.dim() != 4 or x.is_contiguous()
                or not x.is_contiguous(memory_format=torch.channels_last) or torch.jit.is_tracing()):
            return super().forward(x)
        r, c, h, w = x.shape
        y = nn.functional.linear(x.permute(0, 2, 3, 1).reshape(r, h * w * c), self._permuted_weight(fc, c, h * w),
                                 fc.bias)
        for layer in list(self)[2:]:
            y = layer(y)
        return y

    def _permuted_weight(self, fc: nn.Linear, c: int, bins: int) -> torch.Tensor:
        w = fc.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, c, bins)
        cached = getattr(self, "_permuted", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                permuted = w.view(w.shape[0], c, bins).transpose(1, 2).reshape(w.shape[0], bins * c)
            cached = (key, permuted)
            self._permuted = cached
        return cached[1]


# ROI_HEADS.NAME values that run the backbone's next stage on pooled features (detectron2
# builds ResNet bottlenecks for its own Res5ROIHeads; the WRN variant reuses the network's stage)
RES5_HEAD_NAMES = ("WRNRes5ROIHeads", "Res5ROIHeads")


class Res5BoxHead(nn.Module):
    """C4 box head: the network's stage after the trunk on pooled RoI features, then a global mean.

    Returns (R, channels) features for the predictor.
    """

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.res5 = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mean over space of the stage's output, (R, C)."""
        return self.res5(x).mean(dim=(2, 3))


def _init_predictor(predictor: FastRCNNPredictor) -> FastRCNNPredictor:
    # small initial outputs (as detectron2): near-uniform class scores and near-zero box deltas
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


def build_roi_heads(cfg, backbone) -> RoIHeads:
    """Return torchvision's RoIHeads: pooler, box head and predictor from ``MODEL.ROI_HEADS`` and ``ROI_BOX_HEAD``.

    ``StandardROIHeads``: ``NUM_CONV`` convolutions and ``NUM_FC`` fully connected layers
    on ``POOLER_RESOLUTION`` pooled features (FPN). ``WRNRes5ROIHeads``: the backbone's
    next stage on pooled features (C4; stride 2 halves 14x14 to 7x7). The pooler's kernel
    and the convolution class come from ``MODEL.FAST_CPU`` (``ROI_ALIGN``, ``CONV``).
    """
    rh, bh = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
    shapes = backbone.output_shape()
    in_features = list(rh.IN_FEATURES)
    c = in_feature_channels("MODEL.ROI_HEADS.IN_FEATURES", in_features, shapes)
    if bh.POOLER_TYPE not in ("ROIAlign", "ROIAlignV2"):
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.POOLER_TYPE {bh.POOLER_TYPE!r} is not supported; use ROIAlignV2 or ROIAlign")
    if bh.CLS_AGNOSTIC_BBOX_REG or not rh.PROPOSAL_APPEND_GT or list(rh.IOU_LABELS) != [0, 1] or len(rh.IOU_THRESHOLDS) != 1:
        raise ConfigError("MODEL.ROI_HEADS / ROI_BOX_HEAD: the builtin engine supports class-specific regression, "
                          "PROPOSAL_APPEND_GT True and one IoU threshold with IOU_LABELS [0, 1]")
    res = int(bh.POOLER_RESOLUTION)
    pooler = ROIPooler(in_features, [shapes[f].stride for f in in_features], res, int(bh.POOLER_SAMPLING_RATIO),
                       aligned=bh.POOLER_TYPE == "ROIAlignV2", cpu_kernel=bool(cfg.MODEL.FAST_CPU.ROI_ALIGN))
    if rh.NAME == "StandardROIHeads":
        if bh.NAME != "FastRCNNConvFCHead":
            raise ConfigError(f"MODEL.ROI_BOX_HEAD.NAME {bh.NAME!r} is not supported; use FastRCNNConvFCHead")
        if bh.NORM not in ("", "BN", "SyncBN", "GN"):
            raise ConfigError(f"MODEL.ROI_BOX_HEAD.NORM {bh.NORM!r} is not supported; use '', BN, SyncBN or GN")
        norm = get_norm(bh.NORM)
        box_head = FCBoxHead((c, res, res), [bh.CONV_DIM] * bh.NUM_CONV, [bh.FC_DIM] * bh.NUM_FC, norm,
                             conv_layer=get_conv_layer(cfg))
        out_dim = bh.FC_DIM if bh.NUM_FC else (bh.CONV_DIM if bh.NUM_CONV else c) * res * res
        pooler.channels_last_inference = bh.NUM_CONV == 0 and bh.NUM_FC > 0
    elif rh.NAME in RES5_HEAD_NAMES:
        if not hasattr(backbone, "claim_next_stage"):
            raise ConfigError(f"MODEL.ROI_HEADS.NAME {rh.NAME} needs the C4 backbone build_wrn_backbone")
        _, stage, out_dim = backbone.claim_next_stage()
        box_head = Res5BoxHead(stage)
    else:
        raise ConfigError(f"MODEL.ROI_HEADS.NAME {rh.NAME!r} is not supported; use StandardROIHeads (FPN) "
                          f"or WRNRes5ROIHeads (C4)")
    predictor = _init_predictor(FastRCNNPredictor(out_dim, rh.NUM_CLASSES + 1))
    iou = float(rh.IOU_THRESHOLDS[0])
    return RoIHeads(
        pooler, box_head, predictor,
        fg_iou_thresh=iou, bg_iou_thresh=iou,
        batch_size_per_image=rh.BATCH_SIZE_PER_IMAGE, positive_fraction=rh.POSITIVE_FRACTION,
        bbox_reg_weights=tuple(float(w) for w in bh.BBOX_REG_WEIGHTS),
        score_thresh=rh.SCORE_THRESH_TEST, nms_thresh=rh.NMS_THRESH_TEST,
        detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
