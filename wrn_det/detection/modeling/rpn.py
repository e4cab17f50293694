"""The region proposal network of the builtin detectors, with detectron2's semantics and keys.

:func:`build_rpn` builds :class:`RPN` from ``MODEL.RPN``, ``MODEL.ANCHOR_GENERATOR`` and
``MODEL.PROPOSAL_GENERATOR``; both detectors of :mod:`.meta_arch` use it, so an RPN's weights load
into a Faster R-CNN and back. What detectron2's ``RPN`` does, this one does: detectron2's anchors
(:class:`AnchorGenerator`), IoU matching with low-quality matches, ``BOUNDARY_THRESH``, random
sampling of ``BATCH_SIZE_PER_IMAGE`` anchors, the objectness and box losses summed and divided by
``BATCH_SIZE_PER_IMAGE`` x images (``SMOOTH_L1_BETA``, ``BBOX_REG_LOSS_TYPE``, ``BBOX_REG_WEIGHTS``,
``LOSS_WEIGHT``, ``BBOX_REG_LOSS_WEIGHT``), and proposals picked per level before NMS and per image
after it (:func:`select_top_proposals`). The box geometry is float32 under any autocast
(:mod:`.box_ops`). The head's convolutions are of the class ``MODEL.FAST_CPU`` chooses
(:class:`RPNConvHead`); its state-dict keys are torchvision's ``RPNHead``'s.
"""
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import _topk_min
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import boxes as box_ops

from wrn_det.engine.errors import ConfigError

from .base import ConvNormAct, get_conv_layer, in_feature_channels
from .box_ops import (BoxTransform, Matcher, box_regression_loss, check_iou_matching, check_loss_type, pairwise_iou,
                      subsample_labels)

__all__ = ["build_rpn", "RPN", "select_top_proposals", "AnchorGenerator", "cell_anchors", "RPNConvHead"]


