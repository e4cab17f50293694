"""Input preprocessing of the paper: mean/std, /255, and GCN + ZCA whitening.

mean/std and /255 are per-channel affine maps, applied on the training device to each
batch after augmentation (:class:`Normalizer`); the dataset stays ``uint8``.

ZCA whitening follows the pylearn2 script the original authors used
(``make_cifar10_gcn_whitened.py``): global contrast normalisation of every image
(subtract its mean, scale its L2 norm to 55), then ZCA with a filter bias of 0.1,
fitted on the training set. The fit is cached beside the data so it is computed once;
the whitened images are float32 and are augmented (crop, flip) after whitening, as
the original code did with its pre-whitened files.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from wrn_det.engine.checkpoint import load_checkpoint
from wrn_det.engine.fileio import atomic_save
from wrn_det.engine.errors import ConfigError, WrnDetError

from .classification import ArraySet

__all__ = ["PREPROCESS_MODES", "Normalizer", "global_contrast_normalize", "fit_zca", "zca_whiten", "normalizer_from_cfg"]

logger = logging.getLogger("wrn_det.data")

#: Values accepted by ``INPUT.PREPROCESS``.
PREPROCESS_MODES = ("meanstd", "zca", "div255")


class Normalizer(nn.Module):
    """Map a batch of raw images to the network's input: ``(x - mean) / std`` per channel.

    A single-channel batch (MNIST) is repeated to ``out_channels`` channels after
    normalisation. Calling it returns a float32 tensor in ``memory_format``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], out_channels: int = 3,
                 memory_format=torch.contiguous_format):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"INPUT.PIXEL_MEAN {list(mean)} and INPUT.PIXEL_STD {list(std)} must have one value per channel, std > 0")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.out_channels = out_channels
        self.memory_format = memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the normalised float32 batch (N, out_channels, H, W)."""
        if x.shape[1] != self.mean.shape[1]:
            raise WrnDetError(
                f"images have {x.shape[1]} channels but INPUT.PIXEL_MEAN has {self.mean.shape[1]} values"
            )
        x = (x.float() - self.mean) * self.inv_std
        if x.shape[1] == 1 and self.out_channels != 1:
            x = x.expand(-1, self.out_channels, -1, -1)
        return x.contiguous(memory_format=self.memory_format)


def normalizer_from_cfg(cfg, num_channels: int, out_channels: int = 3, memory_format=torch.contiguous_format) -> Normalizer:
    """Return the :class:`Normalizer` for ``INPUT.PREPROCESS``.

    ``meanstd`` uses ``INPUT.PIXEL_MEAN``/``PIXEL_STD`` (0-255 scale); ``div255`` maps
    pixels to [0, 1]; ``zca`` data are already whitened, so it is the identity.
    """
    mode = cfg.INPUT.PREPROCESS
    if mode not in PREPROCESS_MODES:
        raise ConfigError(f"INPUT.PREPROCESS must be one of {', '.join(PREPROCESS_MODES)}, got {mode!r}")
    if mode == "meanstd":
        mean, std = list(cfg.INPUT.PIXEL_MEAN), list(cfg.INPUT.PIXEL_STD)
        if len(mean) != num_channels:
            raise ConfigError(
                f"INPUT.PIXEL_MEAN has {len(mean)} values but {cfg.DATASETS.NAME} images have {num_channels} channels"
            )
    elif mode == "div255":
        mean, std = [0.0] * num_channels, [255.0] * num_channels
    else:
        mean, std = [0.0] * num_channels, [1.0] * num_channels
    return Normalizer(mean, std, out_channels, memory_format)


def global_contrast_normalize(x: torch.Tensor, scale: float = 55.0, min_divisor: float = 1e-8) -> torch.Tensor:
    """Return ``x`` (N, D) with each row centred and rescaled to L2 norm ``scale``.

    Rows whose norm is below ``min_divisor`` (constant images) are only centred.
    """
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True) / scale
    norm = torch.where(norm < min_divisor, torch.ones_like(norm), norm)
    return x / norm


def fit_zca(x: torch.Tensor, filter_bias: float = 0.1, chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fit ZCA whitening on rows of ``x`` (N, D); returns ``(mean (D,), W (D, D))``.

    ``(x - mean) @ W`` is whitened: the covariance's eigenvalues ``l`` become
    ``l / (l + filter_bias)``. The covariance is accumulated in float64 by chunks, so
    memory stays at one chunk plus a D x D matrix. With fewer rows than columns (a small
    subset) the covariance has rank below N and ``W`` comes exactly from the thin SVD of the
    centred rows: ``b^-1/2`` outside their span, ``(s^2/N + b)^-1/2`` along it (an N x D
    decomposition instead of D x D: for CIFAR, D = 3072).
    """
    x = x.to(torch.float64)
    n, d = x.shape
    mean = x.mean(dim=0)
    if n < d:
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        inv_b = filter_bias ** -0.5
        w = (vh.T * ((s.square() / n + filter_bias).rsqrt() - inv_b)) @ vh
        w.diagonal().add_(inv_b)
        return mean.float(), w.float()
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        xc = x[i:i + chunk] - mean
        cov.addmm_(xc.T, xc)
    cov /= n
    evals, evecs = torch.linalg.eigh(cov)
    # tiny negative eigenvalues are rounding noise of a PSD matrix
    scale = (evals.clamp(min=0) + filter_bias).rsqrt()
    w = (evecs * scale) @ evecs.T
    return mean.float(), w.float()


