"""The box RoI heads of the builtin detectors, with detectron2's semantics and keys: the pooler, the box heads
(FC for FPN, the network's next stage for C4), the predictor and :class:`ROIHeads`, which samples, pools, predicts,
computes the losses and picks the detections; :func:`build_roi_heads` assembles them from the config.

What detectron2's ``StandardROIHeads`` / ``Res5ROIHeads`` and ``FastRCNNOutputLayers`` do, these do:
the ground-truth boxes appended to the proposals (``PROPOSAL_APPEND_GT``), IoU matching
(``IOU_THRESHOLDS``, ``IOU_LABELS``, no low-quality matches), random sampling of
``BATCH_SIZE_PER_IMAGE`` proposals (``POSITIVE_FRACTION``), a cross-entropy averaged over them and
a box loss (``SMOOTH_L1_BETA``, ``BBOX_REG_LOSS_TYPE``, ``BBOX_REG_WEIGHTS``, ``BBOX_REG_LOSS_WEIGHT``)
summed over the foreground and divided by the number sampled; in inference, per class: scores above
``SCORE_THRESH_TEST``, boxes clipped, NMS (``NMS_THRESH_TEST``), the ``TEST.DETECTIONS_PER_IMAGE``
best. Box geometry is float32 under any autocast (:mod:`.box_ops`). The state-dict keys are
torchvision's ``RoIHeads``' (``box_head``, ``box_predictor.cls_score`` / ``bbox_pred``, with the
background as class 0 and its own unused deltas), so every builtin checkpoint loads.

``MODEL.FAST_CPU.ROI_ALIGN`` chooses the pooler's CPU kernel, ``MODEL.FAST_CPU.CONV`` the class of
the box head's convolutions (the C4 head runs the backbone network's own stage, built alike).
"""
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from wrn_det.engine.errors import ConfigError
from wrn_det.models.norm import get_norm

from .base import ConvNormAct, get_conv_layer, in_feature_channels
from .box_ops import (BoxTransform, Matcher, box_regression_loss, check_iou_matching, check_loss_type, pairwise_iou,
                      subsample_labels)
from .poolers import assign_boxes_to_levels, boxes_to_rois, multilevel_roi_align

__all__ = ["ROIPooler", "FCBoxHead", "Res5BoxHead", "RES5_HEAD_NAMES", "ROIHeads", "build_roi_heads"]


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
    built in torchvision's order (torchvision's constructor fixes ``nn.Conv2d``), initialised as
    detectron2's ``FastRCNNConvFCHead``: the convolutions ``c2_msra_fill`` (normal, fan-out,
    torchvision's too), the fully connected layers ``c2_xavier_fill`` (uniform, bound
    sqrt(3 / fan_in), zero bias; torchvision leaves them at ``nn.Linear``'s default, three
    times smaller in variance). With no convolutions, the first layer is a fully connected one
    on the flattened (C, P, P) features; for channels-last input (the CPU pooler's layout in
    inference) it runs on the (P, P, C) flattening with its weight's columns permuted alike
    (kept until the weight changes). Same parameters, state-dict keys and results as
    torchvision's module.
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
            elif isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=1)
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
    # detectron2's FastRCNNOutputLayers: small initial outputs, near-uniform class scores and near-zero deltas
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


