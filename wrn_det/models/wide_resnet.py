"""ImageNet-style wide ResNets, ``wide_resnet{18,34,50,101,152}_{k}``.

The state-dict keys are torchvision's ResNet keys (``conv1``, ``bn1``,
``layer1``..``layer4``, ``fc``; blocks with ``conv1``/``bn1``/... and
``downsample.0``/``downsample.1``), so torchvision and timm checkpoints load as
they are.

* Bottleneck depths (50, 101, 152) widen the inner 3x3 convolution of every
  block by ``k`` (torchvision's ``width_per_group = 64 * k``); ``k = 2`` gives
  torchvision's ``wide_resnet50_2``/``wide_resnet101_2`` (WRN-50-2-bottleneck).
* Basic-block depths (18, 34) widen every stage: widths 64k, 128k, 256k, 512k
  after the 64-channel stem; ``wide_resnet34_2`` is the WRN-34-2 used for COCO
  detection in the paper.

Initialisation follows the authors' ``pretrained/wide-resnet.lua`` (conv weights
normal(0, sqrt(2 / fan_in))); ``conv_init="fan_out"`` gives torchvision's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn

from .common import FeatureNet, ShapeSpec, Stage
from .norm import is_batch_norm
from .wrn_cifar import check_conv_init

__all__ = ["WideResNet", "BasicBlock", "Bottleneck", "IMAGENET_DEPTHS"]

# depth -> (block kind, blocks per stage), as in the ResNet paper.
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _downsample(in_channels: int, out_channels: int, stride: int, norm_layer: Optional[Callable[..., nn.Module]] = None,
                conv_layer: Optional[Callable[..., nn.Conv2d]] = None) -> Optional[nn.Module]:
    """Return the projection shortcut (1x1 conv + norm) or None when the shape is kept."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        (conv_layer or nn.Conv2d)(in_channels, out_channels, 1, stride, bias=False),
        (norm_layer or nn.BatchNorm2d)(out_channels),
    )


