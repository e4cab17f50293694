"""The detectors of the builtin engine (``MODEL.META_ARCHITECTURE``): detectron2's ``GeneralizedRCNN`` and
``ProposalNetwork`` with the same semantics, built on torchvision's layers and operators.

``GeneralizedRCNN`` = a WRN backbone (C4 or FPN) + the :class:`~.rpn.RPN` + the
:class:`~.roi_heads.ROIHeads` with a RoIAlign pooler, a box head (two FC layers for FPN, the
network's res5 stage for C4) and a ``FastRCNNPredictor``. ``ProposalNetwork`` = the backbone and
the RPN alone. Their losses, proposals and detections are detectron2's for the same config,
weights and inputs (the tests compare them term by term). Inputs and outputs follow detectron2: the model takes a list of dicts (``image``:
uint8 CHW tensor in ``INPUT.FORMAT``, ``boxes``/``classes`` for training, ``height``/``width`` of
the original image) and returns a loss dict in training and, in inference, one dict per image
with ``boxes`` (XYXY, original image coordinates), ``scores`` and ``classes`` (contiguous ids
0..K-1), or, for the RPN alone, its proposals in original-image XYXY pixels with their
objectness logits (what detectron2's proposal files hold).

The fast CPU pieces are chosen when a detector is built, from ``MODEL.FAST_CPU``: the
convolution class of the backbone, FPN, RPN head and box head (``CONV``, ``PACK_WEIGHTS``:
:func:`.base.get_conv_layer`) and the pooler's kernel (``ROI_ALIGN``); the detectors'
``forward`` runs inside :func:`.fast_conv.fast_convs`, where those convolutions take their
faster paths.
"""
from collections import OrderedDict
from typing import List, Tuple

import torch
from torch import nn

from wrn_det.engine.device import prepare_device, resolve_device
from wrn_det.engine.errors import ConfigError

from .backbone import build_backbone
from .base import DetectorBase, check_unsupported
from .fast_conv import fast_convs
from .registry import META_ARCH_REGISTRY
from .roi_heads import build_roi_heads
from .rpn import build_rpn, select_top_proposals

__all__ = ["GeneralizedRCNN", "ProposalNetwork", "build_detector", "compile_detector"]


@META_ARCH_REGISTRY.register()
class GeneralizedRCNN(DetectorBase):
    """Faster R-CNN: backbone, RPN and box RoI heads; Fast R-CNN without the RPN.

    ``forward(batched_inputs)`` returns, in training, a dict of losses with detectron2's
    names (``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``), and in
    inference a list of ``{"boxes", "scores", "classes"}`` per image in original coordinates.
    With ``MODEL.PROPOSAL_GENERATOR.NAME PrecomputedProposals`` there is no RPN (and no
    RPN loss): the box head runs on each input's ``"proposals"`` (network-input XYXY
    coordinates, as the mapper returns them with ``MODEL.LOAD_PROPOSALS``).
    """

    def __init__(self, cfg):
        check_unsupported(cfg)
        super().__init__(cfg, build_backbone(cfg))
        self.rpn = build_rpn(cfg, self.backbone.output_shape()) if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN" else None
        self.roi_heads = build_roi_heads(cfg, self.backbone)

    def forward(self, batched_inputs: List[dict]):
        """Return the loss dict (training) or the detections of every image (inference)."""
        with fast_convs():  # the FastConv2d layers (MODEL.FAST_CPU.CONV) take their faster paths here only
            return self._forward(batched_inputs)

    def _forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        # the targets' copies are queued before the backbone's work, not behind it
        targets = self.targets(batched_inputs) if self.training else None
        features = self.backbone(images.tensors)
        if self.rpn is not None:
            rpn_features = OrderedDict((f, features[f]) for f in self.rpn.in_features)
            proposals, rpn_losses = self.rpn(images, rpn_features, targets)
        else:
            proposals, rpn_losses = self.given_proposals(batched_inputs), {}
        detections, det_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **det_losses}
        results = []
        for x, det, size in zip(batched_inputs, detections, images.image_sizes):
            h, w = x.get("height", size[0]), x.get("width", size[1])
            boxes = self.rescale(det["boxes"], size, h, w)
            # as detectron2's detector_postprocess: a box squeezed to nothing in the original image is dropped
            keep = torch.where(((boxes[:, 2:] - boxes[:, :2]) > 0).all(dim=1))[0]
            results.append({"boxes": boxes[keep], "scores": det["scores"][keep], "classes": det["labels"][keep] - 1})
        return results

    def given_proposals(self, batched_inputs: List[dict]) -> List[torch.Tensor]:
        """Return each input's precomputed ``"proposals"`` (float XYXY boxes) on the model's device."""
        if any("proposals" not in x for x in batched_inputs):
            raise ConfigError("MODEL.PROPOSAL_GENERATOR.NAME PrecomputedProposals: the inputs carry no 'proposals'; "
                              "set MODEL.LOAD_PROPOSALS True and DATASETS.PROPOSAL_FILES_TRAIN / _TEST")
        return [x["proposals"].to(self.device, torch.float32) for x in batched_inputs]


