"""The CIFAR baselines the Wide Residual Networks paper compares against.

* :class:`PreActResNet` -- pre-activation bottleneck ResNets (He et al., 2016),
  depth 9n + 2: ``preact_resnet164`` (~1.7M parameters) and
  ``preact_resnet1001`` (~10.2M).
* :class:`NIN` -- Network in Network (Lin et al., 2014) with BatchNorm.
* :class:`VGGCIFAR` -- VGG-16 with BatchNorm and dropout for 32x32 images.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .common import FeatureNet, ShapeSpec, Stage
from .wrn_cifar import BNReLU, init_original

__all__ = ["PreActBottleneck", "PreActResNet", "ConvBNReLU", "NIN", "VGGCIFAR"]


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3(stride), BN-ReLU-1x1.

    The inner width is ``out_channels // 4``. As in the WRN block, the shortcut
    is the identity when the shape is kept, else a strided 1x1 convolution that
    shares the block's first BN-ReLU. Calling it returns the block output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        mid = out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return residual(x) + shortcut(x)."""
        pre = torch.relu(self.bn1(x))
        y = self.conv1(pre)
        y = self.conv2(torch.relu(self.bn2(y)))
        y = self.conv3(torch.relu(self.bn3(y)))
        return y + (x if self.shortcut is None else self.shortcut(pre))


class PreActResNet(FeatureNet):
    """Pre-activation bottleneck ResNet for CIFAR; calling it returns logits (N, num_classes).

    conv3x3 3 -> 16, three stages of ``n = (depth - 2) / 9`` bottlenecks with
    output widths 64, 128, 256 and strides 1, 2, 2, then BN-ReLU (folded into
    ``stage3``), global average pooling and Linear. Init: convolutions
    normal(0, sqrt(2 / (kh * kw * out_channels))), BatchNorm weight 1, bias 0.

    Args:
        depth: 9n + 2 (164, 1001, ...).
        num_classes: classifier size.
        memory_efficient: recompute each block in the backward pass.
    """

    family = "cifar"
    default_input_size = 32

    def __init__(self, depth: int = 164, num_classes: int = 10, memory_efficient: bool = False):
        super().__init__()
        if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"pre-activation ResNet depth must be 9n+2 with n >= 1 (11, 20, ..., 164, ..., 1001), "
                             f"got {depth}")
        n = (depth - 2) // 9
        self.depth, self.num_classes = depth, num_classes
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        in_ch = 16
        self._stage_attrs = OrderedDict()
        self._out_specs = OrderedDict()
        widths = (64, 128, 256)
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = OrderedDict()
            for j in range(n):
                blocks[str(j)] = PreActBottleneck(in_ch, width, stride if j == 0 else 1)
                in_ch = width
            if i == len(widths) - 1:
                blocks["post_act"] = BNReLU(width)
            name = f"stage{i + 1}"
            setattr(self, name, Stage(blocks))
            self._stage_attrs[name] = name
            self._out_specs[name] = ShapeSpec(width, 2 ** i)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_original(self, bn_weight_init="ones")
        self.memory_efficient = memory_efficient

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits from the activated last stage output: pool, then Linear."""
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvBNReLU(nn.Sequential):
    """Convolution (with bias), BatchNorm (eps 1e-3), ReLU; calling it returns the activated map."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(OrderedDict([
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2)),
            ("bn", nn.BatchNorm2d(out_channels, eps=1e-3)),
            ("relu", nn.ReLU(inplace=True)),
        ]))