class BasicBlock(nn.Module):
    """Post-activation basic block (two 3x3 convs); calling it returns relu(residual + shortcut)."""

    def __init__(self, in_channels: int, width: int, stride: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        conv_layer = conv_layer or nn.Conv2d
        self.conv1 = conv_layer(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(width, width, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.downsample = _downsample(in_channels, width, stride, norm_layer, conv_layer)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """Post-activation bottleneck (1x1, 3x3 with stride, 1x1 x4); returns relu(residual + shortcut).

    ``width`` is the inner width (``planes * k``); the output has ``4 * planes`` channels.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, width: int, stride: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        conv_layer = conv_layer or nn.Conv2d
        out = planes * self.expansion
        self.conv1 = conv_layer(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv_layer(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = conv_layer(width, out, 1, bias=False)
        self.bn3 = norm_layer(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out, stride, norm_layer, conv_layer)
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output."""
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


_STEM_CHILDREN = ("conv1.", "bn1.")


def _stem_keys_out(module, state_dict, prefix, local_metadata) -> None:
    # "<prefix>stem.conv1.weight" -> "<prefix>conv1.weight", in place and in order: this
    # module's entries are the last ones of the dict when its hook runs
    keys = list(state_dict)
    first = next((i for i, k in enumerate(keys) if k.startswith(prefix + "stem.")), None)
    if first is None:
        return
    tail = [(k, state_dict.pop(k)) for k in keys[first:]]
    for k, v in tail:
        state_dict[prefix + k[len(prefix) + 5:] if k.startswith(prefix + "stem.") else k] = v


def _stem_keys_in(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for k in [k for k in state_dict if k.startswith(tuple(prefix + c for c in _STEM_CHILDREN))]:
        state_dict[prefix + "stem." + k[len(prefix):]] = state_dict.pop(k)


class WideResNet(FeatureNet):
    """ImageNet wide ResNet of ``depth`` in {18, 34, 50, 101, 152} and widening ``k``.

    Calling it returns logits (N, num_classes). Stages ``res2``..``res5`` are
    ``layer1``..``layer4`` with strides 4, 8, 16, 32; ``stem`` is
    conv1-bn1-relu-maxpool.

    Args:
        depth: 18, 34 (basic blocks) or 50, 101, 152 (bottlenecks).
        k: widening factor, an integer >= 1 (k = 1 is the plain ResNet).
        num_classes: classifier size.
        memory_efficient: recompute each block in the backward pass.
        zero_init_residual: start the last BN of each block at 0.
        conv_init: ``"fan_in"`` (default) initialises as the authors'
            ``pretrained/wide-resnet.lua`` (the fb.resnet.torch model file they trained
            WRN-50-2 with, edited to n = kh * kw * nInputPlane): conv weights
            normal(0, sqrt(2 / (kh * kw * in_channels))), BatchNorm weight 1 and bias 0,
            ``fc`` bias 0. ``"fan_out"`` initialises as torchvision's ResNet (and
            fb.resnet.torch's unedited ``models/resnet.lua``): normal(0, sqrt(2 / (kh * kw *
            out_channels))), ``fc`` left at PyTorch's default.
        norm_layer: the normalisation layer class (``wrn_det.models.norm.get_norm``; default
            ``nn.BatchNorm2d``), as torchvision's ``norm_layer``.
        conv_layer: the convolution class, called with ``nn.Conv2d``'s arguments (default
            ``nn.Conv2d``): a subclass such as the builtin detectors' ``FastConv2d`` keeps the
            parameters, state-dict keys and initial weights.

    ``stem`` is a registered module holding ``conv1``, ``bn1``, ``relu`` and ``maxpool``;
    the state dict still has torchvision's top-level keys (``conv1.weight``, ``bn1.*``),
    so torchvision and timm files load as they are.
    """

    family = "imagenet"
    default_input_size = 224

    def __init__(self, depth: int = 50, k: int = 2, num_classes: int = 1000,
                 memory_efficient: bool = False, zero_init_residual: bool = False,
                 conv_init: str = "fan_in", norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"wide ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"wide ResNet widening factor k must be an integer >= 1, got {k}")
        check_conv_init(conv_init)
        kind, counts = IMAGENET_DEPTHS[depth]
        self.depth, self.k, self.num_classes = depth, k, num_classes

        norm_layer = norm_layer or nn.BatchNorm2d
        self.stem = nn.Sequential(OrderedDict([
            ("conv1", (conv_layer or nn.Conv2d)(3, 64, 7, 2, 3, bias=False)), ("bn1", norm_layer(64)),
            ("relu", nn.ReLU(inplace=True)), ("maxpool", nn.MaxPool2d(3, 2, 1))]))
        self._stem_spec = ShapeSpec(64, 4)
        # torchvision's keys in the state dict: stem.conv1.weight is saved and loaded as conv1.weight
        self.register_state_dict_post_hook(_stem_keys_out)
        self.register_load_state_dict_pre_hook(_stem_keys_in)

        in_ch = 64
        self._stage_attrs = OrderedDict()
        self._out_specs = OrderedDict()
        for i, count in enumerate(counts):
            planes = 64 * 2 ** i
            blocks = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                if kind == "basic":
                    block = BasicBlock(in_ch, planes * k, stride, norm_layer, conv_layer)
                else:
                    block = Bottleneck(in_ch, planes, planes * k, stride, norm_layer, conv_layer)
                blocks.append(block)
                in_ch = block.out_channels
            layer = f"layer{i + 1}"
            setattr(self, layer, Stage(*blocks))
            self._stage_attrs[f"res{i + 2}"] = layer
            self._out_specs[f"res{i + 2}"] = ShapeSpec(in_ch, 4 * 2 ** i)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=conv_init, nonlinearity="relu")
            elif is_batch_norm(m):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if conv_init == "fan_in":
            nn.init.zeros_(self.fc.bias)  # the authors' file zeroes every Linear bias
        if zero_init_residual:
            # Each block then starts as the identity, which helps large-batch training.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
        self.memory_efficient = memory_efficient

    @property
    def conv1(self) -> nn.Module:
        """Return the stem's first convolution (torchvision's ``conv1``)."""
        return self.stem.conv1

    @property
    def bn1(self) -> nn.Module:
        """Return the stem's normalisation layer (torchvision's ``bn1``)."""
        return self.stem.bn1
