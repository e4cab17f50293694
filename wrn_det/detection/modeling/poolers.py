"""RoI pooling of the builtin engine: FPN level assignment and a fast RoIAlign for the CPU.

torchvision's CPU ``roi_align`` loops over RoIs, channels and bins in scalar code on one
thread, and its backward recomputes the bilinear weights of every sample for every
channel; on a CPU it takes about a quarter of a Faster R-CNN training step. Here the
sampling points of all RoIs of all levels are computed once, vectorised: their corner
rows in the channels-last feature maps and their bilinear weights. Pooling is then one
weighted ``embedding_bag`` (vectorised over the channels, threaded over the output bins)
and its gradient the transposed ``embedding_bag``. The arithmetic is torchvision's
``roi_align`` (and so detectron2's ``ROIAlign`` / ``ROIAlignV2``): the same sampling
points, the same clamping at the borders, the same adaptive grid when ``sampling_ratio``
is 0; results agree to float rounding.

On CUDA, and while tracing or scripting (export), torchvision's kernel runs instead; and
everywhere for a caller that passes ``cpu_kernel=False`` (the detector's pooler built with
``MODEL.FAST_CPU.ROI_ALIGN False``).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import _onnx_merge_levels

__all__ = ["assign_boxes_to_levels", "roi_align", "multilevel_roi_align", "boxes_to_rois", "MAX_GRID"]

# samples per bin side above which a RoI goes to torchvision's kernel (a box inside the image
# needs at most about 10 on the level the FPN rule gives it, or with a C4 trunk)
MAX_GRID = 64


def assign_boxes_to_levels(boxes: Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                           canonical_level: int = 4) -> Tensor:
    """Return the pyramid level of every XYXY box as an index from ``min_level`` (int64, (R,)).

    The FPN paper's rule as detectron2's ``assign_boxes_to_levels`` applies it: level
    ``floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))``, clamped to
    ``[min_level, max_level]`` (torchvision's ``LevelMapper`` adds its 1e-6 to the level
    instead, which moves boxes within 1e-4 pixels of a level boundary).
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lvl = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_size + 1e-8))
    return torch.clamp(lvl, min=min_level, max=max_level).to(torch.int64) - min_level


def boxes_to_rois(boxes: List[Tensor]) -> Tensor:
    """Return the boxes of all images as one (R, 5) tensor ``(image index, x1, y1, x2, y2)``."""
    if len(boxes) == 1:
        return torch.cat([torch.zeros_like(boxes[0][:, :1]), boxes[0]], dim=1)
    counts = torch.tensor([len(b) for b in boxes], device=boxes[0].device)
    index = torch.repeat_interleave(torch.arange(len(boxes), device=boxes[0].device, dtype=boxes[0].dtype), counts)
    return torch.cat([index[:, None], torch.cat(boxes, dim=0)], dim=1)


def _use_torchvision(features: Sequence[Tensor], cpu_kernel: bool) -> bool:
    if not cpu_kernel or torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return features[0].device.type != "cpu" or features[0].dtype not in (torch.float32, torch.float64, torch.bfloat16)


def _axis(start: Tensor, size: Tensor, extent: Tensor, pooled: int, grid: int) -> Tuple[Tensor, Tensor]:
    """Corner indices and bilinear weights along one axis, (R, pooled, grid, 2) each.

    ``start``/``size``: the RoI's first coordinate and length in feature pixels; ``extent``:
    the feature map's length. As torchvision: samples at ``start + p * bin + (i + .5) * bin /
    grid``; a sample beyond one pixel outside the map weighs 0, one just outside is clamped.
    """
    bin_size = size / pooled
    p = torch.arange(pooled, dtype=start.dtype)
    i = torch.arange(grid, dtype=start.dtype) + 0.5
    pos = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) \
        + i[None, None, :] * bin_size[:, None, None] / grid
    ext = extent.to(start.dtype)[:, None, None]
    valid = (pos >= -1.0) & (pos <= ext)
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    top = low >= ext - 1
    low = torch.where(top, ext - 1, low)
    pos = torch.where(top, low, pos)
    frac = pos - low
    weight = torch.stack([1.0 - frac, frac], dim=-1) * valid[..., None]
    high = torch.where(top, low, low + 1)
    return torch.stack([low, high], dim=-1).to(torch.int64), weight


class _Plan:
    """Where every output bin of a batch of RoIs reads: one bag of (row, weight) entries per bin.

    The RoIs are taken in ``order`` (grouped by sampling grid); bags are in that order.
    """

    def __init__(self, index: Tensor, weight: Tensor, bag_sizes: Tensor, order: Tensor, num_rows: int,
                 huge: Tensor):
        self.huge = huge            # RoIs left to torchvision's kernel (their bins are 0 here)
        self.index = index          # (E,) rows of the stacked channels-last features
        self.weight = weight        # (E,) bilinear weight / samples per bin
        self.bag_sizes = bag_sizes  # (R * P * P,) entries of each bin (4 per sample; 0 for an empty RoI)
        self.offsets = bag_sizes.cumsum(0) - bag_sizes
        self.order = order          # (R,) the RoI of every planned RoI
        self.num_rows = num_rows    # rows of the stacked features


