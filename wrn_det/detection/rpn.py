"""The region proposal network: its builder, proposal selection, and the RPN-only detector.

:func:`build_rpn` configures torchvision's ``RegionProposalNetwork`` from ``MODEL.RPN`` and
``MODEL.ANCHOR_GENERATOR``; both detectors use it, so an RPN's weights load into a Faster
R-CNN and back. :class:`ProposalNetwork` (``MODEL.META_ARCHITECTURE: ProposalNetwork``) is a
WRN backbone (C4 or FPN) and that RPN: training returns the RPN losses; inference returns,
per image, the proposals in original-image XYXY pixels with their objectness logits, which
is what detectron2's proposal files hold.
"""
from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from wrn_det.engine.errors import ConfigError

from .backbone import build_backbone
from .base import LOSS_NAMES, DetectorBase, check_unsupported, in_feature_channels
from .fast_conv import use_fast_convs, fast_convs
from .registry import META_ARCH_REGISTRY

__all__ = ["build_rpn", "ProposalNetwork", "select_top_proposals", "StridedAnchorGenerator"]


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
        anchor_generator, RPNHead(c, num_anchors.pop(), conv_depth=len(dims)),
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


@META_ARCH_REGISTRY.register()
class ProposalNetwork(DetectorBase):
    """RPN-only detector: backbone + region proposal network.

    ``forward(batched_inputs)`` returns, in training, ``{"loss_rpn_cls", "loss_rpn_loc"}``
    and, in inference, one ``{"proposals": (K, 4) XYXY boxes in original-image pixels,
    "objectness_logits": (K,)}`` per image, best first, at most
    ``MODEL.RPN.POST_NMS_TOPK_TEST`` of them.
    """

    def __init__(self, cfg):
        if cfg.MODEL.PROPOSAL_GENERATOR.NAME != "RPN" or cfg.MODEL.LOAD_PROPOSALS:
            raise ConfigError(f"MODEL.META_ARCHITECTURE ProposalNetwork needs MODEL.PROPOSAL_GENERATOR.NAME 'RPN' "
                              f"and MODEL.LOAD_PROPOSALS False; got {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r} and "
                              f"{cfg.MODEL.LOAD_PROPOSALS}")
        check_unsupported(cfg)
        super().__init__(cfg, build_backbone(cfg))
        self.rpn = build_rpn(cfg, self.backbone.output_shape())
        self.min_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)
        w = cfg.MODEL.RPN.LOSS_WEIGHT
        self.loss_weights = {"loss_rpn_cls": w, "loss_rpn_loc": w * cfg.MODEL.RPN.BBOX_REG_LOSS_WEIGHT}
        use_fast_convs(self)

    def forward(self, batched_inputs: List[dict]):
        """Return the RPN losses (training) or the proposals and objectness logits of every image (inference)."""
        with fast_convs():
            return self._forward(batched_inputs)

    def _forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensors)
        feats = OrderedDict((f, features[f]) for f in self.rpn.in_features)
        if self.training:
            # torchvision's RPN also selects proposals in training; they are not needed here (as in detectron2)
            _, losses = self.rpn(images, feats, self.targets(batched_inputs))
            return {LOSS_NAMES[k]: v * self.loss_weights[LOSS_NAMES[k]] for k, v in losses.items()}
        results = []
        for (boxes, logits), x, size in zip(self.propose(images, list(feats.values())), batched_inputs,
                                            images.image_sizes):
            boxes = self.rescale(boxes, size, x.get("height", size[0]), x.get("width", size[1]))
            # boxes squeezed to nothing by the clip in the original image are no proposals
            keep = ((boxes[:, 2:] - boxes[:, :2]) > 0).all(dim=1)
            results.append({"proposals": boxes[keep], "objectness_logits": logits[keep]})
        return results

    def propose(self, images, feats: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Return ``(boxes, logits)`` per image in network-input coordinates (inference settings of the RPN).

        torchvision's RPN returns boxes only; the logits are what detectron2 stores in
        proposal files, so the selection is redone here keeping them.
        """
        rpn = self.rpn
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(images, feats)
        num_per_level = [o[0].numel() for o in objectness]  # A * H * W per level
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return select_top_proposals(proposals, objectness.detach().view(len(anchors), -1), num_per_level,
                                    images.image_sizes, rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"],
                                    rpn.nms_thresh, max(self.min_size, 0.0))
