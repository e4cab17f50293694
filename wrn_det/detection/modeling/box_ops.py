"""Box geometry of the builtin detectors, in float32 whatever the autocast dtype: the box transform, IoU
matching, sampling and the box regression losses, with detectron2's semantics.

The convolutions and fully connected layers of a detector run in the autocast dtype (bfloat16
or float16 under ``SOLVER.AMP``); what they predict enters this module and is computed in
float32 from there on, as detectron2 does (``Box2BoxTransform.apply_deltas`` decodes
``deltas.float()``): bfloat16 holds 8 significant bits, so an anchor centre near x = 1000 would
land on a 4-pixel grid. None of these functions reads a value back to the host unless it has to
(sampling draws from index lists whose length is data-dependent), so that a GPU is not made to
wait more than torchvision's own Faster R-CNN makes it wait.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from wrn_det.engine.errors import ConfigError

__all__ = ["SCALE_CLAMP", "LOSS_TYPES", "BoxTransform", "Matcher", "pairwise_iou", "subsample_labels",
           "box_regression_loss", "check_loss_type", "check_iou_matching"]

#: the largest log-scale a predicted box may take from its anchor or proposal (detectron2's and torchvision's)
SCALE_CLAMP = math.log(1000.0 / 16)

#: ``BBOX_REG_LOSS_TYPE`` values: detectron2's, computed with torchvision's losses
LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")

_IOU_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}


class BoxTransform(BoxCoder):
    """detectron2's ``Box2BoxTransform`` (torchvision's ``BoxCoder`` arithmetic, the same), always in float32.

    ``weights`` (wx, wy, ww, wh) scale the deltas (dx, dy, dw, dh); decoded log-scales are
    clamped at ``scale_clamp``. :meth:`get_deltas` returns the deltas that take boxes to
    targets, :meth:`apply_deltas` (and torchvision's ``decode``) the boxes the deltas give;
    both cast their inputs to float32 first.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = SCALE_CLAMP):
        super().__init__(tuple(float(w) for w in weights), bbox_xform_clip=float(scale_clamp))

    def get_deltas(self, boxes: Tensor, targets: Tensor) -> Tensor:
        """Return the (R, 4) float32 deltas that transform ``boxes`` (R, 4) into ``targets`` (R, 4), XYXY."""
        boxes, targets = boxes.float(), targets.float()
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        t_widths = targets[:, 2] - targets[:, 0]
        t_heights = targets[:, 3] - targets[:, 1]
        t_ctr_x = targets[:, 0] + 0.5 * t_widths
        t_ctr_y = targets[:, 1] + 0.5 * t_heights
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (t_ctr_x - ctr_x) / widths, wy * (t_ctr_y - ctr_y) / heights,
                            ww * torch.log(t_widths / widths), wh * torch.log(t_heights / heights)), dim=1)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Return the float32 deltas of ``proposals`` towards ``reference_boxes`` (torchvision's argument order)."""
        return self.get_deltas(proposals, reference_boxes)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Return the float32 boxes (R, 4k) that deltas ``rel_codes`` (R, 4k) give from ``boxes`` (R, 4)."""
        return super().decode_single(rel_codes.float(), boxes.float())

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Return the float32 boxes (R, 4k) of deltas (R, 4k) applied to ``boxes`` (R, 4) (detectron2's name)."""
        return self.decode_single(deltas, boxes)


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Return the (M, N) IoU of XYXY boxes (M, 4) and (N, 4), in float32; 0 where boxes do not intersect.

    Boxes without area (a degenerate ground-truth box) give 0 rather than NaN, as detectron2's.
    """
    boxes1, boxes2 = boxes1.float(), boxes2.float()
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    wh = (torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return torch.where(inter > 0, inter / (area1[:, None] + area2 - inter), torch.zeros_like(inter))


def check_iou_matching(key: str, thresholds: Sequence[float], labels: Sequence[int]) -> Tuple[List[float], List[int]]:
    """Return ``(thresholds, labels)`` of ``<key>.IOU_THRESHOLDS`` / ``IOU_LABELS`` as lists, checked as detectron2's
    ``Matcher`` checks them; raises :class:`ConfigError` naming the keys otherwise."""
    thresholds, labels = [float(t) for t in thresholds], [int(v) for v in labels]
    if not thresholds or thresholds[0] <= 0 or thresholds != sorted(thresholds):
        raise ConfigError(f"{key}.IOU_THRESHOLDS must be increasing values above 0, got {thresholds}")
    if len(labels) != len(thresholds) + 1 or any(v not in (-1, 0, 1) for v in labels):
        raise ConfigError(f"{key}.IOU_LABELS must give one label (-1 ignore, 0 negative, 1 positive) to each of the "
                          f"{len(thresholds) + 1} intervals of IOU_THRESHOLDS {thresholds}, got {labels}")
    return thresholds, labels


class Matcher:
    """detectron2's ``Matcher``: every prediction gets its best ground-truth box and a label by IoU interval.

    ``thresholds`` [t1, ..., tk] cut [0, 1] into k + 1 intervals [-inf, t1), [t1, t2), ...
    [tk, inf); ``labels`` gives each interval's label (1 positive, 0 negative, -1 ignored).
    With ``allow_low_quality_matches``, every prediction that is the best one of some
    ground-truth box (ties included) is positive whatever its IoU (the RPN's rule).
    Calling it with an (M ground truth, N predictions) IoU matrix returns ``(matches (N,)
    int64, labels (N,) int8)``; with no ground truth every label is ``labels[0]``.
    """

    def __init__(self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False):
        self.thresholds = [-math.inf, *[float(t) for t in thresholds], math.inf]
        self.labels = [int(v) for v in labels]
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: Tensor) -> Tuple[Tensor, Tensor]:
        """Return ``(matches, labels)`` of the predictions (columns of ``iou``)."""
        if iou.numel() == 0:
            n = iou.shape[1]
            return (torch.zeros(n, dtype=torch.int64, device=iou.device),
                    torch.full((n,), self.labels[0], dtype=torch.int8, device=iou.device))
        best, matches = iou.max(dim=0)
        labels = torch.ones_like(matches, dtype=torch.int8)
        # the intervals are disjoint: a where per interval, no boolean indexing (no host read-back)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            labels = torch.where((best >= low) & (best < high), label, labels)
        if self.allow_low_quality_matches:
            is_best = (iou == iou.max(dim=1, keepdim=True).values).any(dim=0)
            labels = torch.where(is_best, 1, labels)
        return matches, labels


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int
                     ) -> Tuple[Tensor, Tensor]:
    """Return ``(positive indices, negative indices)`` drawn at random from ``labels``, as detectron2 draws them.

    Positives are labels other than -1 and ``bg_label``, negatives ``bg_label``. At most
    ``num_samples * positive_fraction`` positives, then negatives up to ``num_samples``. The
    draws are two ``torch.randperm`` calls on the default generator (positives, then
    negatives), detectron2's and torchvision's order, so that a seeded run samples the same
    examples on either engine.
    """
    positive = torch.where((labels != -1) & (labels != bg_label))[0]
    negative = torch.where(labels == bg_label)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
    return pos, neg


def check_loss_type(key: str, loss_type: str, beta: float) -> Tuple[str, float]:
    """Return ``(loss_type, beta)`` of ``<key>.BBOX_REG_LOSS_TYPE`` / ``SMOOTH_L1_BETA``; raises :class:`ConfigError`
    naming the key for an unknown type or a negative beta."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"{key}.BBOX_REG_LOSS_TYPE must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not float(beta) >= 0:
        raise ConfigError(f"{key}.SMOOTH_L1_BETA must be >= 0 (0: an L1 loss), got {beta}")
    return loss_type, float(beta)


def box_regression_loss(loss_type: str, beta: float, transform: BoxTransform, pred_deltas: Tensor, boxes: Tensor,
                        targets: Tensor, foreground: Tensor) -> Tensor:
    """Return the summed float32 box regression loss of the ``foreground`` rows, detectron2's
    ``_dense_box_regression_loss``.

    ``pred_deltas`` (R, 4) predicted from ``boxes`` (R, 4, anchors or proposals), ``targets``
    (R, 4) their ground-truth boxes, ``foreground`` (R,) bool. ``smooth_l1``: smooth L1 with
    ``beta`` on the deltas (an L1 loss below 1e-5, as fvcore's); ``giou``, ``diou``, ``ciou``:
    the IoU losses of the decoded boxes. The other rows are masked out (no host read-back);
    their targets are replaced by their own boxes first, so that a row without a meaningful
    target cannot bring a NaN into the sum or its gradient.
    """
    fg = foreground[:, None]
    targets = torch.where(fg, targets.float(), boxes.float())
    if loss_type == "smooth_l1":
        pred, target = pred_deltas.float(), transform.get_deltas(boxes, targets)
        if beta < 1e-5:
            loss = (pred - target).abs()
        else:
            loss = F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
    else:
        loss = _IOU_LOSSES[loss_type](transform.apply_deltas(pred_deltas, boxes), targets, reduction="none")[:, None]
    return (loss * fg).sum()
