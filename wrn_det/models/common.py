"""Pieces shared by every network of the model zoo.

* :class:`ShapeSpec` -- channels and stride of one named feature map.
* :class:`Stage` -- a sequence of blocks that can recompute each block in the
  backward pass (``memory_efficient``).
* :class:`FeatureNet` -- the feature protocol every network implements
  (``forward_features``, ``output_shape``, ``stage_names``, ``stem``,
  ``get_stage``, ``family``, ``default_input_size``).
* :func:`add_residual_stages` -- the stages of the CIFAR-style residual networks.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, Dict, List, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["ShapeSpec", "Stage", "FeatureNet", "add_residual_stages", "checkpoint_block", "count_parameters"]


class ShapeSpec(NamedTuple):
    """Channels and stride (relative to the input image) of a feature map."""

    channels: int
    stride: int


class _KeepBatchNormStats:
    """Context manager that undoes running-statistics updates of BatchNorm layers.

    Entered around the backward-pass recomputation of a checkpointed block: the
    recomputed forward runs in training mode and would otherwise update
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` a second time
    for the same batch. Saving and restoring the buffers keeps them bit-identical
    to a model that is not checkpointed, whatever the momentum (also ``None``).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = []

    def __enter__(self):
        self.saved = [
            (m, m.running_mean.clone(), m.running_var.clone(),
             None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
            for m in self.module.modules()
            if isinstance(m, _BatchNorm) and m.training and m.running_mean is not None
        ]
        return self

    def __exit__(self, *exc):
        # Runs also when the recomputation is stopped early by autograd.
        with torch.no_grad():
            for m, mean, var, count in self.saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)
        self.saved = []
        return False


def checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``block(x)`` without keeping its intermediate activations.

    Returns the block's output. The block is run again in the backward pass
    (non-reentrant activation checkpointing); the random-number state is restored
    for the recomputation, so dropout masks are the same, and BatchNorm running
    statistics are updated exactly once.
    """
    return checkpoint(
        block, x,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (nullcontext(), _KeepBatchNormStats(block)),
    )


class Stage(nn.Sequential):
    """A sequence of blocks; one stage of a network.

    Behaves as ``nn.Sequential`` (same state-dict keys). When
    ``memory_efficient`` is true and gradients are being recorded, each child is
    run through :func:`checkpoint_block`, trading compute for activation memory.
    Calling it returns the output of the last block.
    """

    memory_efficient: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the output of the last block for input ``x``."""
        recompute = self.memory_efficient and torch.is_grad_enabled()
        for block in self:
            x = checkpoint_block(block, x) if recompute else block(x)
        return x


class FeatureNet(nn.Module):
    """Base class of every network: classification plus named stage outputs.

    Subclasses set ``family``, ``default_input_size``, ``_stage_attrs`` (stage
    name -> attribute name of a :class:`Stage`), ``_out_specs`` (stage name ->
    :class:`ShapeSpec`), ``_stem_spec`` (the stem output's :class:`ShapeSpec`), provide
    ``stem`` (a submodule or a property returning a module: image -> input of the first
    stage) and the head's ``avgpool`` and ``fc`` (or their own ``forward_head``).
    """

    family: str = "cifar"
    default_input_size: int = 32
    _stage_attrs: "OrderedDict[str, str]"
    _out_specs: "OrderedDict[str, ShapeSpec]"

    @property
    def stage_names(self) -> List[str]:
        """Return the stage names, from the first (finest) to the last."""
        return list(self._stage_attrs)

    def get_stage(self, name: str) -> nn.Module:
        """Return the stage module ``name`` (shares parameters with the network).

        Raises ``KeyError`` naming the known stages for an unknown name.
        """
        if name not in self._stage_attrs:
            raise KeyError(f"unknown stage {name!r}; this network has {self.stage_names}")
        return getattr(self, self._stage_attrs[name])

    @property
    def feature_info(self) -> List[dict]:
        """Return the feature maps as timm describes them: the stem's, then each stage's.

        One dict per map with ``num_chs`` (channels), ``reduction`` (stride relative to the
        input) and ``module`` (the child module whose output it is: ``stem``, then the stage
        attributes). The stem comes first, as the stem activation of timm's ResNets does, so
        ``out_indices=(1, 2, 3, 4)`` picks the four stages of a wide ResNet there too.
        """
        info = [{"num_chs": self._stem_spec.channels, "reduction": self._stem_spec.stride, "module": "stem"}]
        info += [{"num_chs": spec.channels, "reduction": spec.stride, "module": self._stage_attrs[name]}
                 for name, spec in self._out_specs.items()]
        return info

    def output_shape(self) -> "OrderedDict[str, ShapeSpec]":
        """Return an ordered mapping stage name -> ShapeSpec(channels, stride)."""
        return OrderedDict(self._out_specs)

    def forward_features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Return an ordered mapping stage name -> that stage's output for images ``x``."""
        out: Dict[str, torch.Tensor] = OrderedDict()
        x = self.stem(x)
        for name in self.stage_names:
            x = self.get_stage(name)(x)
            out[name] = x
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits (N, num_classes) from the last stage output ``x``: ``avgpool``, then ``fc``."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape (N, num_classes) for images ``x`` (N, 3, H, W)."""
        x = self.stem(x)
        for name in self.stage_names:
            x = self.get_stage(name)(x)
        return self.forward_head(x)

    @property
    def memory_efficient(self) -> bool:
        """Return whether the blocks are recomputed in the backward pass."""
        return any(m.memory_efficient for m in self.modules() if isinstance(m, Stage))

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, Stage):
                m.memory_efficient = bool(value)


def add_residual_stages(net: FeatureNet, in_channels: int, widths: Sequence[int], strides: Sequence[int],
                        blocks_per_stage: int, block: Callable[[int, int, int], nn.Module],
                        post_act: Callable[[int], nn.Module]) -> None:
    """Give ``net`` the stages ``stage1`` ... ``stageN`` of a CIFAR-style residual network; returns nothing.

    Stage ``i`` holds ``blocks_per_stage`` blocks ``block(in_channels, widths[i], stride)``
    (keys ``stage{i+1}.{j}``), the first with ``strides[i]``, the others with stride 1; the last
    stage ends with ``post_act(width)`` (key ``post_act``: the final BN-ReLU of a pre-activation
    network). Sets ``net._stage_attrs`` and ``net._out_specs`` (a stage's stride is the product
    of the strides so far).
    """
    net._stage_attrs = OrderedDict()
    net._out_specs = OrderedDict()
    out_stride = 1
    for i, (width, stride) in enumerate(zip(widths, strides)):
        blocks = OrderedDict()
        for j in range(blocks_per_stage):
            blocks[str(j)] = block(in_channels, width, stride if j == 0 else 1)
            in_channels = width
        if i == len(widths) - 1:
            blocks["post_act"] = post_act(width)
        name = f"stage{i + 1}"
        setattr(net, name, Stage(blocks))
        out_stride *= stride
        net._stage_attrs[name] = name
        net._out_specs[name] = ShapeSpec(width, out_stride)


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters of ``model`` (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())