def _plan(rois: Tensor, levels: Tensor, shapes: List[Tuple[int, int, int]], scales: List[float], pooled: int,
          sampling_ratio: int, aligned: bool) -> _Plan:
    """Return the :class:`_Plan` of ``rois`` (R, 5) whose level indices are ``levels`` (R,)."""
    dtype = torch.float32 if rois.dtype != torch.float64 else torch.float64
    rois = rois.to(dtype)
    level_rows = [n * h * w for n, h, w in shapes]
    level_start = torch.tensor([0] + level_rows[:-1]).cumsum(0)
    heights = torch.tensor([h for _, h, _ in shapes])[levels]
    widths = torch.tensor([w for _, _, w in shapes])[levels]
    scale = torch.tensor(scales, dtype=dtype)[levels]
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    w, h = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:  # the legacy RoIAlign makes every RoI at least one pixel
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    base = level_start[levels] + rois[:, 0].to(torch.int64) * heights * widths
    if sampling_ratio > 0:
        gh = torch.full_like(base, sampling_ratio)
        gw = gh
    else:
        # an adaptive grid of ceil(bin size) samples per side; 0 for an empty or inverted RoI (output 0)
        gh = torch.ceil(torch.nan_to_num(h, nan=0.0) / pooled).clamp(0, 1 << 15).to(torch.int64)
        gw = torch.ceil(torch.nan_to_num(w, nan=0.0) / pooled).clamp(0, 1 << 15).to(torch.int64)
    # a RoI many times the size of its map (no box inside the image is) would need a huge plan:
    # torchvision's kernel, which loops instead, takes it
    huge = torch.nonzero((gh > MAX_GRID) | (gw > MAX_GRID)).flatten()
    if huge.numel():
        gh, gw = gh.clone(), gw.clone()
        gh[huge], gw[huge] = 0, 0
    # RoIs with the same grid share one dense layout: a few vectorised ops per group, written
    # straight into the plan's arrays, group after group
    key_sorted, order = torch.sort(gh * (1 << 16) + gw, stable=True)
    keys, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    bins = pooled * pooled
    bag = (4 * gh * gw)[order]
    total = int(bag.sum()) * bins
    index = torch.empty(total, dtype=torch.int64)
    weight = torch.empty(total, dtype=dtype)
    start = end = 0
    for k, n in zip(keys.tolist(), counts.tolist()):
        sel = order[start:start + n]
        start += n
        ny, nx = k >> 16, k & 0xFFFF
        if ny * nx == 0:
            continue  # no samples: these bins stay 0, as in torchvision
        iy, wy = _axis(y1[sel], h[sel], heights[sel], pooled, ny)
        ix, wx = _axis(x1[sel], w[sel], widths[sel], pooled, nx)
        # (n, P, P, ny, 2, nx, 2): bin (ph, pw), sample (iy, ix), corner (low/high y, low/high x)
        shape = (n, pooled, pooled, ny, 2, nx, 2)
        size = n * bins * 4 * ny * nx
        rows = base[sel, None, None, None] + iy * widths[sel, None, None, None]
        torch.add(rows[:, :, None, :, :, None, None], ix[:, None, :, None, None, :, :],
                  out=index[end:end + size].view(shape))
        torch.mul(wy[:, :, None, :, :, None, None], (wx / float(ny * nx))[:, None, :, None, None, :, :],
                  out=weight[end:end + size].view(shape))
        end += size
    return _Plan(index, weight, bag.repeat_interleave(bins), order, sum(level_rows), huge)


