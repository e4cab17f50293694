"""The C4 box head for detectron2: the WRN's stage after the trunk, run on pooled RoI features.

detectron2's ``Res5ROIHeads`` builds a ResNet res5 block from ``MODEL.RESNETS``; this
subclass (registered as ``WRNRes5ROIHeads`` in ``ROI_HEADS_REGISTRY``) takes the
stage after the last of ``MODEL.WRN.OUT_FEATURES`` from the network the backbone was
built on (the builtin engine's builder: same BatchNorm handling), and keeps everything else of
``Res5ROIHeads``: pooling (``ROI_BOX_HEAD.POOLER_*``), the mean over space, the
``FastRCNNOutputLayers`` predictor, losses and inference.
"""
from collections import OrderedDict
from contextvars import ContextVar

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from wrn_det.engine.errors import ConfigError

__all__ = ["WRNHeadStage", "WRNRes5ROIHeads"]

# the stage claimed from the backbone while detectron2's from_config builds the head
_NEXT_STAGE: ContextVar = ContextVar("wrn_next_stage")


class WRNHeadStage(nn.Sequential):
    """One stage of a WRN held under its protocol name (``res5``, ``stage3``, ...).

    The name keeps the state-dict keys (``roi_heads.res5.res5.0.conv1.weight``) ending
    with the converted checkpoint's keys (``res5.0.conv1.weight``) whatever the family.
    Calling it runs the stage.
    """

    def __init__(self, name: str, stage: nn.Module):
        super().__init__(OrderedDict([(name, stage)]))
        self.stage_name = name


@ROI_HEADS_REGISTRY.register()
class WRNRes5ROIHeads(Res5ROIHeads):
    """detectron2's ``Res5ROIHeads`` with the WRN's own next stage as the per-region network.

    The stage comes from the backbone that detectron2 built just before (its
    ``output_shape()`` carries ``claim_next_stage``), so the network is built once and the
    backbone and the head share one set of weights layout-wise as in the builtin engine.
    """

    @classmethod
    def from_config(cls, cfg, input_shape):
        """Return detectron2's ``Res5ROIHeads`` arguments with the backbone's next stage as ``res5``."""
        claim = getattr(input_shape, "claim_next_stage", None)
        if claim is None:
            raise ConfigError(f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME} needs the WRN C4 backbone "
                              "(MODEL.BACKBONE.NAME build_wrn_backbone), whose trunk offers the next stage")
        token = _NEXT_STAGE.set(claim())
        try:
            return super().from_config(cfg, input_shape)
        finally:
            _NEXT_STAGE.reset(token)

    @classmethod
    def _build_res5_block(cls, cfg):
        """Return ``(WRNHeadStage, its output channels)`` for the stage after the C4 trunk."""
        name, stage, channels = _NEXT_STAGE.get()
        return WRNHeadStage(name, stage), channels
