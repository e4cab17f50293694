"""The CIFAR baselines of the Wide Residual Networks work, as the authors' ``models/*.lua``.

* :class:`PreActResNet` -- pre-activation bottleneck ResNets (He et al., 2016),
  depth 9n + 2: ``preact_resnet164`` (~1.7M parameters) and
  ``preact_resnet1001`` (~10.2M), as He's ``resnet-1k-layers/resnet-pre-act.lua``
  and the authors' copy of it.
* :class:`NIN` -- Network in Network (Lin et al., 2014) as the authors'
  ``models/nin.lua``: BatchNorm, no dropout, a Linear classifier (1,007,242
  parameters with 10 classes, as their log ``logs/nin_1875527964``).
* :class:`VGGCIFAR` -- the authors' ``models/vgg.lua``: 16 bias-free 3x3
  convolutions with BatchNorm, no dropout, average pooling and one Linear layer
  (20,035,018 parameters with 10 classes, as their log ``logs/vgg_24208029``).

Their README scores these two at 7.4% (NIN) and 6.3% (VGG) test error on
whitened CIFAR-10. Both came from cifar.torch, whose NIN (with dropout) and VGG
(dropout, conv biases, a two-layer classifier) are other networks and are not
provided here: no figure of the WRN work was measured with them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn

from .common import FeatureNet, ShapeSpec, Stage, add_residual_stages
from .wrn_cifar import BNReLU, init_original

__all__ = ["PreActBottleneck", "PreActResNet", "ConvBNReLU", "NIN", "VGGCIFAR"]


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1(stride), BN-ReLU-3x3, BN-ReLU-1x1.

    The stride sits on the first 1x1 convolution, as in He's ``resnet-pre-act.lua``
    and the authors' copy (``models/resnet-pre-act.lua``). The inner width is
    ``out_channels // 4``. The shortcut is the identity when the shape is kept,
    else a strided 1x1 convolution that shares the block's first BN-ReLU (the
    "common BN, ReLU" of those files). Calling it returns the block output.
    ``norm_layer`` and ``conv_layer`` default to ``nn.BatchNorm2d`` and ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        conv_layer = conv_layer or nn.Conv2d
        mid = out_channels // 4
        self.bn1 = norm_layer(in_channels)
        self.conv1 = conv_layer(in_channels, mid, 1, stride, bias=False)
        self.bn2 = norm_layer(mid)
        self.conv2 = conv_layer(mid, mid, 3, 1, 1, bias=False)
        self.bn3 = norm_layer(mid)
        self.conv3 = conv_layer(mid, out_channels, 1, bias=False)
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = conv_layer(in_channels, out_channels, 1, stride, bias=False)

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
    ``stage3``), global average pooling and Linear.

    Args:
        depth: 9n + 2 (164, 1001, ...).
        num_classes: classifier size.
        memory_efficient: recompute each block in the backward pass.
        conv_init: ``"fan_out"`` (default) initialises as He's ``resnet-pre-act.lua``,
            whose figures the paper quotes: conv weights normal(0, sqrt(2 / (kh * kw *
            out_channels))), BatchNorm weight 1, bias 0. ``"fan_in"`` uses n = kh * kw *
            in_channels, as the ``MSRinit`` the authors' copy calls.
        norm_layer: the normalisation layer class (default ``nn.BatchNorm2d``).
        conv_layer: the convolution class, called with ``nn.Conv2d``'s arguments (default
            ``nn.Conv2d``); a subclass keeps the parameters, keys and initial weights.
    """

    family = "cifar"
    default_input_size = 32

    def __init__(self, depth: int = 164, num_classes: int = 10, memory_efficient: bool = False,
                 conv_init: str = "fan_out", norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"pre-activation ResNet depth must be 9n+2 with n >= 1 (11, 20, ..., 164, ..., 1001), "
                             f"got {depth}")
        n = (depth - 2) // 9
        self.depth, self.num_classes = depth, num_classes
        self.stem = (conv_layer or nn.Conv2d)(3, 16, 3, 1, 1, bias=False)
        self._stem_spec = ShapeSpec(16, 1)
        widths = (64, 128, 256)
        add_residual_stages(self, 16, widths, (1, 2, 2), n,
                            lambda cin, width, stride: PreActBottleneck(cin, width, stride, norm_layer, conv_layer),
                            lambda width: BNReLU(width, norm_layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_original(self, bn_weight_init="ones", conv_init=conv_init)
        self.memory_efficient = memory_efficient


class ConvBNReLU(nn.Sequential):
    """Convolution (stride 1, 'same' padding), BatchNorm, ReLU: the ``Block`` of the authors' Lua files.

    Calling it returns the activated map. ``bias`` and ``eps`` are those of the file
    the network follows (see :class:`NIN`, :class:`VGGCIFAR`); ``norm_layer`` and ``conv_layer``
    default to ``nn.BatchNorm2d`` and ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, eps: float = 1e-5,
                 bias: bool = False,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__(OrderedDict([
            ("conv", (conv_layer or nn.Conv2d)(in_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=bias)),
            ("bn", (norm_layer or nn.BatchNorm2d)(out_channels, eps=eps)),
            ("relu", nn.ReLU(inplace=True)),
        ]))


def _init_as_lua_baselines(model: nn.Module) -> None:
    # nin.lua and vgg.lua call FCinit, then testModel (whose model:reset() redraws every
    # layer with Torch's defaults), then MSRinit: conv weights normal(0, sqrt(2 / fan_in)),
    # conv biases 0, BatchNorm weights U(0, 1), and the Linear layer keeps Torch's default
    # U(+-1/sqrt(fan_in)) for weight and bias -- which is PyTorch's default as well.
    init_original(model, bn_weight_init="uniform", conv_init="fan_in", zero_linear_bias=False)


class NIN(FeatureNet):
    """Network in Network as the authors' ``models/nin.lua``; calling it returns logits (N, num_classes).

    Nine conv-BN(eps 1e-5)-ReLU layers in three mlpconv groups, 5x5-1x1-1x1
    (192, 160, 96 channels), 5x5-1x1-1x1 (192) and 3x3-1x1-1x1 (192), separated by
    3x3/2 max and average pooling (ceil mode); no dropout; then average pooling
    over the 8x8 map and Linear(192, num_classes).

    ``conv_bias=True`` (default) gives the convolutions biases, as the network of
    the authors' log ``logs/nin_1875527964`` (1,007,242 parameters, the run behind the
    7.4% of their README); the ``nin.lua`` now in their repository builds them
    ``:noBias()`` (1,005,642 parameters), which ``conv_bias=False`` gives. Either way
    the biases start at 0 and every conv is followed by BatchNorm.

    ``stem`` is the first 5x5 layer; stages ``stage1`` (96 channels, stride 1),
    ``stage2`` (192, stride 2), ``stage3`` (192, stride 4). The final pooling is
    global (the Lua file's 8x8 kernel on the 8x8 map of a 32x32 image), so other
    input sizes work too. ``norm_layer`` and ``conv_layer``: the normalisation and convolution
    classes (defaults ``nn.BatchNorm2d``, ``nn.Conv2d``).
    """

    family = "cifar"
    default_input_size = 32

    def __init__(self, num_classes: int = 10, conv_bias: bool = True, memory_efficient: bool = False,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        self.num_classes = num_classes

        def block(cin, cout, k):
            return ConvBNReLU(cin, cout, k, eps=1e-5, bias=conv_bias, norm_layer=norm_layer, conv_layer=conv_layer)

        self.stem = block(3, 192, 5)
        self._stem_spec = ShapeSpec(192, 1)
        self.stage1 = Stage(block(192, 160, 1), block(160, 96, 1))
        self.stage2 = Stage(nn.MaxPool2d(3, 2, ceil_mode=True),
                            block(96, 192, 5), block(192, 192, 1), block(192, 192, 1))
        self.stage3 = Stage(nn.AvgPool2d(3, 2, ceil_mode=True),
                            block(192, 192, 3), block(192, 192, 1), block(192, 192, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(192, num_classes)
        self._stage_attrs = OrderedDict((n, n) for n in ("stage1", "stage2", "stage3"))
        self._out_specs = OrderedDict([("stage1", ShapeSpec(96, 1)), ("stage2", ShapeSpec(192, 2)),
                                       ("stage3", ShapeSpec(192, 4))])
        _init_as_lua_baselines(self)
        self.memory_efficient = memory_efficient


class VGGCIFAR(FeatureNet):
    """VGG as the authors' ``models/vgg.lua``; calling it returns logits (N, num_classes).

    Sixteen bias-free 3x3 conv-BN(eps 1e-3)-ReLU layers in groups of 2, 2, 4, 4, 4
    (64, 128, 256, 512, 512 channels), the first four groups each followed by 2x2
    max pooling (ceil mode); no dropout; then average pooling (the Lua file's 2x2
    kernel on the 2x2 map of a 32x32 image; global here, so other sizes work) and
    Linear(512, num_classes).

    ``stem`` is the first conv layer; stages ``stage1``..``stage5`` are the groups
    (each later one starting with the preceding pooling), strides 1, 2, 4, 8, 16,
    widths 64, 128, 256, 512, 512. ``norm_layer`` and ``conv_layer``: the normalisation and
    convolution classes (defaults ``nn.BatchNorm2d``, ``nn.Conv2d``).
    """

    family = "cifar"
    default_input_size = 32

    def __init__(self, num_classes: int = 10, memory_efficient: bool = False,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        self.num_classes = num_classes
        self.stem = ConvBNReLU(3, 64, 3, eps=1e-3, norm_layer=norm_layer, conv_layer=conv_layer)
        self._stem_spec = ShapeSpec(64, 1)
        self._stage_attrs = OrderedDict()
        self._out_specs = OrderedDict()
        plan = [(64, 2), (128, 2), (256, 4), (512, 4), (512, 4)]
        in_ch = 64
        for i, (width, convs) in enumerate(plan):
            layers = []
            if i == 0:
                convs -= 1  # the first conv of the first group is the stem
            else:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            for _ in range(convs):
                layers.append(ConvBNReLU(in_ch, width, 3, eps=1e-3, norm_layer=norm_layer, conv_layer=conv_layer))
                in_ch = width
            name = f"stage{i + 1}"
            setattr(self, name, Stage(*layers))
            self._stage_attrs[name] = name
            self._out_specs[name] = ShapeSpec(width, 2 ** i)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_as_lua_baselines(self)
        self.memory_efficient = memory_efficient
