"""Model names -> networks.

Names are patterns, so every depth and width is reachable:

* ``wrn_{depth}_{k}`` -- CIFAR-style WRN-d-k (:class:`WideResNetCIFAR`),
  10 classes by default;
* ``wide_resnet{18,34,50,101,152}_{k}`` -- ImageNet-style wide ResNets with
  torchvision's keys (:class:`WideResNet`), 1000 classes by default;
* ``preact_resnet{depth}`` -- pre-activation bottleneck ResNets for CIFAR;
* ``nin``, ``vgg_cifar`` -- as the authors' ``models/nin.lua`` and ``models/vgg.lua``.

:func:`list_models` lists the canonical names: the configurations of the paper
and of its code's results, plus the baselines.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, List, Optional, Tuple

from torch import nn

from .baselines import NIN, VGGCIFAR, PreActResNet
from .wide_resnet import WideResNet
from .wrn_cifar import WideResNetCIFAR

__all__ = ["build_model", "list_models", "model_class", "CANONICAL_MODELS"]

# The configurations reported in the WRN paper and its code (CIFAR, SVHN),
# the ImageNet-style wide ResNets at k = 2, and the baselines.
CANONICAL_MODELS: Tuple[str, ...] = (
    "wrn_16_4", "wrn_16_8", "wrn_16_10",
    "wrn_22_8", "wrn_22_10",
    "wrn_28_10", "wrn_28_12",
    "wrn_40_1", "wrn_40_2", "wrn_40_4", "wrn_40_8", "wrn_40_10",
    "wrn_52_1",
    "wide_resnet18_2", "wide_resnet34_2", "wide_resnet50_2", "wide_resnet101_2", "wide_resnet152_2",
    "preact_resnet164", "preact_resnet1001",
    "nin", "vgg_cifar",
)

# (pattern, class, default num_classes, function turning the match into positional kwargs)
_FAMILIES: List[Tuple[re.Pattern, type, int, Callable[[re.Match], dict]]] = [
    (re.compile(r"wrn_(\d+)_(\d+)"), WideResNetCIFAR, 10,
     lambda m: {"depth": int(m.group(1)), "k": int(m.group(2))}),
    (re.compile(r"wide_resnet(\d+)_(\d+)"), WideResNet, 1000,
     lambda m: {"depth": int(m.group(1)), "k": int(m.group(2))}),
    (re.compile(r"preact_resnet(\d+)"), PreActResNet, 10, lambda m: {"depth": int(m.group(1))}),
    (re.compile(r"nin"), NIN, 10, lambda m: {}),
    (re.compile(r"vgg_cifar"), VGGCIFAR, 10, lambda m: {}),
]


def list_models() -> List[str]:
    """Return the canonical model names (every other depth/width of a pattern also builds)."""
    return list(CANONICAL_MODELS)


def _unknown(name) -> ValueError:
    return ValueError(
        f"unknown model {name!r}; known models: {', '.join(CANONICAL_MODELS)} "
        f"(also any wrn_{{depth}}_{{k}}, wide_resnet{{18,34,50,101,152}}_{{k}}, preact_resnet{{9n+2}})")


def model_class(name: str) -> Tuple[type, int]:
    """Return ``(network class, default number of classes)`` for ``name``, building nothing.

    Raises ValueError (listing the known names) for a name no family matches.
    """
    for pattern, cls, default_classes, _ in _FAMILIES:
        if isinstance(name, str) and pattern.fullmatch(name):
            return cls, default_classes
    raise _unknown(name)


def build_model(name: str, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """Return a freshly initialised network for ``name``.

    Args:
        name: a canonical name (see :func:`list_models`) or any instance of the
            patterns ``wrn_{depth}_{k}``, ``wide_resnet{depth}_{k}``,
            ``preact_resnet{depth}``.
        num_classes: classifier size; ``None`` picks 10 for the CIFAR family
            and 1000 for the ImageNet family.
        **kwargs: passed to the network class, e.g. ``dropout`` (CIFAR-style WRN),
            ``conv_init`` (WRNs and pre-activation ResNets), ``memory_efficient``,
            ``norm_layer`` and ``conv_layer`` (all).

    Raises:
        ValueError: an unknown name (the message lists the known names), a
            depth or width the family does not allow, or a keyword the network
            does not take.
    """
    for pattern, cls, default_classes, parse in _FAMILIES:
        match = pattern.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            continue
        params = inspect.signature(cls.__init__).parameters
        allowed = [p for p in params if p not in ("self", "num_classes", "depth", "k")]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"model {name!r} does not take argument(s) {', '.join(unknown)}; "
                             f"it takes: {', '.join(allowed) or 'none'}")
        if num_classes is None:
            num_classes = default_classes
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        return cls(num_classes=num_classes, **parse(match), **kwargs)
    raise _unknown(name)