class RPNConvHead(RPNHead):
    """torchvision's ``RPNHead`` with its convolutions built by ``conv_layer`` (default ``nn.Conv2d``).

    ``conv_depth`` 3x3 convolutions with ReLU, then the 1x1 objectness and box-delta layers,
    built in torchvision's order with its initialisation (normal, std 0.01, zero biases: also
    detectron2's ``StandardRPNHead``): the same modules, state-dict keys (torchvision's older
    keys load too), initial weights and ``forward`` (per-level objectness logits (N, A, H, W)
    and box deltas (N, 4A, H, W)) as torchvision's, whose constructor fixes ``nn.Conv2d``.
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


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> List[List[float]]:
    """Return the cell anchors of one level, centred on 0: ``[x1, y1, x2, y2]`` per (ratio, size), ratio-major.

    detectron2's ``DefaultAnchorGenerator`` boxes: for a size ``s`` and ratio ``a`` (height /
    width) ``w = sqrt(s * s / a)``, ``h = a * w``, not rounded. They are listed ratio-major
    (every size of the first ratio first), the RPN head's channel order in every builtin
    checkpoint (torchvision's listing); detectron2 lists them size-major, so its checkpoints'
    RPN head rows are reordered when loaded (:mod:`wrn_det.detection.weights.d2_keys`). With
    one size per level (the FPN configs) the two orders are the same.
    """
    cells = []
    for ratio in aspect_ratios:
        for size in sizes:
            w = math.sqrt(float(size) ** 2 / float(ratio))
            h = float(ratio) * w
            cells.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return cells


class AnchorGenerator(nn.Module):
    """detectron2's ``DefaultAnchorGenerator``: :func:`cell_anchors` repeated over every level's grid, in float32.

    ``sizes`` and ``aspect_ratios``: one list per level; ``strides``: every level's stride
    (known from the backbone, so images are padded only to the bottom-up network's coarsest
    stride, as detectron2 pads); ``offset``: where in its cell a grid point sits (0.0: the
    cell's corner, detectron2's default for these configs; 0.5: its centre). Calling it with
    the feature maps returns one (H * W * A, 4) float32 XYXY tensor per level, location-major
    (the order of the RPN head's flattened outputs). The anchors are float32 whatever the
    feature maps' dtype (autocast) and hold no state: the module has no parameters or buffers.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int], offset: float = 0.0):
        super().__init__()
        if len(sizes) != len(strides) or len(aspect_ratios) != len(strides):
            raise ValueError(f"one list of sizes and of ratios per level needed: {len(strides)} levels, "
                             f"{len(sizes)} and {len(aspect_ratios)} given")
        self.sizes = tuple(tuple(float(s) for s in level) for level in sizes)
        self.aspect_ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios)
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        self._cells = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self._on_device: Dict[torch.device, List[Tensor]] = {}

    def num_anchors_per_location(self) -> List[int]:
        """Return the number of cell anchors of every level."""
        return [len(c) for c in self._cells]

    def cell_anchors(self, device: torch.device) -> List[Tensor]:
        """Return every level's cell anchors as float32 (A, 4) tensors on ``device`` (made once per device)."""
        cells = self._on_device.get(device)
        if cells is None:
            cells = [torch.tensor(c, dtype=torch.float32, device=device) for c in self._cells]
            self._on_device[device] = cells
        return cells

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        """Return the anchors of every level, (H * W * A, 4) float32, for feature maps (N, C, H, W)."""
        out = []
        for feature, stride, cells in zip(features, self.strides, self.cell_anchors(features[0].device)):
            h, w = feature.shape[-2:]
            xs = torch.arange(self.offset * stride, w * stride, step=stride, dtype=torch.float32, device=cells.device)
            ys = torch.arange(self.offset * stride, h * stride, step=stride, dtype=torch.float32, device=cells.device)
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            out.append((shifts.view(-1, 1, 4) + cells.view(1, -1, 4)).reshape(-1, 4))
        return out

    def __getstate__(self):
        # the per-device tensors are a cache: a copy (deepcopy, pickle) makes its own
        return {**self.__dict__, "_on_device": {}}


class RPN(nn.Module):
    """Region proposal network: objectness and box deltas per anchor, proposals, and detectron2's losses.

    ``forward(images, features, targets=None)`` takes the ``ImageList``, a mapping from
    feature name to map (at least ``in_features``) and, in training, torchvision-style
    targets (``boxes`` XYXY); it returns ``(proposals, losses)``: one (K, 4) float32 XYXY
    tensor per image, best first, and ``{"loss_rpn_cls", "loss_rpn_loc"}`` in training
    (weighted by ``loss_weight``), ``{}`` otherwise. :meth:`predict_proposals` also gives
    the proposals' objectness logits.
    """

    def __init__(self, in_features: Sequence[str], head: RPNConvHead, anchor_generator: AnchorGenerator,
                 matcher: Matcher, box_transform: BoxTransform, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_topk: Tuple[int, int], post_nms_topk: Tuple[int, int], nms_thresh: float = 0.7,
                 min_size: float = 0.0, boundary_thresh: float = -1.0, loss_type: str = "smooth_l1",
                 smooth_l1_beta: float = 0.0, loss_weight: Optional[Dict[str, float]] = None):
        super().__init__()
        self.in_features = list(in_features)
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.box_coder = box_transform
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.pre_nms_topk = {True: int(pre_nms_topk[0]), False: int(pre_nms_topk[1])}
        self.post_nms_topk = {True: int(post_nms_topk[0]), False: int(post_nms_topk[1])}
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.boundary_thresh = float(boundary_thresh)
        self.loss_type, self.smooth_l1_beta = loss_type, float(smooth_l1_beta)
        self.loss_weight = dict(loss_weight or {"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0})

    def forward(self, images, features: Dict[str, Tensor], targets: Optional[List[Dict[str, Tensor]]] = None,
                need_proposals: bool = True) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        """Return ``(proposals, losses)`` (see the class docstring); ``need_proposals`` False skips the proposals
        (an RPN trained alone does not use them) and returns an empty list for them."""
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)
        logits, deltas = self.flat_predictions(feats)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training")
            losses = self.losses(torch.cat(anchors), logits, deltas, targets, images.image_sizes)
        if not need_proposals:
            return [], losses
        proposals = self.predict_proposals(anchors, logits, deltas, images.image_sizes)
        return [boxes for boxes, _ in proposals], losses

    def flat_predictions(self, feats: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Return the head's outputs per level, flattened as the anchors are: logits (N, H*W*A), deltas (N, H*W*A, 4)."""
        logits, deltas = self.head(feats)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                  for x in deltas]
        return logits, deltas

    @torch.no_grad()
    def predict_proposals(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
                          image_sizes) -> List[Tuple[Tensor, Tensor]]:
        """Return ``(boxes (K, 4), logits (K,))`` per image: the deltas decoded (float32) from the anchors, then
        :func:`select_top_proposals` with this mode's (training or test) top-k."""
        n = logits[0].shape[0]
        boxes = [self.box_coder.apply_deltas(d.reshape(-1, 4), a.repeat(n, 1)).view(n, -1, 4)
                 for a, d in zip(anchors, deltas)]
        return select_top_proposals(torch.cat(boxes, dim=1), torch.cat(logits, dim=1).detach(),
                                    [x.shape[1] for x in logits], image_sizes, self.pre_nms_topk[self.training],
                                    self.post_nms_topk[self.training], self.nms_thresh, self.min_size)

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: Tensor, targets: List[Dict[str, Tensor]], image_sizes
                                 ) -> Tuple[Tensor, Tensor]:
        """Return ``(labels (N, R) int8, matched ground-truth boxes (N, R, 4))`` of the anchors (R, 4) of every image.

        Labels: 1 sampled positive, 0 sampled negative, -1 not sampled (ignored).
        """
        labels, matched = [], []
        for target, size in zip(targets, image_sizes):
            gt = target["boxes"].float()
            idx, lab = self.matcher(pairwise_iou(gt, anchors))
            if self.boundary_thresh >= 0:
                t = self.boundary_thresh
                inside = ((anchors[:, 0] >= -t) & (anchors[:, 1] >= -t) & (anchors[:, 2] < size[1] + t)
                          & (anchors[:, 3] < size[0] + t))
                lab = torch.where(inside, lab, -1)
            pos, neg = subsample_labels(lab, self.batch_size_per_image, self.positive_fraction, 0)
            lab = torch.full_like(lab, -1).scatter_(0, pos, 1).scatter_(0, neg, 0)
            labels.append(lab)
            matched.append(gt[idx] if len(gt) else torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(matched)

    def losses(self, anchors: Tensor, logits: List[Tensor], deltas: List[Tensor], targets: List[Dict[str, Tensor]],
               image_sizes) -> Dict[str, Tensor]:
        """Return the weighted ``loss_rpn_cls`` and ``loss_rpn_loc``: sums over the sampled anchors divided by
        ``BATCH_SIZE_PER_IMAGE`` x images, as detectron2's."""
        labels, gt_boxes = self.label_and_sample_anchors(anchors, targets, image_sizes)
        n = labels.shape[0]
        positive = (labels == 1).reshape(-1)
        loc = box_regression_loss(self.loss_type, self.smooth_l1_beta, self.box_coder,
                                  torch.cat(deltas, dim=1).reshape(-1, 4), anchors.repeat(n, 1),
                                  gt_boxes.reshape(-1, 4), positive)
        # every anchor's loss, the unsampled masked out: no boolean indexing, so nothing is read back to the host
        cls = (F.binary_cross_entropy_with_logits(torch.cat(logits, dim=1).float(), (labels == 1).float(),
                                                  reduction="none") * (labels >= 0)).sum()
        normalizer = self.batch_size_per_image * n
        return {"loss_rpn_cls": cls / normalizer * self.loss_weight["loss_rpn_cls"],
                "loss_rpn_loc": loc / normalizer * self.loss_weight["loss_rpn_loc"]}


def _per_level(values, n: int, key: str) -> List[List[float]]:
    values = [list(v) for v in values]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{key} has {len(values)} entries; expected 1 or one per RPN level ({n})")
    return values


def build_anchor_generator(cfg, strides: Sequence[int]) -> AnchorGenerator:
    """Return the anchor generator of ``MODEL.ANCHOR_GENERATOR`` for levels of ``strides``."""
    ag = cfg.MODEL.ANCHOR_GENERATOR
    if ag.NAME != "DefaultAnchorGenerator":
        raise ConfigError(f"MODEL.ANCHOR_GENERATOR.NAME {ag.NAME!r} is not supported; use DefaultAnchorGenerator")
    if not 0.0 <= float(ag.OFFSET) < 1.0:
        raise ConfigError(f"MODEL.ANCHOR_GENERATOR.OFFSET must be in [0, 1), got {ag.OFFSET}")
    sizes = _per_level(ag.SIZES, len(strides), "MODEL.ANCHOR_GENERATOR.SIZES")
    ratios = _per_level(ag.ASPECT_RATIOS, len(strides), "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    if any(not s for s in sizes) or any(not r for r in ratios) or any(float(v) <= 0 for s in sizes + ratios for v in s):
        raise ConfigError("MODEL.ANCHOR_GENERATOR: SIZES and ASPECT_RATIOS need positive values on every level")
    if len({len(s) * len(r) for s, r in zip(sizes, ratios)}) != 1:
        raise ConfigError("MODEL.ANCHOR_GENERATOR: every level needs the same number of anchors (the RPN head is shared)")
    return AnchorGenerator(sizes, ratios, strides, float(ag.OFFSET))


def build_rpn(cfg, input_shapes) -> RPN:
    """Return the :class:`RPN` configured by ``MODEL.RPN``, ``MODEL.ANCHOR_GENERATOR`` and ``MODEL.PROPOSAL_GENERATOR``.

    ``input_shapes``: the backbone's ``output_shape()``; the RPN reads ``MODEL.RPN.IN_FEATURES``.
    Raises :class:`ConfigError` naming the key of a value it cannot honour.
    """
    rpn_cfg = cfg.MODEL.RPN
    in_features = list(rpn_cfg.IN_FEATURES)
    c = in_feature_channels("MODEL.RPN.IN_FEATURES", in_features, input_shapes)
    anchor_generator = build_anchor_generator(cfg, [input_shapes[f].stride for f in in_features])
    dims = list(rpn_cfg.CONV_DIMS)
    if any(d not in (-1, c) for d in dims):
        raise ConfigError(f"MODEL.RPN.CONV_DIMS {dims}: the builtin RPN head keeps the input width ({c}); use -1")
    if rpn_cfg.HEAD_NAME != "StandardRPNHead":
        raise ConfigError(f"MODEL.RPN.HEAD_NAME {rpn_cfg.HEAD_NAME!r} is not supported; use StandardRPNHead")
    thresholds, labels = check_iou_matching("MODEL.RPN", rpn_cfg.IOU_THRESHOLDS, rpn_cfg.IOU_LABELS)
    loss_type, beta = check_loss_type("MODEL.RPN", rpn_cfg.BBOX_REG_LOSS_TYPE, rpn_cfg.SMOOTH_L1_BETA)
    weights = tuple(float(w) for w in rpn_cfg.BBOX_REG_WEIGHTS)
    if len(weights) != 4 or any(w <= 0 for w in weights):
        raise ConfigError(f"MODEL.RPN.BBOX_REG_WEIGHTS must be 4 positive numbers, got {list(rpn_cfg.BBOX_REG_WEIGHTS)}")
    head = RPNConvHead(c, anchor_generator.num_anchors_per_location()[0], conv_depth=len(dims),
                       conv_layer=get_conv_layer(cfg))
    return RPN(in_features, head, anchor_generator, Matcher(thresholds, labels, allow_low_quality_matches=True),
               BoxTransform(weights), rpn_cfg.BATCH_SIZE_PER_IMAGE, rpn_cfg.POSITIVE_FRACTION,
               (rpn_cfg.PRE_NMS_TOPK_TRAIN, rpn_cfg.PRE_NMS_TOPK_TEST),
               (rpn_cfg.POST_NMS_TOPK_TRAIN, rpn_cfg.POST_NMS_TOPK_TEST), rpn_cfg.NMS_THRESH,
               min_size=float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE), boundary_thresh=float(rpn_cfg.BOUNDARY_THRESH),
               loss_type=loss_type, smooth_l1_beta=beta,
               loss_weight={"loss_rpn_cls": float(rpn_cfg.LOSS_WEIGHT),
                            "loss_rpn_loc": float(rpn_cfg.LOSS_WEIGHT) * float(rpn_cfg.BBOX_REG_LOSS_WEIGHT)})


def select_top_proposals(proposals: Tensor, logits: Tensor, num_per_level: Sequence[int],
                         image_sizes: Sequence[Tuple[int, int]], pre_nms_topk: int, post_nms_topk: int,
                         nms_thresh: float, min_size: float) -> List[Tuple[Tensor, Tensor]]:
    """Pick the proposals of every image as detectron2's ``find_top_rpn_proposals`` does.

    ``proposals``: (N, R, 4) decoded boxes of all levels, ``logits``: (N, R) objectness
    logits, ``num_per_level``: how many of the R belong to each level. Per level the
    ``pre_nms_topk`` best are kept; then, per image, boxes are clipped, those with a
    non-finite value or a side of at most ``min_size`` are dropped, NMS runs within each
    level, and the ``post_nms_topk`` best remain. Returns one ``(boxes (K, 4), logits
    (K,))`` pair per image, sorted by decreasing logit. Traceable (``torch.jit.trace``):
    every size is taken from the inputs' shapes.
    """
    n = logits.shape[0]
    chosen, levels, start = [], [], 0
    for level, count in enumerate(num_per_level):
        part = logits[:, start:start + count]
        idx = part.topk(_topk_min(part, int(pre_nms_topk), 1), dim=1).indices + start
        chosen.append(idx)
        levels.append(torch.full_like(idx[0], level))
        start = start + count
    idx = torch.cat(chosen, dim=1)
    levels = torch.cat(levels)
    batch = torch.arange(n, device=logits.device)[:, None]
    top_boxes, top_logits = proposals[batch, idx], logits[batch, idx]
    out = []
    for boxes, scores, size in zip(top_boxes, top_logits, image_sizes):
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)  # before clipping, which bounds inf
        boxes = box_ops.clip_boxes_to_image(boxes, size)
        wh = boxes[:, 2:] - boxes[:, :2]
        # one index list for the three tensors: a single read-back of the kept count
        keep = torch.where(finite & (wh > min_size).all(dim=1))[0]
        boxes, scores, lvl = boxes[keep], scores[keep], levels[keep]
        keep = box_ops.batched_nms(boxes, scores, lvl, nms_thresh)[: int(post_nms_topk)]
        out.append((boxes[keep], scores[keep]))
    return out
