"""Faster 3x3 convolutions for the builtin detectors on the CPU: Winograd (NNPACK) and GEMM.

oneDNN, which PyTorch runs for CPU convolutions, computes 3x3 convolutions directly on
CPUs without AVX-512. PyTorch's bundled NNPACK computes the same convolution of one
image with Winograd's transform, in about half the time once the feature map has a
thousand pixels or so (measured on a 2-core AVX2 machine, one thread: 1.7x at 64x96 and
32-64 channels, 2x at 32x32 and 128 channels, 2.9x at 208x272 and 256 channels; slower
on small maps and under 32 channels, where oneDNN stays). NNPACK runs that convolution on
one thread while oneDNN uses all of PyTorch's threads, so with two threads only large maps
gain (1.15-2.75x from 3,072 pixels at 256 channels) and with more it is left to oneDNN
(:func:`_worth_it`). The result is float32 with a
rounding error about ten times that of the direct convolution (relative 2e-5 instead of
2e-6), as cuDNN's Winograd kernels give on a GPU.

The opposite case, a small map with many channels (res5 of a WRN-34-2 on a 256-pixel image:
1024 channels on 8x11 pixels), is slow in oneDNN too (it reorders the 38 MB of weights for a
few dozen output pixels); there one image's convolution as im2col and one MKL matrix product
(PyTorch's ``_slow_conv2d_forward``, whose gradient is its own im2col products) is faster
(2.3x at 8x11 and 1024 channels for one image, 1.45x for a training step of two, measured as
above), with the direct convolution's rounding. It is taken for maps of at most a quarter
as many pixels as channels.

:func:`use_winograd_convs` switches the eligible ``nn.Conv2d`` modules of a model (3x3,
stride 1, no dilation, one group) to :class:`WinogradConv2d`; the module keeps its
parameters, names and state-dict keys, and computes exactly what ``nn.Conv2d`` computes
unless it runs inside :func:`winograd_convs` (the builtin detectors' ``forward``), so a
backbone used on its own, or by detectron2, is untouched. Inside it, a float32 CPU input
whose maps are large enough (:func:`_worth_it`) is convolved one image at a time by
NNPACK (its inference algorithm; its batch algorithm is slower than oneDNN); the gradient
is the ordinary convolution's, for the whole batch at once. Small maps with many channels
(:func:`_gemm_worth_it`) take the GEMM path. Tracing, scripting and
compilation see a plain convolution, so export is unaffected.
"""
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WinogradConv2d", "use_winograd_convs", "winograd_convs", "winograd_available", "ENABLED"]

# switch for the whole process: False makes every WinogradConv2d a plain convolution
ENABLED = True

_STATE = threading.local()
_AVAILABLE: Optional[bool] = None


def winograd_available() -> bool:
    """Return True when this PyTorch build has NNPACK (and initialise it)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = bool(torch._nnpack_available())  # also runs nnp_initialize
        except (AttributeError, RuntimeError):
            _AVAILABLE = False
    return _AVAILABLE


@contextmanager
def winograd_convs() -> Iterator[None]:
    """Within this context (this thread), :class:`WinogradConv2d` modules take the Winograd path where it pays."""
    before = getattr(_STATE, "on", False)
    _STATE.on = True
    try:
        yield
    finally:
        _STATE.on = before


def _worth_it(x: Tensor, weight: Tensor) -> bool:
    # NNPACK's convolution runs on one thread here while oneDNN's uses them all, so the crossover
    # moves with the thread count (measured on the 2-core AVX2 machine, 3x3, stride 1, one image):
    # one thread: at least 32 input channels and 768 pixels, and twice as many pixels as channels
    # (1.35-2.1x from there); two threads: 1.15-1.9x from 3,072 pixels at 256 channels or more,
    # 1.1-1.25x from about 13,000 pixels at 64-128 channels, a loss below; more threads: not
    # measured, and oneDNN's lead only grows, so oneDNN
    c, pixels = x.shape[1], x.shape[2] * x.shape[3]
    threads = torch.get_num_threads()
    if threads == 1:
        return c >= 32 and pixels >= max(768, 2 * c)
    if threads == 2:
        return (c >= 256 and pixels >= 3072) or (c >= 32 and pixels >= 12288)
    return False


def _gemm_worth_it(x: Tensor, weight: Tensor) -> bool:
    # measured crossover: 2.3x at 88 pixels and 1024 channels (1.45x for a training step of two
    # images), 1.2x at 221 pixels; slower from about C/2 pixels
    c = x.shape[1]
    return c >= 256 and 4 * x.shape[2] * x.shape[3] <= c


class _PerImageWinograd(torch.autograd.Function):
    """NNPACK forward one image at a time; the ordinary convolution's gradient for the batch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return torch.cat([torch._nnpack_spatial_convolution(x[i:i + 1], weight, bias, [padding, padding])
                          for i in range(x.shape[0])])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        p = ctx.padding
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return gx, gw, gb, None


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3) that runs NNPACK's Winograd convolution (stride 1) or im2col + GEMM
    where they are faster, inside :func:`winograd_convs`."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if not torch.jit.is_scripting():
            if (ENABLED and getattr(_STATE, "on", False) and not torch.jit.is_tracing()
                    and not torch.compiler.is_compiling() and input.dim() == 4 and input.device.type == "cpu"
                    and input.dtype == torch.float32 and weight.dtype == torch.float32):
                if self.stride == (1, 1) and _worth_it(input, weight) and winograd_available():
                    if bias is None:
                        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
                    x, w = input.contiguous(), weight.contiguous()
                    if x.shape[0] == 1:
                        return torch._nnpack_spatial_convolution(x, w, bias, [self.padding[0], self.padding[1]])
                    return _PerImageWinograd.apply(x, w, bias, self.padding[0])
                if _gemm_worth_it(input, weight):
                    return torch.ops.aten._slow_conv2d_forward(input.contiguous(), weight.contiguous(), [3, 3], bias,
                                                               list(self.stride), list(self.padding))
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride in ((1, 1), (2, 2))
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1])


def use_winograd_convs(module: nn.Module) -> int:
    """Switch every eligible ``nn.Conv2d`` (3x3, stride 1 or 2) under ``module`` to :class:`WinogradConv2d`, in place.

    Returns how many were switched.
    """
    winograd_available()  # initialise NNPACK where there is one
    n = 0
    for m in module.modules():
        if _eligible(m):
            m.__class__ = WinogradConv2d
            n += 1
    return n