def _stack_channels_last(features: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Return all levels' pixels as rows of one (sum N*H*W, C) matrix (one copy per level)."""
    c = features[0].shape[1]
    out = torch.empty((sum(f.shape[0] * f.shape[2] * f.shape[3] for f in features), c), dtype=dtype,
                      device=features[0].device)
    start = 0
    for f in features:
        n, _, h, w = f.shape
        out[start:start + n * h * w].view(n, h, w, c).copy_(f.permute(0, 2, 3, 1))
        start += n * h * w
    return out


def _pool(stacked: Tensor, plan: _Plan, num_rois: int, bins: int, channels_last: bool = False) -> Tensor:
    """Return the pooled features (R, C, bins); ``channels_last``: as (R, bins, C) memory."""
    c = stacked.shape[1]
    pooled = F.embedding_bag(plan.index, stacked, plan.offsets, mode="sum",
                             per_sample_weights=plan.weight.to(stacked.dtype))
    if channels_last:  # rows back in RoI order, each RoI's bins still channels-last
        inverse = torch.empty_like(plan.order)
        inverse[plan.order] = torch.arange(num_rois)
        return pooled.view(num_rois, bins * c).index_select(0, inverse).view(num_rois, bins, c).transpose(1, 2)
    # bins come out as rows of channels; a box head wants channels first
    out = stacked.new_empty((num_rois, c, bins))
    out.index_copy_(0, plan.order, pooled.view(num_rois, bins, c).transpose(1, 2))
    return out


class _RoIAlignFunction(torch.autograd.Function):
    """Autograd for the planned pooling: the gradient of the features is the transposed gather."""

    @staticmethod
    def forward(ctx, plan: _Plan, num_rois: int, bins: int, *features: Tensor) -> Tensor:
        stacked = _stack_channels_last(features, _compute_dtype(features[0].dtype))
        ctx.plan = plan
        ctx.shapes = [f.shape for f in features]
        ctx.dtypes = [f.dtype for f in features]
        return _pool(stacked, plan, num_rois, bins)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        plan = ctx.plan
        r, c, bins = grad.shape
        grad_rows = torch.index_select(grad.transpose(1, 2), 0, plan.order)  # (R, bins, C), planned order
        entry_bins = torch.repeat_interleave(torch.arange(r * bins), plan.bag_sizes, output_size=len(plan.index))
        # group the entries by the feature row they read (int32 keys sort faster)
        _, by_row = torch.sort(plan.index.to(torch.int32))
        counts = torch.bincount(plan.index, minlength=plan.num_rows)
        # feature row i receives the sum of weight * grad[bin] over the entries that read i
        stacked = F.embedding_bag(entry_bins[by_row], grad_rows.view(r * bins, c), counts.cumsum(0) - counts,
                                  mode="sum", per_sample_weights=plan.weight[by_row].to(grad.dtype))
        grads, start = [], 0
        for (n, _, h, w), dtype in zip(ctx.shapes, ctx.dtypes):
            grads.append(stacked[start:start + n * h * w].view(n, h, w, c).permute(0, 3, 1, 2).to(dtype))
            start += n * h * w
        return (None, None, None, *grads)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bfloat16 maps (CPU autocast) are pooled in float32, as torchvision's autocast wrapper does
    return torch.float32 if dtype == torch.bfloat16 else dtype


def multilevel_roi_align(features: List[Tensor], rois: Tensor, levels: Optional[Tensor], scales: List[float],
                         output_size: int, sampling_ratio: int, aligned: bool, channels_last: bool = False,
                         cpu_kernel: bool = True) -> Tensor:
    """Return RoIAlign features (R, C, output_size, output_size) of ``rois`` (R, 5), in their order.

    ``levels``: the feature map of every RoI (index into ``features``; None for one map);
    ``scales``: 1 / stride of every map. ``aligned`` True is ROIAlignV2 (half-pixel offset).
    ``channels_last``: without gradients on the CPU, return the tensor in channels-last memory
    (the CPU kernel's own layout, saving a transposing copy); same values. ``cpu_kernel``
    False: torchvision's ``roi_align`` for every level, on every device.
    """
    r, c = rois.shape[0], features[0].shape[1]
    if levels is None:
        levels = torch.zeros(r, dtype=torch.int64, device=rois.device)
    if _use_torchvision(features, cpu_kernel):
        return _torchvision_multilevel(features, rois, levels, scales, output_size, sampling_ratio, aligned)
    out_dtype = features[0].dtype
    if r == 0:
        return features[0].new_zeros((0, c, output_size, output_size))
    with torch.no_grad():
        plan = _plan(rois.detach().cpu(), levels.cpu(), [(f.shape[0], f.shape[2], f.shape[3]) for f in features],
                     scales, output_size, sampling_ratio, aligned)
    bins = output_size * output_size
    if torch.is_grad_enabled() and any(f.requires_grad for f in features):
        out = _RoIAlignFunction.apply(plan, r, bins, *features)
    else:
        out = _pool(_stack_channels_last(features, _compute_dtype(out_dtype)), plan, r, bins, channels_last)
    out = out.reshape(r, c, output_size, output_size).to(out_dtype)
    if plan.huge.numel():
        huge = plan.huge.to(rois.device)
        out = out.index_put((huge,), _torchvision_multilevel(features, rois[huge], levels[huge], scales, output_size,
                                                             sampling_ratio, aligned).to(out_dtype))
    return out


def _torchvision_multilevel(features: List[Tensor], rois: Tensor, levels: Tensor, scales: List[float],
                            output_size: int, sampling_ratio: int, aligned: bool) -> Tensor:
    if len(features) == 1:
        return tv_roi_align(features[0], rois, output_size, scales[0], sampling_ratio, aligned)
    if torch.jit.is_tracing():
        # exporting (ONNX, TorchScript): no data-dependent branch; merge the levels as torchvision's pooler does
        pooled = [tv_roi_align(feat, rois[torch.where(levels == level)[0]], output_size, scale, sampling_ratio, aligned)
                  for level, (feat, scale) in enumerate(zip(features, scales))]
        return _onnx_merge_levels(levels, pooled)
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], output_size, output_size))
    for level, (feat, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == level)[0]
        out[idx] = tv_roi_align(feat, rois[idx], output_size, scale, sampling_ratio, aligned).to(out.dtype)
    return out


def roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """Return ``torchvision.ops.roi_align(features, rois, ...)`` (square output), computed as this module does.

    ``rois``: (R, 5) ``(image index, x1, y1, x2, y2)`` in image pixels.
    """
    return multilevel_roi_align([features], rois, None, [spatial_scale], output_size, sampling_ratio, aligned)
