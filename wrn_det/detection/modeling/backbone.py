"""WRN backbones for detection: C4 (one trunk feature + a res5 box head) and FPN.

Any network of ``wrn_det.models`` works: the backbone only uses the feature protocol
(``stem``, ``stage_names``, ``get_stage``, ``output_shape``), so the ImageNet-style wide
ResNets (stages ``res2``..``res5``) and the CIFAR-style WRNs (``stage1``..) are served
by the same code. The whole network is kept as ``backbone.net`` (``bottom_up.net`` for
FPN) so its state-dict keys stay those of the classification network and a
pretrained checkpoint loads by prefix. Every convolution, the network's and the FPN's, is
built with the class ``MODEL.FAST_CPU`` chooses (:func:`.base.get_conv_layer`).
"""
import math
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from wrn_det.engine.errors import ConfigError
from wrn_det.models import ShapeSpec, build_model
from wrn_det.models.norm import convert_norm, get_norm

from .base import ConvNormAct, get_conv_layer
from .registry import BACKBONE_REGISTRY

__all__ = [
    "BACKBONE_REGISTRY", "build_backbone", "build_wrn_net", "build_wrn_backbone", "build_wrn_fpn_backbone",
    "WRNBackbone", "WRNFPN", "FeaturePyramid", "NORMS",
]

# MODEL.WRN.NORM: the norm layer the network is built with
NORMS = ("FrozenBN", "BN", "SyncBN")


def build_wrn_net(cfg) -> nn.Module:
    """Return the ``MODEL.WRN.NAME`` network, built with ``MODEL.WRN.NORM`` layers (its classifier stays unused).

    ``FrozenBN``: fixed statistics (a pretrained network); ``BN``: trained BatchNorm;
    ``SyncBN``: BatchNorm over the global batch of a distributed run (GPUs and gloo CPUs).
    Its convolutions are of the class ``MODEL.FAST_CPU`` chooses (:func:`.base.get_conv_layer`).
    """
    name, norm = cfg.MODEL.WRN.NAME, cfg.MODEL.WRN.NORM
    if norm not in NORMS:
        raise ConfigError(f"MODEL.WRN.NORM must be one of {', '.join(NORMS)}, got {norm!r}")
    kwargs = {"norm_layer": get_norm(norm), "conv_layer": get_conv_layer(cfg)}
    if cfg.MODEL.WRN.DROPOUT:
        kwargs["dropout"] = float(cfg.MODEL.WRN.DROPOUT)
    try:
        # the classifier is never run; one output keeps it small
        return build_model(name, num_classes=1, **kwargs)
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ConfigError(f"MODEL.WRN.NAME {name!r}: {msg}") from None


