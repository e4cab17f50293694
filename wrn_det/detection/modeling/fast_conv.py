"""Faster convolutions for the builtin detectors on the CPU: Winograd (NNPACK), packed oneDNN weights, GEMM.

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
2e-6), as cuDNN's Winograd kernels give on a GPU. In training, the gradient of such a
convolution's input is itself a stride-1 3x3 convolution (of the output gradient, with the
kernel flipped and its channels swapped) and takes the same path (2x faster than oneDNN's
at 100x136 and 256 channels, batch of two, two threads); the weight's gradient stays oneDNN's.

In inference, oneDNN spends part of every call reordering the weight into its blocked
layout (38 MB for a 1024-channel 3x3 kernel: 2.5x the convolution itself at 8x11 pixels;
10% at 16x22 and 512 channels). Without gradients, such a convolution (a kernel of at least
twelve times the elements of one image's input: :func:`_pack_worth_it`) that comes again with
the same input shape runs on a weight kept in that layout (:class:`_PackedWeights`; at most
:data:`PACKED_WEIGHT_BYTES`), with oneDNN's rounding (relative 1e-6). Images of one size
after another (a video, a benchmark, a resized dataset) gain; a stream where no two images
share a padded size runs the plain calls.

For training, a small map with many channels (res5 of a WRN-34-2 on a 256-pixel image:
1024 channels on 8x11 pixels) runs as im2col and one MKL matrix product per image
(PyTorch's ``_slow_conv2d_forward``, whose gradient is its own im2col products; 1.45x for
a training step of two, measured as above), with the direct convolution's rounding. It is
taken for maps of at most a quarter as many pixels as channels.

A network is built with :class:`FastConv2d` as its convolution class (the ``conv_layer``
argument of the ``wrn_det.models`` networks and of the builtin detector's FPN and heads):
the builtin detector's builders choose it from ``MODEL.FAST_CPU.CONV`` and
``MODEL.FAST_CPU.PACK_WEIGHTS`` (:func:`wrn_det.detection.modeling.base.get_conv_layer`).
A ``FastConv2d`` has ``nn.Conv2d``'s parameters, names, state-dict keys and initial weights
(the same random draws), and computes exactly what ``nn.Conv2d`` computes unless it runs
inside :func:`fast_convs`, which the builtin detectors' ``forward`` enters. Inside it,
float32 CPU inputs of zero-padded convolutions take the paths above where they pay.

Why the context, when the class is already chosen at construction: a detector's pieces are
also run on their own, and there they must be ``nn.Conv2d`` to the last bit. The exporter
(:mod:`wrn_det.detection.export`) runs the backbone, RPN and heads itself and compares that
eager run with its trace (which sees plain convolutions) within a thousandth of a pixel; a
backbone taken out of a trained detector computes the classification network's numbers.
Only the detector's own ``forward`` takes the faster paths. Tracing, scripting and
compilation see a plain convolution, so export is unaffected. detectron2's engine builds
its WRN backbones with ``nn.Conv2d`` (:mod:`wrn_det.d2.backbone`).
"""
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["FastConv2d", "fast_convs", "winograd_available", "packing_available", "clear_packed_weights",
           "PACKED_WEIGHT_BYTES"]

# most bytes of packed convolution weights kept at once (inference on the CPU; a WRN-34-2-FPN
# detector packs 304 MiB of weights at 256x341, none at 800x1066)
PACKED_WEIGHT_BYTES = 1 << 30

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
def fast_convs() -> Iterator[None]:
    """Within this context (this thread), :class:`FastConv2d` modules take their faster paths where they pay.

    The builtin detectors' ``forward`` enters it; outside it a ``FastConv2d`` is ``nn.Conv2d``
    (see the module docstring for why). Yields nothing.
    """
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


def _pack_worth_it(x: Tensor, weight: Tensor) -> bool:
    # a packed weight pays where reordering it is a large part of the call: a kernel of at least
    # twelve times the elements of one image's input (measured on the 2-core AVX2 machine, two
    # threads, one image: 2.5x at 8x11 pixels and 1024 channels, 1.5x for the stride-2 3x3 from 512
    # channels at 16x22, 1.1x at 16x22 and 512 channels (13x); even at 25x34 and 1024 channels
    # (10.8x), slower below)
    return x.shape[0] > 0 and weight.numel() >= 12 * x[0].numel()  # an empty batch (no RoI) has no x[0]