class ROIHeads(nn.Module):
    """Box RoI heads: proposal sampling, pooling, box head, predictor, detectron2's losses and inference.

    ``forward(features, proposals, image_shapes, targets=None)`` takes the feature maps by
    name, one (P, 4) float XYXY proposal tensor per image, the images' (h, w) and, in
    training, torchvision-style targets (``boxes``, ``labels`` 1..K). It returns
    ``(detections, losses)``: in training ``([], {"loss_cls", "loss_box_reg"})`` (weighted),
    in inference one ``{"boxes", "scores", "labels" (1..K)}`` per image and ``{}``.
    """

    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: FastRCNNPredictor, *,
                 num_classes: int, matcher: Matcher, batch_size_per_image: int, positive_fraction: float,
                 box_transform: BoxTransform, proposal_append_gt: bool = True, loss_type: str = "smooth_l1",
                 smooth_l1_beta: float = 0.0, box_reg_loss_weight: float = 1.0, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.box_coder = box_transform
        self.proposal_append_gt = bool(proposal_append_gt)
        self.loss_type, self.smooth_l1_beta = loss_type, float(smooth_l1_beta)
        self.box_reg_loss_weight = float(box_reg_loss_weight)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        """Return ``(detections, losses)`` (see the class docstring)."""
        if self.training:
            if targets is None:
                raise ValueError("the RoI heads need targets in training")
            proposals, labels, gt_boxes = self.label_and_sample_proposals(proposals, targets)
        class_logits, box_regression = self.predict(features, proposals, image_shapes)
        if self.training:
            return [], self.losses(class_logits, box_regression, proposals, labels, gt_boxes)
        return self.inference(class_logits, box_regression, proposals, image_shapes), {}

    def predict(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes
                ) -> Tuple[Tensor, Tensor]:
        """Return the predictor's ``(class logits (R, K + 1), box deltas (R, 4 (K + 1)))`` of all proposals, in order."""
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(box_features)

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
                                   ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Return the sampled proposals of every image with their classes (0 background, 1..K) and ground-truth boxes.

        Per image: the ground-truth boxes appended (``PROPOSAL_APPEND_GT``), every proposal
        matched to its best box by IoU, foreground first then background, drawn as
        detectron2 draws them. A background proposal's box is its matched one (or itself
        when the image has no box); only the foreground's count in the loss.
        """
        out_props, out_labels, out_boxes = [], [], []
        for props, target in zip(proposals, targets):
            gt, gt_labels = target["boxes"].float(), target["labels"]
            props = props.float()
            if self.proposal_append_gt:
                props = torch.cat([props, gt])
            idx, match = self.matcher(pairwise_iou(gt, props))
            if len(gt):
                classes = torch.where(match == 0, 0, gt_labels[idx])
                classes = torch.where(match == -1, -1, classes)
            else:
                classes = torch.zeros_like(idx)
            pos, neg = subsample_labels(classes, self.batch_size_per_image, self.positive_fraction, 0)
            sampled = torch.cat([pos, neg])
            out_props.append(props[sampled])
            out_labels.append(classes[sampled])
            out_boxes.append(gt[idx[sampled]] if len(gt) else props[sampled])
        return out_props, out_labels, out_boxes

    def losses(self, class_logits: Tensor, box_regression: Tensor, proposals: List[Tensor], labels: List[Tensor],
               gt_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """Return ``loss_cls`` (cross-entropy, mean over the sampled proposals) and ``loss_box_reg`` (summed over the
        foreground, divided by the number sampled, times ``BBOX_REG_LOSS_WEIGHT``), in float32."""
        labels = torch.cat(labels)
        r = labels.shape[0]
        if r == 0:  # no proposal at all: zero losses that still reach every parameter of the heads
            zero = class_logits.sum() * 0.0 + box_regression.sum() * 0.0
            return {"loss_cls": zero, "loss_box_reg": zero}
        loss_cls = F.cross_entropy(class_logits.float(), labels, reduction="mean")
        # each proposal's deltas for its own class (the background's unused set for background proposals)
        deltas = box_regression.view(r, -1, 4)[torch.arange(r, device=labels.device), labels]
        loss_box = box_regression_loss(self.loss_type, self.smooth_l1_beta, self.box_coder, deltas,
                                       torch.cat(proposals), torch.cat(gt_boxes), labels > 0)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / r * self.box_reg_loss_weight}

    @torch.no_grad()
    def inference(self, class_logits: Tensor, box_regression: Tensor, proposals: List[Tensor], image_shapes
                  ) -> List[Dict[str, Tensor]]:
        """Return ``{"boxes", "scores", "labels"}`` per image, detectron2's ``fast_rcnn_inference``.

        Every class's box of every proposal whose score passes ``SCORE_THRESH_TEST`` (boxes and
        scores finite), clipped to the image, NMS per class, the ``TEST.DETECTIONS_PER_IMAGE``
        best; ``labels`` are 1..K.
        """
        k = class_logits.shape[1] - 1
        # (R, K, 4) float32, background dropped; the shape is given, as torchvision's decode keeps (0, 4) for no proposal
        boxes = self.box_coder.decode(box_regression, proposals).reshape(len(box_regression), k + 1, 4)[:, 1:]
        probs = F.softmax(class_logits.float(), dim=-1)
        counts = [len(p) for p in proposals]
        results = []
        for b, s, size in zip(boxes.split(counts), probs.split(counts), image_shapes):
            valid = torch.isfinite(b).all(dim=2).all(dim=1) & torch.isfinite(s).all(dim=1)
            b = box_ops.clip_boxes_to_image(b.reshape(-1, 4), size).view(-1, k, 4)
            s = s[:, 1:]
            inds = torch.nonzero((s > self.score_thresh) & valid[:, None])
            b, s, classes = b[inds[:, 0], inds[:, 1]], s[inds[:, 0], inds[:, 1]], inds[:, 1]
            keep = box_ops.batched_nms(b, s, classes, self.nms_thresh)
            if self.detections_per_img >= 0:
                keep = keep[: self.detections_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": classes[keep] + 1})
        return results


def build_roi_heads(cfg, backbone) -> ROIHeads:
    """Return the :class:`ROIHeads` of ``MODEL.ROI_HEADS`` and ``MODEL.ROI_BOX_HEAD``: pooler, box head, predictor.

    ``StandardROIHeads``: ``NUM_CONV`` convolutions and ``NUM_FC`` fully connected layers
    on ``POOLER_RESOLUTION`` pooled features (FPN). ``WRNRes5ROIHeads``: the backbone's
    next stage on pooled features (C4; stride 2 halves 14x14 to 7x7). The pooler's kernel
    and the convolution class come from ``MODEL.FAST_CPU`` (``ROI_ALIGN``, ``CONV``).
    Raises :class:`ConfigError` naming the key of a value it cannot honour.
    """
    rh, bh = cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_BOX_HEAD
    shapes = backbone.output_shape()
    in_features = list(rh.IN_FEATURES)
    c = in_feature_channels("MODEL.ROI_HEADS.IN_FEATURES", in_features, shapes)
    if bh.POOLER_TYPE not in ("ROIAlign", "ROIAlignV2"):
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.POOLER_TYPE {bh.POOLER_TYPE!r} is not supported; use ROIAlignV2 or ROIAlign")
    if bh.CLS_AGNOSTIC_BBOX_REG:
        raise ConfigError("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True is not supported by the builtin engine "
                          "(its predictor regresses each class); set it False")
    thresholds, labels = check_iou_matching("MODEL.ROI_HEADS", rh.IOU_THRESHOLDS, rh.IOU_LABELS)
    loss_type, beta = check_loss_type("MODEL.ROI_BOX_HEAD", bh.BBOX_REG_LOSS_TYPE, bh.SMOOTH_L1_BETA)
    weights = tuple(float(w) for w in bh.BBOX_REG_WEIGHTS)
    if len(weights) != 4 or any(w <= 0 for w in weights):
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS must be 4 positive numbers, got {list(bh.BBOX_REG_WEIGHTS)}")
    res = int(bh.POOLER_RESOLUTION)
    pooler = ROIPooler(in_features, [shapes[f].stride for f in in_features], res, int(bh.POOLER_SAMPLING_RATIO),
                       aligned=bh.POOLER_TYPE == "ROIAlignV2", cpu_kernel=bool(cfg.MODEL.FAST_CPU.ROI_ALIGN))
    if rh.NAME == "StandardROIHeads":
        if bh.NAME != "FastRCNNConvFCHead":
            raise ConfigError(f"MODEL.ROI_BOX_HEAD.NAME {bh.NAME!r} is not supported; use FastRCNNConvFCHead")
        if bh.NORM not in ("", "BN", "SyncBN", "GN"):
            raise ConfigError(f"MODEL.ROI_BOX_HEAD.NORM {bh.NORM!r} is not supported; use '', BN, SyncBN or GN")
        if bh.NUM_CONV + bh.NUM_FC == 0:
            raise ConfigError("MODEL.ROI_BOX_HEAD: NUM_CONV and NUM_FC are both 0; the box head needs a layer")
        norm = get_norm(bh.NORM)
        box_head = FCBoxHead((c, res, res), [bh.CONV_DIM] * bh.NUM_CONV, [bh.FC_DIM] * bh.NUM_FC, norm,
                             conv_layer=get_conv_layer(cfg))
        out_dim = bh.FC_DIM if bh.NUM_FC else bh.CONV_DIM * res * res
        pooler.channels_last_inference = bh.NUM_CONV == 0 and bh.NUM_FC > 0
    elif rh.NAME in RES5_HEAD_NAMES:
        if not hasattr(backbone, "claim_next_stage"):
            raise ConfigError(f"MODEL.ROI_HEADS.NAME {rh.NAME} needs the C4 backbone build_wrn_backbone")
        if len(in_features) != 1:
            raise ConfigError(f"MODEL.ROI_HEADS.IN_FEATURES {in_features}: the C4 box head pools one feature")
        _, stage, out_dim = backbone.claim_next_stage()
        box_head = Res5BoxHead(stage)
    else:
        raise ConfigError(f"MODEL.ROI_HEADS.NAME {rh.NAME!r} is not supported; use StandardROIHeads (FPN) "
                          f"or WRNRes5ROIHeads (C4)")
    predictor = _init_predictor(FastRCNNPredictor(out_dim, rh.NUM_CLASSES + 1))
    return ROIHeads(pooler, box_head, predictor, num_classes=rh.NUM_CLASSES,
                    matcher=Matcher(thresholds, labels, allow_low_quality_matches=False),
                    batch_size_per_image=rh.BATCH_SIZE_PER_IMAGE, positive_fraction=rh.POSITIVE_FRACTION,
                    box_transform=BoxTransform(weights), proposal_append_gt=bool(rh.PROPOSAL_APPEND_GT),
                    loss_type=loss_type, smooth_l1_beta=beta, box_reg_loss_weight=bh.BBOX_REG_LOSS_WEIGHT,
                    score_thresh=rh.SCORE_THRESH_TEST, nms_thresh=rh.NMS_THRESH_TEST,
                    detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE)
