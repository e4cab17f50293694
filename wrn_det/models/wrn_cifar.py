"""CIFAR-style Wide Residual Networks, WRN-d-k (Zagoruyko & Komodakis, 2016).

The network follows the original Torch code of the paper layer for layer, so
parameter counts match the paper's tables (WRN-28-10: 36,479,194 with 10
classes):

* conv3x3 3 -> 16;
* three groups of ``n = (depth - 4) / 6`` pre-activation blocks with widths
  16k, 32k, 64k and strides 1, 2, 2;
* BN-ReLU, global average pooling, Linear.

A block is BN-ReLU-conv3x3(stride)-BN-ReLU-Dropout-conv3x3 (no conv biases).
The shortcut is the identity when the block keeps the shape; otherwise a 1x1
convolution with the block's stride that reads the *pre-activated* input, i.e.
the block's first BN-ReLU is shared between the residual branch and the
shortcut.

Initialisation (:func:`init_original`) is the authors' ``models/utils.lua``: conv
weights normal(0, sqrt(2 / fan_in)), Torch's default BatchNorm weights U(0, 1),
Linear bias 0.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .common import FeatureNet, ShapeSpec, add_residual_stages
from .norm import is_batch_norm

__all__ = ["WideResNetCIFAR", "WideBasicBlock", "BNReLU", "init_original", "check_conv_init", "CONV_INITS"]


class BNReLU(nn.Module):
    """BatchNorm (``norm_layer``, default ``nn.BatchNorm2d``) followed by ReLU; calling it returns the activated tensor."""

    def __init__(self, channels: int, norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        self.bn = (norm_layer or nn.BatchNorm2d)(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(bn(x))."""
        return torch.relu(self.bn(x))


class WideBasicBlock(nn.Module):
    """Pre-activation basic block of a WRN; calling it returns the block output.

    Args:
        in_channels, out_channels: widths before and after the block.
        stride: stride of the first 3x3 convolution (and of the shortcut).
        dropout: dropout probability between the two convolutions (0 = none).
        norm_layer: the normalisation layer class (default ``nn.BatchNorm2d``).
        conv_layer: the convolution class (default ``nn.Conv2d``; see :class:`WideResNetCIFAR`).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        conv_layer = conv_layer or nn.Conv2d
        self.bn1 = norm_layer(in_channels)
        self.conv1 = conv_layer(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv_layer(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = conv_layer(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return residual(x) + shortcut(x)."""
        pre = torch.relu(self.bn1(x))
        y = self.conv1(pre)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        # When the width changes the projection reads the activated input, as in
        # the original code; otherwise the raw input is carried unchanged.
        return y + (x if self.shortcut is None else self.shortcut(pre))


#: The two conventions for the normal(0, sqrt(2 / n)) convolution init ("MSR init", He et al. 2015).
CONV_INITS = ("fan_in", "fan_out")


def check_conv_init(conv_init: str) -> str:
    """Return ``conv_init`` if it is ``"fan_in"`` or ``"fan_out"``; raise ValueError naming both otherwise."""
    if conv_init not in CONV_INITS:
        raise ValueError(f"conv_init must be 'fan_in' or 'fan_out', got {conv_init!r}")
    return conv_init


def init_original(model: nn.Module, bn_weight_init: str = "uniform", conv_init: str = "fan_in",
                  zero_linear_bias: bool = True) -> nn.Module:
    """Initialise ``model`` the way the original Torch code does; returns ``model``.

    * convolutions: normal(0, sqrt(2 / n)), bias 0. ``conv_init="fan_in"`` (default):
      n = kh * kw * in_channels, as ``MSRinit`` of the authors' ``models/utils.lua``
      since its commit "fix MSRA init" (September 2016) and ``kaiming_normal_`` (fan-in)
      of their PyTorch port (``pytorch/utils.py``); for the 3 -> 16 stem of a WRN that
      is std 0.27. ``"fan_out"``: n = kh * kw * out_channels, as ``models/utils.lua``
      before that fix, ``ConvInit`` of fb.resnet.torch and of He's
      ``resnet-1k-layers/resnet-pre-act.lua``, and torchvision's ResNet (std 0.118
      for the stem);
    * BatchNorm: weight U(0, 1) (``bn_weight_init="uniform"``, the default of
      Torch's BatchNormalization, which the original code leaves untouched) or
      1 (``"ones"``); bias 0;
    * Linear: the weight keeps PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
      which is also Torch's default; the bias is 0 (``FCinit``) with
      ``zero_linear_bias``, else it keeps that default too.
    """
    if bn_weight_init not in ("uniform", "ones"):
        raise ValueError(f"bn_weight_init must be 'uniform' or 'ones', got {bn_weight_init!r}")
    check_conv_init(conv_init)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_init, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_batch_norm(m):  # trained, synchronised or frozen: the same draws
            if m.weight is not None:
                if bn_weight_init == "uniform":
                    nn.init.uniform_(m.weight, 0.0, 1.0)
                else:
                    nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)
    return model


class WideResNetCIFAR(FeatureNet):
    """WRN-``depth``-``k`` for 32x32 images; calling it returns logits (N, num_classes).

    Args:
        depth: total depth, 6n + 4 (10, 16, 22, 28, 40, ...).
        k: widening factor, an integer >= 1.
        num_classes: size of the classifier output.
        dropout: dropout probability inside each block (the paper uses 0.3).
        memory_efficient: recompute each block in the backward pass.
        bn_weight_init: ``"uniform"`` (U(0, 1), the original) or ``"ones"``.
        conv_init: ``"fan_in"`` (the authors' ``models/utils.lua`` since September 2016 and
            their PyTorch port) or ``"fan_out"`` (their code before that); see :func:`init_original`.
        norm_layer: the normalisation layer class (``wrn_det.models.norm.get_norm``; default
            ``nn.BatchNorm2d``).
        conv_layer: the convolution class, called with ``nn.Conv2d``'s arguments (default
            ``nn.Conv2d``): a subclass such as the builtin detectors' ``FastConv2d`` keeps the
            parameters, state-dict keys and initial weights.

    Stages ``stage1``, ``stage2``, ``stage3`` have strides 1, 2, 4 and widths
    16k, 32k, 64k; the final BN-ReLU belongs to ``stage3``, so its output is
    activated. ``stem`` is the first 3x3 convolution.
    """

    family = "cifar"
    default_input_size = 32

    def __init__(self, depth: int = 28, k: int = 10, num_classes: int = 10, dropout: float = 0.0,
                 memory_efficient: bool = False, bn_weight_init: str = "uniform",
                 conv_init: str = "fan_in", norm_layer: Optional[Callable[..., nn.Module]] = None,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"WRN widening factor k must be an integer >= 1, got {k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.depth, self.k, self.num_classes = depth, k, num_classes
        widths = [16 * k, 32 * k, 64 * k]

        self.stem = (conv_layer or nn.Conv2d)(3, 16, 3, 1, 1, bias=False)
        self._stem_spec = ShapeSpec(16, 1)
        add_residual_stages(self, 16, widths, (1, 2, 2), n,
                            lambda cin, width, stride: WideBasicBlock(cin, width, stride, dropout, norm_layer,
                                                                      conv_layer),
                            lambda width: BNReLU(width, norm_layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

        init_original(self, bn_weight_init, conv_init)
        self.memory_efficient = memory_efficient