def _gemm_worth_it(x: Tensor, weight: Tensor) -> bool:
    # measured crossover: 2.3x at 88 pixels and 1024 channels (1.45x for a training step of two
    # images), 1.2x at 221 pixels; slower from about C/2 pixels
    c = x.shape[1]
    return c >= 256 and 4 * x.shape[2] * x.shape[3] <= c


class _PerImageWinograd(torch.autograd.Function):
    """NNPACK forward one image at a time; the gradient of the input as NNPACK's convolution of the
    output gradient with the flipped, transposed kernel (where it pays), the weight's and bias's
    as the ordinary convolution's, for the whole batch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return _nnpack_per_image(x, weight, bias, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        p = ctx.padding
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        gx = None
        if need_x and p <= 2 and _worth_it(grad, weight):
            # d(input) of a stride-1 3x3 convolution with padding p: the output gradient convolved
            # with the kernel flipped in space, input and output channels swapped, padding 2 - p
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
            gx = _nnpack_per_image(grad, flipped, grad.new_zeros(flipped.shape[0]), 2 - p)
        gx_aten, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
            [need_x and gx is None, need_w, need_b])
        return gx if gx is not None else gx_aten, gw, gb, None


def _nnpack_per_image(x: Tensor, weight: Tensor, bias: Tensor, padding: int) -> Tensor:
    # NNPACK's inference algorithm, one image at a time (its batch algorithm is slower than oneDNN)
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, [padding, padding])
    return torch.cat([torch._nnpack_spatial_convolution(x[i:i + 1], weight, bias, [padding, padding])
                      for i in range(x.shape[0])])


class _PackedWeights:
    """Process-wide cache of convolution weights in oneDNN's own layout, least recently used first out.

    oneDNN reorders a plain weight into its blocked layout on every call; for a small map
    with many channels that is most of the call (38 MB for a 1024-channel 3x3 kernel, 3x the
    convolution at 8x11 pixels). The layout oneDNN picks depends on the input's shape, and a
    weight packed for another shape is reordered again (slower than a plain call), so an
    entry is made the second time a (weight, input shape) comes, and holds for that shape.
    At most :data:`PACKED_WEIGHT_BYTES` are kept. An entry is found only while the weight is
    the same tensor at the same version: an optimizer step or ``load_state_dict`` (in-place
    writes) makes every entry of that weight stale; stale entries and those of freed weights
    are dropped when the next entry is made, or by :func:`clear_packed_weights`.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: "OrderedDict[tuple, Tuple[weakref.ref, Tensor, int]]" = OrderedDict()
        self.seen: "OrderedDict[tuple, bool]" = OrderedDict()  # False: oneDNN refused to pack it
        self.bytes = 0

    def get(self, conv: nn.Conv2d, x: Tensor, weight: Tensor) -> Optional[Tensor]:
        """Return ``weight`` packed for ``x``'s shape, or None (this shape's first call, or packing unavailable)."""
        key = (id(weight), weight._version, tuple(x.shape), conv.stride, conv.padding, conv.dilation, conv.groups)
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None and hit[0]() is weight:
                self.entries.move_to_end(key)
                return hit[1]
            if hit is not None:  # a freed weight's id, reused
                self._drop(key)
            state = self.seen.get(key)
            if state is None:  # first call with this shape: the plain convolution
                self.seen[key] = True
                if len(self.seen) > 4096:
                    self.seen.popitem(last=False)
                return None
            if state is False:  # oneDNN could not pack it
                return None
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().contiguous().to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, list(x.shape))
        except RuntimeError:  # a convolution oneDNN does not pack: the plain call, from now on
            with self.lock:
                self.seen[key] = False
            return None
        nbytes = weight.numel() * weight.element_size()
        with self.lock:
            self.seen.pop(key, None)
            # entries that can never be found again: this weight's older versions (before an optimizer
            # step or a load), and freed weights' (a deleted model's)
            stale = [k for k, e in self.entries.items() if (k[0] == key[0] and k[1] != key[1]) or e[0]() is None]
            for old in stale:
                self._drop(old)
            self.entries[key] = (weakref.ref(weight), packed, nbytes)
            self.bytes += nbytes
            while self.bytes > PACKED_WEIGHT_BYTES and self.entries:
                self._drop(next(iter(self.entries)))
        return packed

    def _drop(self, key) -> None:
        self.bytes -= self.entries.pop(key)[2]

    def clear(self) -> None:
        """Forget every packed weight."""
        with self.lock:
            self.entries.clear()
            self.seen.clear()
            self.bytes = 0


