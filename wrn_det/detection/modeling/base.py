"""What every detector of the builtin engine shares: input handling, the unsupported-key checks, the
convolution class of its layers.

:class:`DetectorBase` normalises the images (``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``), pads
them into a batch divisible by the backbone's stride, turns annotations into
torchvision-style targets and maps boxes back to the original image size.
:func:`get_conv_layer` turns ``MODEL.FAST_CPU`` into the convolution class every builder
of the detector (backbone, FPN, RPN head, box head) builds its layers with, and
:class:`ConvNormAct` is torchvision's conv-norm-activation block built with it.
"""
import functools
import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import Conv2dNormActivation, ConvNormActivation

from wrn_det.engine.errors import ConfigError

from .fast_conv import FastConv2d

__all__ = ["DetectorBase", "check_unsupported", "in_feature_channels", "get_conv_layer", "ConvNormAct"]


def in_feature_channels(key: str, in_features, shapes) -> int:
    """Return the channel count shared by the backbone outputs ``in_features`` (``shapes``: ``output_shape()``).

    Raises :class:`ConfigError` naming ``key`` (``MODEL.RPN.IN_FEATURES``, say) for a name that
    is not a backbone output, or outputs of different widths (the head is shared across them).
    """
    in_features = list(in_features)
    for f in in_features:
        if f not in shapes:
            raise ConfigError(f"{key}: {f!r} is not a backbone output; outputs are {list(shapes)}")
    channels = {shapes[f].channels for f in in_features}
    if len(channels) != 1:
        raise ConfigError(f"{key} {in_features} have different channel counts {sorted(channels)}")
    return channels.pop()


def get_conv_layer(cfg) -> Callable[..., nn.Conv2d]:
    """Return the convolution class of the builtin detector's layers: ``FastConv2d`` or ``nn.Conv2d``.

    ``MODEL.FAST_CPU.CONV`` True: :class:`~wrn_det.detection.modeling.fast_conv.FastConv2d`
    (faster CPU paths inside the detector's ``forward``; same parameters, keys and initial
    weights), with packed inference weights as ``MODEL.FAST_CPU.PACK_WEIGHTS`` says;
    False: ``nn.Conv2d``. The result is called with ``nn.Conv2d``'s arguments.
    """
    fast = cfg.MODEL.FAST_CPU
    if not fast.CONV:
        return nn.Conv2d
    return functools.partial(FastConv2d, pack_weights=bool(fast.PACK_WEIGHTS))


class ConvNormAct(Conv2dNormActivation):
    """torchvision's ``Conv2dNormActivation`` (convolution, norm, activation) with the convolution class chosen.

    Stride 1; ``padding`` None keeps the map's size; ``norm_layer`` None: no norm and a
    biased convolution. ``conv_layer`` (default ``nn.Conv2d``) builds the convolution; the layers, their
    state-dict keys (``0.weight``, ``1.*``) and their initial random draws are those of
    torchvision's block, so torchvision's FPN, RPN head and box head can be built with it
    and keep loading every checkpoint. Calling it returns the block's output.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: Optional[int] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None,
                 activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
                 conv_layer: Optional[Callable[..., nn.Conv2d]] = None):
        # Conv2dNormActivation fixes nn.Conv2d; its base takes the class
        ConvNormActivation.__init__(self, in_channels, out_channels, kernel_size, padding=padding,
                                    norm_layer=norm_layer, activation_layer=activation_layer,
                                    conv_layer=conv_layer or nn.Conv2d)


def check_unsupported(cfg) -> None:
    """Raise :class:`ConfigError` for keys the builtin detectors do not honour (masks, keypoints, ...)."""
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("MODEL.MASK_ON / KEYPOINT_ON: the builtin engine detects boxes only; set them False")
    name = cfg.MODEL.PROPOSAL_GENERATOR.NAME
    if name not in ("RPN", "PrecomputedProposals"):
        raise ConfigError(f"MODEL.PROPOSAL_GENERATOR.NAME {name!r} is not supported; use RPN (Faster R-CNN) or "
                          "PrecomputedProposals (Fast R-CNN on DATASETS.PROPOSAL_FILES_*)")
    if (name == "PrecomputedProposals") != bool(cfg.MODEL.LOAD_PROPOSALS):
        raise ConfigError(f"MODEL.PROPOSAL_GENERATOR.NAME {name!r} with MODEL.LOAD_PROPOSALS {cfg.MODEL.LOAD_PROPOSALS}: "
                          "PrecomputedProposals and LOAD_PROPOSALS True go together (RPN with False)")
    if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
        raise ConfigError(f"INPUT.FORMAT must be BGR or RGB, got {cfg.INPUT.FORMAT!r}")


class DetectorBase(nn.Module):
    """Shared input handling: pixel normalisation, padding into a batch, output rescaling."""

    def __init__(self, cfg, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.size_divisibility = int(getattr(backbone, "size_divisibility", 0))
        mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD need three values each (one per channel)")
        if not all(math.isfinite(float(v)) for v in mean + std) or not all(float(v) > 0 for v in std):
            raise ConfigError(f"MODEL.PIXEL_STD must be three positive numbers and MODEL.PIXEL_MEAN three finite ones, "
                              f"got {std} and {mean}")
        self.register_buffer("pixel_mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """Return the device of the model's buffers."""
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Return the normalised images, zero-padded to a common size divisible by the backbone's stride."""
        # non_blocking: pinned batches (a GPU run's loader pins them) are copied beside the computation
        images = [(x["image"].to(self.device, non_blocking=True).float() - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        sizes = [tuple(im.shape[-2:]) for im in images]
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        d = self.size_divisibility
        if d > 1:
            h, w = int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for b, im in zip(batch, images):
            b[:, : im.shape[1], : im.shape[2]].copy_(im)
        return ImageList(batch, sizes)

    def targets(self, batched_inputs: List[dict]) -> List[Dict[str, torch.Tensor]]:
        """Return torchvision-style targets: XYXY ``boxes`` and ``labels`` 1..K (0 is background)."""
        return [{"boxes": x["boxes"].to(self.device, torch.float32, non_blocking=True),
                 "labels": x["classes"].to(self.device, non_blocking=True) + 1}
                for x in batched_inputs]

    @staticmethod
    def rescale(boxes: torch.Tensor, in_size, out_h: int, out_w: int) -> torch.Tensor:
        """Return ``boxes`` mapped from the network's input size to the original image size, clipped to it."""
        sy, sx = out_h / in_size[0], out_w / in_size[1]
        boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
        return boxes
