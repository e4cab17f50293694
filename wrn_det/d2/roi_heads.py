"""The C4 box head for detectron2: the WRN's stage after the trunk, run on pooled RoI features.

detectron2's ``Res5ROIHeads`` builds a ResNet res5 block from ``MODEL.RESNETS``; this
subclass (registered as ``WRNRes5ROIHeads`` in ``ROI_HEADS_REGISTRY``) takes the
stage after the last of ``MODEL.WRN.OUT_FEATURES`` from a network built by the builtin
engine's builder (same BatchNorm handling), and keeps everything else of
``Res5ROIHeads``: pooling (``ROI_BOX_HEAD.POOLER_*``), the mean over space, the
``FastRCNNOutputLayers`` predictor, losses and inference.
"""
from collections import OrderedDict

from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from wrn_det.detection import backbone as builtin
from wrn_det.engine.errors import ConfigError

__all__ = ["WRNHeadStage", "WRNRes5ROIHeads"]


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
    """detectron2's ``Res5ROIHeads`` with the WRN's own next stage as the per-region network."""

    @classmethod
    def _build_res5_block(cls, cfg):
        """Return ``(WRNHeadStage, its output channels)`` for the stage after the C4 trunk."""
        wrn = builtin.build_wrn_backbone(cfg)
        if wrn.head_stage is None:  # pragma: no cover - build_wrn_backbone sets it for this head name
            raise ConfigError(f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME}: no stage after the trunk")
        channels = wrn.net.output_shape()[wrn.head_stage].channels
        return WRNHeadStage(wrn.head_stage, wrn.get_head_stage()), channels