class WRNBackbone(nn.Module):
    """The bottom-up part of a WRN: stem and stages, returning the stages in ``out_features``.

    ``forward(images)`` returns an OrderedDict ``stage name -> feature map``.
    ``freeze_at``: 0 trains everything, 1 freezes the stem, k > 1 the stem and the first
    k - 1 stages (their normalisation becomes FrozenBatchNorm, as detectron2's FREEZE_AT);
    the other stages keep the norm layer the network was built with (``MODEL.WRN.NORM``).
    Parameters no part of the detector runs (stages past the trunk, the classifier) are set
    to ``requires_grad=False`` so that neither the optimizer nor DistributedDataParallel
    waits for their gradients; a head that runs the stage after the trunk (the C4 box head)
    takes it with :meth:`claim_next_stage`.
    """

    def __init__(self, net: nn.Module, out_features: List[str], freeze_at: int = 0):
        super().__init__()
        names = list(net.stage_names)
        for f in out_features:
            if f not in names:
                raise ConfigError(f"MODEL.WRN.OUT_FEATURES: {f!r} is not a stage of this network; its stages are {names}")
        if not out_features:
            raise ConfigError("MODEL.WRN.OUT_FEATURES is empty; name at least one stage")
        last = max(names.index(f) for f in out_features)
        if not 0 <= freeze_at <= last + 2:
            raise ConfigError(f"MODEL.BACKBONE.FREEZE_AT must be between 0 and {last + 2} here, got {freeze_at}")
        self.net = net
        self.out_features = sorted(out_features, key=names.index)
        self._stages = names[: last + 1]
        specs = net.output_shape()
        self._out_shapes = OrderedDict((f, ShapeSpec(specs[f].channels, specs[f].stride)) for f in self.out_features)
        self.claimed_stage = None  # the stage after the trunk, once a head runs it (claim_next_stage)

        frozen = ([net.stem] if freeze_at >= 1 else []) + [net.get_stage(n) for n in names[: max(freeze_at - 1, 0)]]
        for part in frozen:
            convert_norm(part, "FrozenBN")
        frozen_params = {id(p) for m in frozen for p in m.parameters()}
        running_params = {id(p) for m in [net.stem] + [net.get_stage(n) for n in self._stages] for p in m.parameters()}
        for p in net.parameters():
            if id(p) in frozen_params or id(p) not in running_params:
                p.requires_grad_(False)
        # images are padded only to the batch's largest size, as detectron2's C4 ResNet (its convolutions
        # pad the borders themselves); an FPN over this trunk pads to its coarsest stride (WRNFPN)
        self.size_divisibility = 0

    def output_shape(self) -> "OrderedDict[str, ShapeSpec]":
        """Return ``name -> ShapeSpec(channels, stride)`` of every returned feature."""
        return OrderedDict(self._out_shapes)

    def claim_next_stage(self) -> Tuple[str, nn.Module, int]:
        """Return ``(name, stage, output channels)`` of the network's stage after the trunk, for a head to run.

        The stage is the network's own module (its parameters are shared, so one set of
        weights loads both) and is made trainable. Raises :class:`ConfigError` when the trunk
        ends at the network's last stage.
        """
        names = list(self.net.stage_names)
        i = names.index(self._stages[-1]) + 1
        if i >= len(names):
            raise ConfigError(f"MODEL.WRN.OUT_FEATURES {self.out_features} ends at the last stage of the network "
                              f"({names[-1]}); a C4 box head (WRNRes5ROIHeads) runs the stage after the trunk, so the "
                              "trunk must stop earlier")
        stage = self.net.get_stage(names[i])
        for p in stage.parameters():
            p.requires_grad_(True)
        self.claimed_stage = names[i]
        return names[i], stage, self.net.output_shape()[names[i]].channels

    def running_modules(self) -> List[nn.Module]:
        """Return the parts of the network the detector runs: stem, trunk stages and a claimed next stage."""
        names = self._stages + ([self.claimed_stage] if self.claimed_stage else [])
        return [self.net.stem] + [self.net.get_stage(n) for n in names]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Return ``stage name -> feature`` for the stages in ``out_features``."""
        out = OrderedDict()
        x = self.net.stem(x)
        for name in self._stages:
            x = self.net.get_stage(name)(x)
            if name in self._out_shapes:
                out[name] = x
        return out


def _level_name(stride: int) -> str:
    level = math.log2(stride)
    if level != int(level):
        raise ConfigError(f"FPN needs power-of-two strides, got a feature of stride {stride}")
    return f"p{int(level)}"


class FeaturePyramid(FeaturePyramidNetwork):
    """torchvision's ``FeaturePyramidNetwork`` with its convolutions built by ``conv_layer`` (default ``nn.Conv2d``).

    torchvision's constructor fixes ``nn.Conv2d``; this one builds the same blocks in the same
    order (lateral 1x1 and output 3x3 :class:`~.base.ConvNormAct`, then torchvision's
    initialisation), so the modules, state-dict keys, initial weights and ``forward`` (the
    pyramid levels as an OrderedDict) are torchvision's.
    """

    def __init__(self, in_channels_list: List[int], out_channels: int, extra_blocks=None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        nn.Module.__init__(self)
        self.inner_blocks = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for in_channels in in_channels_list:
            self.inner_blocks.append(ConvNormAct(in_channels, out_channels, 1, padding=0, norm_layer=norm_layer,
                                                 activation_layer=None, conv_layer=conv_layer))
            self.layer_blocks.append(ConvNormAct(out_channels, out_channels, 3, norm_layer=norm_layer,
                                                 activation_layer=None, conv_layer=conv_layer))
        for m in self.modules():  # torchvision's initialisation, before the extra blocks as there
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        self.extra_blocks = extra_blocks


class WRNFPN(nn.Module):
    """A feature pyramid over a :class:`WRNBackbone` (torchvision's FeaturePyramidNetwork: :class:`FeaturePyramid`).

    Lateral 1x1 and output 3x3 convolutions with ``out_channels`` channels, nearest
    upsampling and sum fusion, plus a max-pooled level on top (``p6`` for res2..res5).
    ``conv_layer``: the class of those convolutions (default ``nn.Conv2d``).
    ``forward(images)`` returns an OrderedDict ``p<log2 stride> -> feature``, finest first.
    """

    def __init__(self, bottom_up: WRNBackbone, in_features: List[str], out_channels: int, norm: str = "",
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        shapes = bottom_up.output_shape()
        for f in in_features:
            if f not in shapes:
                raise ConfigError(f"MODEL.FPN.IN_FEATURES: {f!r} is not one of the backbone outputs {list(shapes)} "
                                  "(MODEL.WRN.OUT_FEATURES)")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        strides = [shapes[f].stride for f in self.in_features]
        if strides != sorted(strides) or len(set(strides)) != len(strides):
            raise ConfigError(f"MODEL.FPN.IN_FEATURES {self.in_features} must be in increasing stride order")
        self.fpn = FeaturePyramid([shapes[f].channels for f in self.in_features], out_channels,
                                  extra_blocks=LastLevelMaxPool(), norm_layer=_fpn_norm(norm), conv_layer=conv_layer)
        strides = strides + [strides[-1] * 2]
        self._out_shapes = OrderedDict((_level_name(s), ShapeSpec(out_channels, s)) for s in strides)
        # pad to the bottom-up network's coarsest stride, as detectron2 does: the max-pooled top
        # level takes any size, and the RPN's anchor generator is given every level's stride
        self.size_divisibility = strides[-2]

    def output_shape(self) -> "OrderedDict[str, ShapeSpec]":
        """Return ``p<level> -> ShapeSpec(out_channels, stride)``, finest first."""
        return OrderedDict(self._out_shapes)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Return the pyramid levels ``p<level> -> feature`` for images ``x``."""
        feats = self.bottom_up(x)
        pyramid = self.fpn(OrderedDict((f, feats[f]) for f in self.in_features))
        return OrderedDict(zip(self._out_shapes, pyramid.values()))


def _fpn_norm(norm: str):
    """Return the norm layer of ``MODEL.FPN.NORM``: None (""), BatchNorm, SyncBatchNorm or GroupNorm(32)."""
    if norm not in ("", "BN", "SyncBN", "GN"):
        raise ConfigError(f"MODEL.FPN.NORM must be '', BN, SyncBN or GN, got {norm!r}")
    return get_norm(norm)


def _freeze_at(cfg) -> int:
    return int(cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_wrn_backbone(cfg) -> WRNBackbone:
    """Return a C4-style backbone: the trunk up to the last of ``MODEL.WRN.OUT_FEATURES``.

    The stage after the trunk is the C4 box head's to claim (:meth:`WRNBackbone.claim_next_stage`).
    """
    return WRNBackbone(build_wrn_net(cfg), list(cfg.MODEL.WRN.OUT_FEATURES), freeze_at=_freeze_at(cfg))


@BACKBONE_REGISTRY.register()
def build_wrn_fpn_backbone(cfg) -> WRNFPN:
    """Return an FPN backbone over the stages in ``MODEL.FPN.IN_FEATURES``."""
    if cfg.MODEL.FPN.FUSE_TYPE != "sum":
        raise ConfigError(f"MODEL.FPN.FUSE_TYPE {cfg.MODEL.FPN.FUSE_TYPE!r} is not supported; use 'sum'")
    net = build_wrn_net(cfg)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    if not in_features:
        raise ConfigError("MODEL.FPN.IN_FEATURES is empty; name the stages to build the pyramid on, e.g. [res2, res3, res4, res5]")
    bad = [f for f in in_features if f not in net.stage_names]
    if bad:
        raise ConfigError(f"MODEL.FPN.IN_FEATURES: {bad[0]!r} is not a stage of {cfg.MODEL.WRN.NAME}; its stages are "
                          f"{list(net.stage_names)}")
    bottom_up = WRNBackbone(net, in_features, freeze_at=_freeze_at(cfg))
    return WRNFPN(bottom_up, in_features, int(cfg.MODEL.FPN.OUT_CHANNELS), cfg.MODEL.FPN.NORM,
                  conv_layer=get_conv_layer(cfg))


def build_backbone(cfg) -> nn.Module:
    """Return the backbone named by ``MODEL.BACKBONE.NAME``."""
    name = cfg.MODEL.BACKBONE.NAME
    try:
        builder = BACKBONE_REGISTRY.get(name)
    except KeyError:
        raise ConfigError(f"MODEL.BACKBONE.NAME {name!r} is unknown; expected one of "
                          f"{sorted(k for k, _ in BACKBONE_REGISTRY)}") from None
    return builder(cfg)
