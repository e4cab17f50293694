"""Batch iterators for classification training and evaluation, one shard per rank.

* :class:`InMemoryLoader` keeps a whole 32x32 set on the training device and makes
  each batch with one gather: random crop from the image reflection-padded by 4
  pixels and a random horizontal flip, for the whole batch at once (no PIL, no
  workers). This is how the small sets are fed fast on a GPU.
* :func:`build_imagenet_loader` wraps torchvision's ``ImageFolder`` in a
  ``DataLoader`` with workers; :func:`imagenet_transforms`: RandomResizedCrop + flip
  (+ fb.resnet.torch's colour jitter and PCA lighting) for training, Resize +
  CenterCrop for testing.

Both yield raw images (``uint8``; float32 after ZCA, and on the 0-255 scale after ImageNet's
colour augmentation) and ``int64`` labels; the trainer normalises on the device. The order and the augmentation of an epoch depend
only on ``(seed, epoch)``, never on earlier epochs, so a resumed run sees exactly the
batches the uninterrupted run would have seen, and ``world_size`` processes with
``global_batch / world_size`` images each see together the same global batches as
one process.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms as T
from torchvision.transforms import v2

from wrn_det.engine.comm import local_batch_size
from wrn_det.engine.errors import ConfigError

from . import decode
from .classification import ArraySet

__all__ = ["epoch_generator", "reflect_crop_flip", "InMemoryLoader", "ShardSampler", "EpochDataLoader",
           "build_imagenet_loader", "imagenet_transforms", "Lighting",
           "IMAGENET_PCA_EIGVAL", "IMAGENET_PCA_EIGVEC"]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """Return a CPU generator seeded from ``(seed, epoch, stream)`` alone."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) % (2**63)
    return torch.Generator().manual_seed(mixed)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    # padded coordinate -> source coordinate with edge-excluding reflection (as F.pad 'reflect'); needs pad < n
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def reflect_crop_flip(images: torch.Tensor, idx: torch.Tensor, offsets: Optional[torch.Tensor],
                      flips: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    """Return a batch of crops of ``images[idx]``, the images padded by reflection.

    ``images``: (N, C, H, W); ``idx``: (B,) rows to take; ``offsets``: (B, 2) top-left
    corners (y, x) in the padded image, in ``[0, 2 * pad]``, or None for no crop;
    ``flips``: (B,) bools for a horizontal flip, or None. The result (B, C, H, W) equals
    ``F.pad(x, [pad] * 4, mode="reflect")`` cropped back to H x W and flipped, done for
    the whole batch with a single gather and no padded copy. Its memory is laid out
    channels-last, which is what convolutions on a GPU prefer.
    """
    n, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(idx.numel(), h)
    cols = torch.arange(w, device=dev).expand(idx.numel(), w)
    if offsets is not None and pad > 0:
        rows = _reflect(rows + offsets[:, :1] - pad, h)
        cols = _reflect(cols + offsets[:, 1:] - pad, w)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    # advanced indices on dims 0, 2, 3 around a slice: the result is (B, H, W, C)
    out = images[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class InMemoryLoader:
    """Iterate over an :class:`ArraySet` held on ``device``, in this rank's share of each global batch.

    Training (``train=True``): every epoch a permutation and per-image crop offsets and
    flips are drawn from :func:`epoch_generator`; the incomplete last global batch is
    dropped (as the original code did); rank ``r`` takes images ``r*b .. (r+1)*b - 1`` of
    each global batch of ``world_size * b``. Evaluation: images ``r, r + W, r + 2W, ...``
    in order, each exactly once. Iterating yields ``(images, labels)`` on ``device``.
    """

    def __init__(self, data: ArraySet, global_batch: int, device, train: bool, crop_padding: int = 4,
                 hflip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.train = train
        self.device = torch.device(device)
        self.pad = int(crop_padding) if train else 0
        self.hflip = bool(hflip) and train
        h, w = self.images.shape[-2:]
        if self.pad < 0 or self.pad >= min(h, w):
            raise ConfigError(f"INPUT.CROP_PADDING must be in [0, {min(h, w) - 1}] for {h}x{w} images, got {crop_padding}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        key = "SOLVER.IMS_PER_BATCH" if train else "TEST.IMS_PER_BATCH"
        self.global_batch = global_batch
        self.batch = local_batch_size(global_batch, world_size, key)
        if train and len(data) < global_batch:
            raise ConfigError(f"{key} ({global_batch}) is larger than the training set ({len(data)} images)")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration uses, from batch ``start_batch`` on."""
        self.epoch, self.start = int(epoch), int(start_batch)

    @property
    def num_images(self) -> int:
        """Return the number of images of the whole set (all ranks)."""
        return int(self.labels.numel())

    def __len__(self) -> int:
        """Return the number of batches this rank yields per epoch."""
        n = self.num_images
        if self.train:
            return n // self.global_batch
        mine = len(range(self.rank, n, self.world_size))
        return -(-mine // self.batch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_images
        if not self.train:
            order = torch.arange(self.rank, n, self.world_size, device=self.device)
            for i in range(0, order.numel(), self.batch):
                idx = order[i:i + self.batch]
                yield self.images[idx], self.labels[idx]
            return
        g = epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g) if self.pad else None
        flips = torch.randint(0, 2, (n,), generator=g).bool() if self.hflip else None
        perm = perm.to(self.device)
        offsets = offsets.to(self.device) if offsets is not None else None
        flips = flips.to(self.device) if flips is not None else None
        for i in range(self.start, len(self)):
            start = i * self.global_batch + self.rank * self.batch
            sl = slice(start, start + self.batch)
            idx = perm[sl]
            x = reflect_crop_flip(
                self.images, idx, offsets[sl] if offsets is not None else None,
                flips[sl] if flips is not None else None, self.pad,
            )
            yield x, self.labels[idx]


class ShardSampler(Sampler):
    """Indices of this rank's share of a dataset, with the same split rule as :class:`InMemoryLoader`.

    ``shuffle=True``: an epoch permutation from :func:`epoch_generator`, cut into global
    batches (the incomplete last one dropped), of which this rank takes its contiguous
    ``global_batch / world_size`` slice. ``shuffle=False``: ``rank, rank + W, ...``.
    """

    def __init__(self, size: int, global_batch: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.global_batch, self.shuffle = int(size), int(global_batch), bool(shuffle)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch = local_batch_size(global_batch, world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose permutation the next iteration uses, from this rank's batch ``start_batch`` on."""
        self.epoch, self.start = int(epoch), int(start_batch)

    def __len__(self) -> int:
        if self.shuffle:
            return (self.size // self.global_batch) * self.batch
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.rank, self.size, self.world_size))
        perm = torch.randperm(self.size, generator=epoch_generator(self.seed, self.epoch))
        nb = self.size // self.global_batch
        mine = perm[: nb * self.global_batch].view(nb, self.world_size, self.batch)[self.start:, self.rank]
        return iter(mine.reshape(-1).tolist())


class EpochDataLoader:
    """A ``DataLoader`` whose order and worker random streams are set by ``set_epoch``.

    Worker augmentations draw from seeds derived from ``(seed, epoch, rank)``, so an
    epoch is reproduced exactly after a resume. (Without workers the transforms draw
    from the main process's torch generator, whose state the checkpoints also keep.)
    Iterating yields ``(images, labels)``.
    """

    def __init__(self, dataset, sampler: ShardSampler, batch_size: int, num_workers: int, seed: int, rank: int,
                 drop_last: bool, pin_memory: bool, collate_fn=None):
        self.sampler = sampler
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
            pin_memory=pin_memory, generator=self.generator, persistent_workers=False, collate_fn=collate_fn,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration uses, from batch ``start_batch`` on.

        A continued epoch has the uninterrupted one's images; with workers, their random
        augmentation of the rest of the epoch is drawn anew.
        """
        self.sampler.set_epoch(epoch, start_batch)
        self.generator.manual_seed(int(epoch_generator(self.seed, epoch, 1 + self.rank).initial_seed()))

    @property
    def num_images(self) -> int:
        """Return the number of images of the whole set (all ranks)."""
        return self.sampler.size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


#: PCA of ImageNet's RGB pixel values on the [0, 1] scale, from fb.resnet.torch
#: (``datasets/imagenet.lua``, "computed from random subset of ImageNet training images"),
#: the code the authors trained WRN-50-2 with. Column j of the eigenvectors goes with eigenvalue j.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(torch.nn.Module):
    """AlexNet-style PCA lighting noise, as fb.resnet.torch's ``Lighting(alphastd, eigval, eigvec)``.

    Each call draws ``alpha ~ N(0, alphastd^2)`` (three values, from torch's generator, so
    the loader's per-epoch worker seeds make it reproducible) and adds
    ``eigvec @ (alpha * eigval)`` to the three channels of a float RGB image (3, H, W) on
    the [0, 1] scale; nothing is clamped, as in the original. Calling it returns the new image.
    """

    def __init__(self, alphastd: float, eigval=IMAGENET_PCA_EIGVAL, eigvec=IMAGENET_PCA_EIGVEC):
        super().__init__()
        self.alphastd = float(alphastd)
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Return ``img`` plus one random colour shift along the principal components."""
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.to(img.device, img.dtype).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


def imagenet_transforms(train_size: int = 224, test_resize: int = 256, test_size: int = 224,
                        color_jitter=(0.0, 0.0, 0.0), lighting_std: float = 0.0):
    """Return ``(train, test)`` transforms of PIL images (normalised later, on the device).

    Training: RandomResizedCrop(``train_size``) and a horizontal flip; with
    ``color_jitter = (brightness, contrast, saturation)`` not all 0, torchvision's v2
    ``ColorJitter`` with those strengths (factors drawn from [1 - s, 1 + s], the three in a
    random order, as fb.resnet.torch's ``ColorJitter``); with ``lighting_std`` > 0,
    :class:`Lighting` with ImageNet's eigenvalues and eigenvectors. fb.resnet.torch's
    ImageNet recipe is ``(0.4, 0.4, 0.4)`` and ``0.1``. Both work on the [0, 1] scale
    (v2's jitter clamps to it, the original's did not), and the image is then put back
    on the 0-255 scale as a float32 tensor; without them it stays ``uint8``. Testing:
    Resize(``test_resize``), CenterCrop(``test_size``), ``uint8``. Raises ConfigError
    for a negative strength.
    """
    jitter = [float(v) for v in color_jitter]
    if len(jitter) != 3 or any(v < 0 for v in jitter):
        raise ConfigError(f"INPUT.COLOR_JITTER must be three numbers >= 0 (brightness, contrast, saturation), "
                          f"got {list(color_jitter)}")
    if lighting_std < 0:
        raise ConfigError(f"INPUT.LIGHTING_STD must be >= 0, got {lighting_std}")
    steps = [v2.RandomResizedCrop(train_size, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()]
    if any(jitter) or lighting_std > 0:
        steps.append(v2.ToDtype(torch.float32, scale=True))  # [0, 1], the scale both were defined on
        if any(jitter):
            steps.append(v2.ColorJitter(brightness=jitter[0] or None, contrast=jitter[1] or None,
                                        saturation=jitter[2] or None))
        if lighting_std > 0:
            steps.append(Lighting(lighting_std))
        # back to the 0-255 scale of INPUT.PIXEL_MEAN / PIXEL_STD: x / (1/255)
        steps.append(v2.Normalize(mean=[0.0, 0.0, 0.0], std=[1 / 255.0] * 3))
    train = v2.Compose(steps)
    test = T.Compose([T.Resize(test_resize), T.CenterCrop(test_size), T.PILToTensor()])
    return train, test


def build_imagenet_loader(dataset, global_batch: int, train: bool, num_workers: int, seed: int, rank: int,
                          world_size: int, pin_memory: bool = False):
    """Return an :class:`EpochDataLoader` over ``dataset`` for this rank (shuffled and sharded when ``train``)."""
    key = "SOLVER.IMS_PER_BATCH" if train else "TEST.IMS_PER_BATCH"
    batch = local_batch_size(global_batch, world_size, key)
    sampler = ShardSampler(len(dataset), global_batch, train, seed, rank, world_size)
    # DATALOADER.DECODE cuda: the workers hand over JPEG bytes and crop boxes, decoded batch-wise on the GPU
    crops = isinstance(getattr(dataset, "transform", None), decode.CropTransform)
    loader = EpochDataLoader(dataset, sampler, batch, num_workers, seed, rank, drop_last=train, pin_memory=pin_memory,
                             collate_fn=decode.collate_crops if crops else None)
    return decode.wrap_gpu_decode(dataset, loader)
