"""WRN backbones as detectron2 ``Backbone``s, registered in detectron2's ``BACKBONE_REGISTRY``.

``build_wrn_backbone`` (C4: the trunk up to the last of ``MODEL.WRN.OUT_FEATURES``) and
``build_wrn_fpn_backbone`` (FPN over ``MODEL.FPN.IN_FEATURES``, levels ``p<log2 stride>``
plus a max-pooled top level). Both are built by the builtin engine's builders
(:mod:`wrn_det.detection.modeling.backbone`), so the configuration checks, ``FREEZE_AT``,
``MODEL.WRN.NORM`` (FrozenBN / BN / SyncBN) and the modules themselves are the
builtin engine's: identical weights give identical features on both engines. The
convolutions are ``nn.Conv2d`` whatever ``MODEL.FAST_CPU.CONV`` says: the fast CPU
convolutions are the builtin detector's, taken inside its own ``forward`` only.

Only the module *names* differ from the builtin engine: the network's pieces are
registered under their feature-protocol names (``stem``, ``res2``..``res5`` or
``stage1``..), as detectron2 names its ResNet, so that a converted detectron2 pickle
(:mod:`wrn_det.models.convert`) matches C4 and FPN models alike, and only the pieces
the detector runs are part of the model.
"""
from collections import OrderedDict
from typing import Dict

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from wrn_det.detection.modeling import backbone as builtin
from wrn_det.engine.errors import ConfigError
from wrn_det.models.convert import protocol_stem

__all__ = ["WRNTrunk", "WRNFPNBackbone", "TrunkShapes", "build_wrn_backbone", "build_wrn_fpn_backbone"]


class TrunkShapes(dict):
    """``output_shape()`` of a :class:`WRNTrunk`: feature name -> ShapeSpec, plus ``claim_next_stage``.

    detectron2 builds the RoI heads from the backbone's output shapes alone; carrying the
    trunk's ``claim_next_stage`` here lets ``WRNRes5ROIHeads`` take the network's own next
    stage, so the network is built once.
    """

    claim_next_stage = None


class WRNTrunk(Backbone):
    """The bottom-up part of a WRN: ``stem`` and the stages up to the last returned one.

    Built from the builtin engine's :class:`~wrn_det.detection.modeling.backbone.WRNBackbone`
    (after its BatchNorm conversion and freezing), sharing its modules. ``forward(images)``
    returns a dict ``stage name -> feature`` for the stages in ``out_features``.
    ``network_stages`` lists every stage of the network, also those not run here.
    """

    def __init__(self, wrn: "builtin.WRNBackbone", size_divisibility: int = 0):
        super().__init__()
        net = wrn.net
        names = list(net.stage_names)
        last = max(names.index(f) for f in wrn.out_features)
        self.stem = protocol_stem(net)
        self.stages = names[: last + 1]
        for name in self.stages:
            self.add_module(name, net.get_stage(name))
        self.network_stages = names
        self._out_features = list(wrn.out_features)
        shapes = wrn.output_shape()
        self._out_feature_channels = {f: shapes[f].channels for f in self._out_features}
        self._out_feature_strides = {f: shapes[f].stride for f in self._out_features}
        self._size_divisibility = int(size_divisibility)
        self._claim_next_stage = wrn.claim_next_stage

    @property
    def size_divisibility(self) -> int:
        """Return the padding multiple the inputs need (0: none, as detectron2's C4 ResNet)."""
        return self._size_divisibility

    def output_shape(self) -> "TrunkShapes":
        """Return ``name -> detectron2 ShapeSpec(channels, stride)`` of every returned feature.

        The mapping also carries ``claim_next_stage`` (the network's stage after the trunk,
        for the C4 box head).
        """
        shapes = TrunkShapes((f, ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]))
                             for f in self._out_features)
        shapes.claim_next_stage = self._claim_next_stage
        return shapes

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return ``stage name -> feature map`` for the stages in ``out_features``."""
        if x.dim() != 4:
            raise ValueError(f"WRN backbone takes (N, C, H, W) images, got shape {tuple(x.shape)}")
        out = {}
        x = self.stem(x)
        for name in self.stages:
            x = getattr(self, name)(x)
            if name in self._out_feature_channels:
                out[name] = x
        return out


class WRNFPNBackbone(Backbone):
    """A feature pyramid over a :class:`WRNTrunk`: the builtin engine's FPN module, same weights layout.

    ``forward(images)`` returns a dict ``p<level> -> feature``, finest first (``p2``..``p6``
    for ``res2``..``res5``). ``size_divisibility`` is the coarsest input stride, as
    detectron2's FPN, so the top-down sums always line up.
    """

    def __init__(self, fpn: "builtin.WRNFPN"):
        super().__init__()
        self.bottom_up = WRNTrunk(fpn.bottom_up)
        self.fpn = fpn.fpn
        self.in_features = list(fpn.in_features)
        shapes = fpn.output_shape()
        self._out_features = list(shapes)
        self._out_feature_channels = {f: s.channels for f, s in shapes.items()}
        self._out_feature_strides = {f: s.stride for f, s in shapes.items()}
        self._size_divisibility = max(self.bottom_up.output_shape()[f].stride for f in self.in_features)

    @property
    def size_divisibility(self) -> int:
        """Return the stride of the coarsest bottom-up feature in the pyramid."""
        return self._size_divisibility

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Return ``p<level> -> detectron2 ShapeSpec(channels, stride)``, finest first."""
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in self._out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return the pyramid levels ``p<level> -> feature`` for images ``x``."""
        feats = self.bottom_up(x)
        pyramid = self.fpn(OrderedDict((f, feats[f]) for f in self.in_features))
        return dict(zip(self._out_features, pyramid.values()))


def _plain_convs(cfg):
    """Return ``cfg``, or a copy with ``MODEL.FAST_CPU.CONV`` False: the builtin builders then build ``nn.Conv2d``."""
    if not cfg.MODEL.FAST_CPU.CONV:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.FAST_CPU.CONV = False
    return cfg


def _check_input(input_shape: ShapeSpec) -> None:
    if input_shape is not None and input_shape.channels not in (None, 3):
        raise ConfigError(f"MODEL.PIXEL_MEAN has {input_shape.channels} values; the WRN stems take 3-channel images")


@BACKBONE_REGISTRY.register()
def build_wrn_backbone(cfg, input_shape: ShapeSpec = None) -> WRNTrunk:
    """Return the C4 trunk of ``MODEL.WRN.NAME`` (detectron2 builder signature ``(cfg, input_shape)``).

    Its stages after the trunk are left out; ``WRNRes5ROIHeads`` builds the next one as its box head.
    """
    _check_input(input_shape)
    if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads":
        raise ConfigError("MODEL.ROI_HEADS.NAME Res5ROIHeads is detectron2's head with a ResNet res5 block; "
                          "with a WRN backbone use WRNRes5ROIHeads (the network's own next stage)")
    return WRNTrunk(builtin.build_wrn_backbone(_plain_convs(cfg)))


@BACKBONE_REGISTRY.register()
def build_wrn_fpn_backbone(cfg, input_shape: ShapeSpec = None) -> WRNFPNBackbone:
    """Return the FPN backbone of ``MODEL.WRN.NAME`` over ``MODEL.FPN.IN_FEATURES``."""
    _check_input(input_shape)
    return WRNFPNBackbone(builtin.build_wrn_fpn_backbone(_plain_convs(cfg)))