def build_detector(cfg) -> nn.Module:
    """Return the detector named by ``MODEL.META_ARCHITECTURE``, on ``MODEL.DEVICE`` (CUDA when unset and present).

    ``MODEL.CHANNELS_LAST`` puts its weights in channels-last memory on CUDA (every convolution's
    output follows its weight's layout); ``MODEL.COMPILE`` compiles the backbone and the box
    head in place (:func:`compile_detector`).
    """
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError:
        raise ConfigError(f"MODEL.META_ARCHITECTURE {name!r} is unknown; expected one of "
                          f"{sorted(k for k, _ in META_ARCH_REGISTRY)}") from None
    model = cls(cfg)
    device = prepare_device(resolve_device(cfg.MODEL.DEVICE))
    model = model.to(device)
    if cfg.MODEL.get("CHANNELS_LAST", False) and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.MODEL.get("COMPILE", False):
        compile_detector(model)
    return model


def compile_detector(model: nn.Module, **compile_kwargs) -> List[str]:
    """``torch.compile`` the detector's backbone and box head in place; returns the names of the modules compiled.

    ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``backend``...).
    ``nn.Module.compile`` keeps the modules, their parameters and their state-dict keys (no
    ``_orig_mod.`` prefix), so checkpoints, the EMA and DistributedDataParallel see the same
    model. The RPN's and RoI heads' sampling and box geometry, data-dependent by nature, stay eager.
    """
    done = []
    for name in ("backbone", "roi_heads.box_head"):
        try:
            module = model.get_submodule(name)
        except AttributeError:  # a ProposalNetwork has no box head
            continue
        module.compile(**compile_kwargs)
        done.append(name)
    return done


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

    def forward(self, batched_inputs: List[dict]):
        """Return the RPN losses (training) or the proposals and objectness logits of every image (inference)."""
        with fast_convs():
            return self._forward(batched_inputs)

    def _forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        targets = self.targets(batched_inputs) if self.training else None  # queued before the backbone's work
        features = self.backbone(images.tensors)
        feats = OrderedDict((f, features[f]) for f in self.rpn.in_features)
        if self.training:
            # the proposals are not used by an RPN trained alone: not computed
            _, losses = self.rpn(images, feats, targets, need_proposals=False)
            return losses
        results = []
        for (boxes, logits), x, size in zip(self.propose(images, list(feats.values())), batched_inputs,
                                            images.image_sizes):
            boxes = self.rescale(boxes, size, x.get("height", size[0]), x.get("width", size[1]))
            # boxes squeezed to nothing by the clip in the original image are no proposals
            keep = torch.where(((boxes[:, 2:] - boxes[:, :2]) > 0).all(dim=1))[0]
            results.append({"proposals": boxes[keep], "objectness_logits": logits[keep]})
        return results

    def propose(self, images, feats: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Return ``(boxes, logits)`` per image in network-input coordinates (inference settings of the RPN).

        The logits are what detectron2 stores in proposal files.
        """
        rpn = self.rpn
        logits, deltas = rpn.flat_predictions(feats)
        return rpn.predict_proposals(rpn.anchor_generator(feats), logits, deltas, images.image_sizes)
