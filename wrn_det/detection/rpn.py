"""The RPN-only detector (``MODEL.META_ARCHITECTURE: ProposalNetwork``).

A WRN backbone (C4 or FPN) and torchvision's ``RegionProposalNetwork``, built exactly
as in :class:`~wrn_det.detection.modeling.GeneralizedRCNN` (same parameter names, so
an RPN's weights load into a Faster R-CNN and back). Training returns the RPN losses;
inference returns, per image, the proposals in original-image XYXY pixels with their
objectness logits, which is what detectron2's proposal files hold.
"""
from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from wrn_det.engine.errors import ConfigError

from .backbone import build_backbone
from .modeling import _LOSS_NAMES, META_ARCH_REGISTRY, _check_unsupported, _Detector, build_rpn

__all__ = ["ProposalNetwork", "select_top_proposals"]


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
class ProposalNetwork(_Detector):
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
        _check_unsupported(cfg)
        super().__init__(cfg, build_backbone(cfg))
        self.rpn = build_rpn(cfg, self.backbone.output_shape())
        self.min_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)
        w = cfg.MODEL.RPN.LOSS_WEIGHT
        self.loss_weights = {"loss_rpn_cls": w, "loss_rpn_loc": w * cfg.MODEL.RPN.BBOX_REG_LOSS_WEIGHT}

    def forward(self, batched_inputs: List[dict]):
        """Return the RPN losses (training) or the proposals and objectness logits of every image (inference)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensors)
        feats = OrderedDict((f, features[f]) for f in self.rpn.in_features)
        if self.training:
            # torchvision's RPN also selects proposals in training; they are not needed here (as in detectron2)
            _, losses = self.rpn(images, feats, self.targets(batched_inputs))
            return {_LOSS_NAMES[k]: v * self.loss_weights[_LOSS_NAMES[k]] for k, v in losses.items()}
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