_PACKED = _PackedWeights()
_PACKING: Optional[bool] = None


def packing_available() -> bool:
    """Return True when this PyTorch build runs oneDNN convolutions on packed weights."""
    global _PACKING
    if _PACKING is None:
        _PACKING = bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                        and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))
    return _PACKING


def clear_packed_weights() -> None:
    """Free the memory of every packed weight (they are made again as images come)."""
    _PACKED.clear()


class FastConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that, inside :func:`fast_convs`, runs NNPACK's Winograd convolution (3x3,
    stride 1), oneDNN on packed weights (inference) or im2col + GEMM where they are faster.

    Takes ``nn.Conv2d``'s arguments, plus ``pack_weights``: False leaves inference to plain
    oneDNN calls instead of packed weights (the other paths stay). The faster paths are taken
    for zero padding, the same on both sides (every convolution of the project's networks);
    any other padding is always ``nn.Conv2d``'s computation. Calling it returns the convolution.
    """

    def __init__(self, *args, pack_weights: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.pack_weights = bool(pack_weights)
        # the fast paths take one symmetric zero padding (F.pad-based modes and "same" strings do not fit)
        self.fast_paths = (self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                           and self.padding[0] == self.padding[1])
        winograd_available()  # initialise NNPACK where there is one, when the network is built

    def extra_repr(self) -> str:
        """Return ``nn.Conv2d``'s description, plus ``pack_weights=False`` when set."""
        return super().extra_repr() + ("" if self.pack_weights else ", pack_weights=False")

    def forward(self, input: Tensor) -> Tensor:
        """Return the convolution of ``input`` (the faster paths inside :func:`fast_convs`, where they pay)."""
        if not torch.jit.is_scripting():
            out = self._fast_forward(input)
            if out is not None:
                return out
        return self._conv_forward(input, self.weight, self.bias)

    def _fast_forward(self, input: Tensor) -> Optional[Tensor]:
        """Return the convolution by a faster path, or None where ``nn.Conv2d``'s is taken."""
        weight, bias = self.weight, self.bias
        if not (self.fast_paths and getattr(_STATE, "on", False) and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and input.dim() == 4 and input.device.type == "cpu"
                and input.dtype == torch.float32 and weight.dtype == torch.float32):
            return None
        grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
        k3 = self.kernel_size == (3, 3) and self.dilation == (1, 1) and self.groups == 1
        if k3 and self.stride == (1, 1) and _worth_it(input, weight) and winograd_available():
            if bias is None:
                bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
            x, w = input.contiguous(), weight.contiguous()
            if not grad:
                return _nnpack_per_image(x, w, bias, self.padding[0])
            return _PerImageWinograd.apply(x, w, bias, self.padding[0])
        # packed weights in inference only (not for the frozen layers of a model in training:
        # their channels-last outputs slow the layers that train)
        if self.pack_weights and not torch.is_grad_enabled() and _pack_worth_it(input, weight) \
                and packing_available():
            packed = _PACKED.get(self, input, weight)
            if packed is not None:
                out = torch.ops.mkldnn._convolution_pointwise(
                    input, packed, bias, list(self.padding), list(self.stride), list(self.dilation),
                    self.groups, "none", [], "")
                # oneDNN writes channels-last; a small map goes back to the input's layout
                return out.contiguous() if input.is_contiguous() else out
        if k3 and _gemm_worth_it(input, weight):
            return torch.ops.aten._slow_conv2d_forward(input.contiguous(), weight.contiguous(), [3, 3], bias,
                                                       list(self.stride), list(self.padding))
        return None