def _apply(images: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, gcn_scale: float, device, chunk: int = 4096) -> torch.Tensor:
    """Return GCN + ZCA of uint8 ``images`` (N, C, H, W) as float32 on the CPU, same shape."""
    n = images.shape[0]
    out = torch.empty(images.shape, dtype=torch.float32)
    mean, w = mean.to(device), w.to(device)
    for i in range(0, n, chunk):
        x = images[i:i + chunk].to(device).reshape(min(chunk, n - i), -1).double()
        x = global_contrast_normalize(x, gcn_scale).float()
        out[i:i + chunk] = ((x - mean) @ w).reshape(-1, *images.shape[1:]).cpu()
    return out


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha1()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def zca_whiten(train: ArraySet, test: ArraySet, gcn_scale: float = 55.0, filter_bias: float = 0.1,
               cache_dir: Optional[str] = None, device="cpu") -> Tuple[ArraySet, ArraySet]:
    """Return copies of ``train`` and ``test`` with GCN + ZCA-whitened float32 images.

    The whitening is fitted on ``train`` only. The fit is saved in ``cache_dir``
    (default: the training data's folder) as ``zca_<hash of the training images>.pt``
    and reused when the same training images are whitened again; a folder that cannot
    be written only costs a refit next time.
    """
    cache_dir = cache_dir or train.source
    key = _digest(train.images)
    path = os.path.join(cache_dir, f"zca_gcn{gcn_scale:g}_bias{filter_bias:g}_{key}.pt")
    fit = None
    if os.path.isfile(path):
        try:
            fit = load_checkpoint(path)
            logger.info("ZCA whitening loaded from %s", path)
        except WrnDetError as e:
            logger.warning("ignoring the unreadable ZCA cache (%s); fitting again", e)
    if fit is None:
        logger.info("fitting GCN + ZCA whitening on %d training images", len(train))
        flat = train.images.reshape(len(train), -1).to(device).double()
        mean, w = fit_zca(global_contrast_normalize(flat, gcn_scale), filter_bias)
        fit = {"mean": mean.cpu(), "W": w.cpu(), "gcn_scale": gcn_scale, "filter_bias": filter_bias}
        del flat
        try:
            atomic_save(fit, path)
            logger.info("ZCA whitening cached in %s", path)
        except OSError as e:
            logger.warning("could not cache the ZCA fit in %s (%s); it will be fitted again next time", cache_dir, e)
    out = []
    for s in (train, test):
        out.append(ArraySet(_apply(s.images, fit["mean"], fit["W"], gcn_scale, device), s.labels, s.classes, s.source,
                            {**s.extra, "zca_cache": path}))
    return out[0], out[1]