class NIN(FeatureNet):
    """Network in Network with BatchNorm for 32x32 images; calling it returns logits.

    Three mlpconv layers (5x5-1x1-1x1 with 192-160-96 channels, 5x5-1x1-1x1 with
    192 channels, 3x3-1x1-1x1 with 192 channels and ``num_classes`` last)
    separated by 3x3/2 max and average pooling (ceil mode) and dropout 0.5, then
    global average pooling. As in the original, the last 1x1 layer is followed
    by BN-ReLU before the pooling.

    ``stem`` is the first 5x5 layer; stages ``stage1`` (96 channels, stride 1),
    ``stage2`` (192, stride 2), ``stage3`` (192, stride 4); the head is the
    final 1x1 class layer and the pooling.
    """

    family = "cifar"
    default_input_size = 32

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, memory_efficient: bool = False):
        super().__init__()
        self.num_classes = num_classes
        drop = (lambda: nn.Dropout(dropout)) if dropout > 0 else nn.Identity
        self.stem = ConvBNReLU(3, 192, 5)
        self.stage1 = Stage(ConvBNReLU(192, 160, 1), ConvBNReLU(160, 96, 1))
        self.stage2 = Stage(nn.MaxPool2d(3, 2, ceil_mode=True), drop(),
                            ConvBNReLU(96, 192, 5), ConvBNReLU(192, 192, 1), ConvBNReLU(192, 192, 1))
        self.stage3 = Stage(nn.AvgPool2d(3, 2, ceil_mode=True), drop(),
                            ConvBNReLU(192, 192, 3), ConvBNReLU(192, 192, 1))
        self.classifier = ConvBNReLU(192, num_classes, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._stage_attrs = OrderedDict((n, n) for n in ("stage1", "stage2", "stage3"))
        self._out_specs = OrderedDict([("stage1", ShapeSpec(96, 1)), ("stage2", ShapeSpec(192, 2)),
                                       ("stage3", ShapeSpec(192, 4))])
        init_original(self, bn_weight_init="ones")
        self.memory_efficient = memory_efficient

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits: the 1x1 class layer, then global average pooling."""
        return torch.flatten(self.avgpool(self.classifier(x)), 1)


class VGGCIFAR(FeatureNet):
    """VGG-16 with BatchNorm for 32x32 images; calling it returns logits (N, num_classes).

    Thirteen 3x3 conv-BN-ReLU layers (64, 64, M, 128, 128, M, 256 x3, M, 512 x3,
    M, 512 x3, M; M = 2x2 max pooling), then Dropout-Linear(512, 512)-BN-ReLU-
    Dropout-Linear. With ``dropout=True`` it uses the reference CIFAR recipe's
    rates: 0.3 after the first conv, 0.4 after every later conv except the
    last one before each pooling, 0.5 in the classifier.

    ``stem`` is the first conv layer; stages ``stage1``..``stage5`` have
    strides 1, 2, 4, 8, 16 (each later stage starts with its pooling) and widths
    64, 128, 256, 512, 512.
    """

    family = "cifar"
    default_input_size = 32

    def __init__(self, num_classes: int = 10, dropout: bool = True, memory_efficient: bool = False):
        super().__init__()
        self.num_classes = num_classes

        def drop(p):
            return nn.Dropout(p) if dropout else nn.Identity()

        self.stem = nn.Sequential(ConvBNReLU(3, 64), drop(0.3))
        self._stage_attrs = OrderedDict()
        self._out_specs = OrderedDict()
        plan = [(64, 1), (128, 2), (256, 3), (512, 3), (512, 3)]
        in_ch = 64
        for i, (width, convs) in enumerate(plan):
            layers = []
            if i == 0:
                convs -= 1  # the first conv of stage 1 is the stem
            else:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            for j in range(convs):
                layers.append(ConvBNReLU(in_ch, width))
                in_ch = width
                if j < convs - 1:
                    layers.append(drop(0.4))
            name = f"stage{i + 1}"
            setattr(self, name, Stage(*layers))
            self._stage_attrs[name] = name
            self._out_specs[name] = ShapeSpec(width, 2 ** i)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the identity at 32x32; other sizes still work
        self.classifier = nn.Sequential(
            drop(0.5), nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            drop(0.5), nn.Linear(512, num_classes),
        )
        init_original(self, bn_weight_init="ones")
        self.memory_efficient = memory_efficient

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits from the stage5 output: pool to 1x1, then the classifier."""
        return self.classifier(torch.flatten(self.avgpool(self.pool(x)), 1))
