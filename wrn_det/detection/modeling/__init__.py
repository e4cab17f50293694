"""Model building of the builtin engine: backbones (C4, FPN), the RPN, RoI heads and the detectors.

    from wrn_det.detection.modeling import build_detector, build_backbone
    model = build_detector(cfg)    # MODEL.META_ARCHITECTURE: GeneralizedRCNN or ProposalNetwork

Registries (:mod:`.registry`) take new backbones and detectors by name, as detectron2's do.
"""
from .backbone import build_backbone
from .meta_arch import GeneralizedRCNN, ProposalNetwork, build_detector
from .registry import BACKBONE_REGISTRY, META_ARCH_REGISTRY

__all__ = ["build_detector", "build_backbone", "GeneralizedRCNN", "ProposalNetwork", "BACKBONE_REGISTRY",
           "META_ARCH_REGISTRY"]
