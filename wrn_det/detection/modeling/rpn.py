"""The region proposal network: its builder and proposal selection.

:func:`build_rpn` configures torchvision's ``RegionProposalNetwork`` from ``MODEL.RPN`` and
``MODEL.ANCHOR_GENERATOR``; both detectors of :mod:`.meta_arch` use it, so an RPN's weights
load into a Faster R-CNN and back. Its head's convolutions are of the class ``MODEL.FAST_CPU``
chooses (:class:`RPNConvHead`).
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops

from wrn_det.engine.errors import ConfigError

from .base import ConvNormAct, get_conv_layer, in_feature_channels

__all__ = ["build_rpn", "select_top_proposals", "StridedAnchorGenerator", "RPNConvHead"]


class RPNConvHead(RPNHead):
    """torchvision's ``RPNHead`` with its convolutions built by ``conv_layer`` (default ``nn.Conv2d``).

    ``conv_depth`` 3x3 convolutions with ReLU, then the 1x1 objectness and box-delta layers,
    built in torchvision's order with its initialisation: the same modules, state-dict keys
    (torchvision's older keys load too), initial weights and ``forward`` (per-level
    objectness logits and box deltas) as torchvision's, whose constructor fixes ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        nn.Module.__init__(self)
        conv_layer = conv_layer or nn.Conv2d
        self.conv = nn.Sequential(*[ConvNormAct(in_channels, in_channels, 3, norm_layer=None, conv_layer=conv_layer)
                                    for _ in range(conv_depth)])
        self.cls_logits = conv_layer(in_channels, num_anchors, kernel_size=1, stride=1)
        self.bbox_pred = conv_layer(in_channels, num_anchors * 4, kernel_size=1, stride=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0)


class StridedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` (the same rounded cell anchors) with every level's stride known.

    torchvision infers a level's stride as padded image size // feature size, which is
    exact only when the image is padded to a multiple of the coarsest stride (64 for
    p2..p6, where a max-pooled p6 would take any size). With the strides given, images
    are padded to the bottom-up network's coarsest stride only (32), as detectron2 does,
    and the anchors are the same wherever the old padding gave the same feature maps.
    ``forward`` returns the anchors of all levels (levels concatenated, finest first) once
    per image, as torchvision's does.
    """

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int]):
        super().__init__(sizes, aspect_ratios)
        self.strides = [int(s) for s in strides]

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        """Return one (sum_l A * H_l * W_l, 4) XYXY anchor tensor per image of ``image_list``."""
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        # the same tensor for every image (the RPN only reads it)
        return [anchors for _ in range(len(image_list.image_sizes))]


def _per_level(values, n: int, key: str) -> List[List[float]]:
    values = [list(v) for v in values]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{key} has {len(values)} entries; expected 1 or one per RPN level ({n})")
    return values


def build_rpn(cfg, input_shapes) -> RegionProposalNetwork:
    """Return torchvision's RegionProposalNetwork configured by ``MODEL.RPN`` and ``MODEL.ANCHOR_GENERATOR``.

    ``input_shapes``: the backbone's ``output_shape()``; the RPN reads ``MODEL.RPN.IN_FEATURES``.
    """
    rpn_cfg = cfg.MODEL.RPN
    in_features = list(rpn_cfg.IN_FEATURES)
    c = in_feature_channels("MODEL.RPN.IN_FEATURES", in_features, input_shapes)
    ag = cfg.MODEL.ANCHOR_GENERATOR
    if ag.NAME != "DefaultAnchorGenerator" or float(ag.OFFSET) != 0.0:
        raise ConfigError("MODEL.ANCHOR_GENERATOR: only NAME DefaultAnchorGenerator with OFFSET 0.0 is supported")
    sizes = _per_level(ag.SIZES, len(in_features), "MODEL.ANCHOR_GENERATOR.SIZES")
    ratios = _per_level(ag.ASPECT_RATIOS, len(in_features), "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    num_anchors = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if len(num_anchors) != 1:
        raise ConfigError("MODEL.ANCHOR_GENERATOR: every level needs the same number of anchors (the RPN head is shared)")
    anchor_generator = StridedAnchorGenerator(tuple(tuple(float(v) for v in s) for s in sizes),
                                              tuple(tuple(float(v) for v in r) for r in ratios),
                                              [input_shapes[f].stride for f in in_features])
    dims = list(rpn_cfg.CONV_DIMS)
    if any(d not in (-1, c) for d in dims):
        raise ConfigError(f"MODEL.RPN.CONV_DIMS {dims}: the builtin RPN head keeps the input width ({c}); use -1")
    if rpn_cfg.HEAD_NAME != "StandardRPNHead":
        raise ConfigError(f"MODEL.RPN.HEAD_NAME {rpn_cfg.HEAD_NAME!r} is not supported; use StandardRPNHead")
    if list(rpn_cfg.IOU_LABELS) != [0, -1, 1] or rpn_cfg.BOUNDARY_THRESH != -1:
        raise ConfigError("MODEL.RPN: only IOU_LABELS [0, -1, 1] and BOUNDARY_THRESH -1 are supported")
    bg_iou, fg_iou = rpn_cfg.IOU_THRESHOLDS
    rpn = RegionProposalNetwork(
        anchor_generator, RPNConvHead(c, num_anchors.pop(), conv_depth=len(dims), conv_layer=get_conv_layer(cfg)),
        fg_iou_thresh=fg_iou, bg_iou_thresh=bg_iou,
        batch_size_per_image=rpn_cfg.BATCH_SIZE_PER_IMAGE, positive_fraction=rpn_cfg.POSITIVE_FRACTION,
        pre_nms_top_n={"training": rpn_cfg.PRE_NMS_TOPK_TRAIN, "testing": rpn_cfg.PRE_NMS_TOPK_TEST},
        post_nms_top_n={"training": rpn_cfg.POST_NMS_TOPK_TRAIN, "testing": rpn_cfg.POST_NMS_TOPK_TEST},
        nms_thresh=rpn_cfg.NMS_THRESH,
    )
    rpn.box_coder = det_utils.BoxCoder(weights=tuple(float(w) for w in rpn_cfg.BBOX_REG_WEIGHTS))
    rpn.in_features = in_features
    # detectron2's MODEL.PROPOSAL_GENERATOR.MIN_SIZE (torchvision's own floor is 1e-3 pixels)
    rpn.min_size = max(float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE), 1e-3)
    return rpn


def select_top_proposals(proposals: torch.Tensor, logits: torch.Tensor, num_per_level: Sequence[int],
                         image_sizes: Sequence[Tuple[int, int]], pre_nms_topk: int, post_nms_topk: int,
                         nms_thresh: float, min_size: float) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Pick the proposals of every image as detectron2's ``find_top_rpn_proposals`` does.

    ``proposals``: (N, R, 4) decoded boxes of all levels, ``logits``: (N, R) objectness
    logits, ``num_per_level``: how many of the R belong to each level. Per level the
    ``pre_nms_topk`` best are kept; then, per image, boxes are clipped, those with a
    non-finite value or a side of at most ``min_size`` are dropped, NMS runs within each
    level, and the ``post_nms_topk`` best remain. Returns one ``(boxes (K, 4), logits
    (K,))`` pair per image, sorted by decreasing logit.
    """
    n = logits.shape[0]
    chosen, levels, start = [], [], 0
    for level, count in enumerate(num_per_level):
        k = min(int(pre_nms_topk), count)
        idx = logits[:, start:start + count].topk(k, dim=1).indices + start
        chosen.append(idx)
        levels.append(torch.full((k,), level, dtype=torch.int64, device=logits.device))
        start += count
    idx = torch.cat(chosen, dim=1)
    levels = torch.cat(levels)
    batch = torch.arange(n, device=logits.device)[:, None]
    top_boxes, top_logits = proposals[batch, idx], logits[batch, idx]
    out = []
    for boxes, scores, size in zip(top_boxes, top_logits, image_sizes):
        ok = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes, scores, lvl = box_ops.clip_boxes_to_image(boxes[ok], size), scores[ok], levels[ok]
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (wh > min_size).all(dim=1)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = box_ops.batched_nms(boxes, scores, lvl, nms_thresh)[: int(post_nms_topk)]
        out.append((boxes[keep], scores[keep]))
    return out
