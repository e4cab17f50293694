"""Image decoding for the data loaders: one place for the choice of JPEG decoder.

``DATALOADER.DECODE`` selects it (detection and classification configs):

* ``torchvision`` (detection default): ``torchvision.io.decode_jpeg`` (libjpeg-turbo),
  which returns the (3, H, W) RGB tensor the model takes; other formats go through
  ``torchvision.io.decode_image`` and, failing that, OpenCV. As fast as OpenCV's decoder
  and it skips the copy from OpenCV's (H, W, 3) BGR array to (3, H, W). (torchvision 0.29
  deprecates its image decoders in favour of TorchCodec; without them this reads with OpenCV.)
* ``cv2``: ``cv2.imread`` (the builtin engine's reader before this option existed); same pixels.
* ``pil``: Pillow (classification default: torchvision's ``ImageFolder`` loader, the PIL
  transforms of the ImageNet recipe).
* ``cuda`` (classification, ImageNet): the DataLoader workers only read the file bytes and
  draw the crop; the main process decodes each batch on the GPU with nvJPEG
  (``decode_jpeg(device="cuda")``) and crops, resizes and flips it there
  (:class:`GPUDecodeLoader`). On a machine without CUDA it is an error.

Every reader raises :class:`WrnDetError` with one line naming the file when it cannot be read.
"""
import math
import os
import random
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wrn_det.engine.errors import ConfigError, WrnDetError

__all__ = ["DECODERS", "check_complete", "check_decoder", "read_image", "image_loader", "resize_antialias", "read_bytes",
           "imagenet_transforms_for", "tensor_transform", "CropTransform", "collate_crops", "GPUDecodeLoader",
           "gpu_crop_resize", "sample_crop", "jpeg_size", "wrap_gpu_decode"]

DECODERS = ("torchvision", "cv2", "pil", "cuda")
_JPEG_MAGIC = b"\xff\xd8"


def check_decoder(name: str, allowed: Sequence[str] = DECODERS, key: str = "DATALOADER.DECODE") -> str:
    """Return ``name`` if it is one of ``allowed``; else raise :class:`ConfigError` naming ``key``."""
    if name not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {name!r}")
    return name


def _unreadable(path: str, why: str = "") -> WrnDetError:
    if not os.path.exists(path):
        why = "no such file"
    return WrnDetError(f"image file {path} cannot be read: {why or 'not a readable image'}")


def _file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        raise _unreadable(path) from None


def _read_cv2(path: str) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise _unreadable(path)
    return img


def _cv2_as_rgb_tensor(path: str) -> torch.Tensor:
    img = _read_cv2(path)
    return torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).permute(2, 0, 1).contiguous()


def _read_torchvision(path: str) -> Tuple[torch.Tensor, Optional[bytes]]:
    """Return the decoded image and the file's bytes (None when OpenCV read the file instead)."""
    try:
        # deprecated in torchvision 0.29 in favour of TorchCodec; OpenCV gives the same pixels when it is gone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    except ImportError:
        return _cv2_as_rgb_tensor(path), None
    raw = _file_bytes(path)
    if not raw:
        raise _unreadable(path, "empty file")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():  # the deprecation notice, once per image otherwise
            warnings.simplefilter("ignore", DeprecationWarning)
            if raw[:2] == _JPEG_MAGIC:
                return decode_jpeg(data, mode=ImageReadMode.RGB), raw
            return decode_image(data, mode=ImageReadMode.RGB), raw
    except RuntimeError:
        # formats or JPEG flavours torchvision refuses; OpenCV reads more (and reports what it cannot)
        return _cv2_as_rgb_tensor(path), raw


# how an image file must end: the JPEG end-of-image marker, PNG's IEND chunk (a truncated
# file decodes without an error, the missing rows grey)
_IMAGE_ENDS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def check_complete(path: str, where: str = "") -> None:
    """Raise :class:`WrnDetError` if the JPEG or PNG file at ``path`` stops before its end marker.

    Reads the first 8 and the last 4096 bytes only; other formats are not checked. ``where``
    (an image id, say) is added to the message in parentheses.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            tail = f.read()
    except OSError:
        raise _unreadable(path) from None
    _check_ends(path, head, tail, where)


def _check_ends(path: str, head: bytes, tail: bytes, where: str = "") -> None:
    """:func:`check_complete` on a file's first 8 and last 4096 bytes, already read."""
    fmt = "JPEG" if head[:2] == _JPEG_MAGIC else "PNG" if head[:8] == b"\x89PNG\r\n\x1a\n" else None
    if fmt and _IMAGE_ENDS[fmt] not in tail:
        at = f" ({where})" if where else ""
        raise WrnDetError(f"image file {path} is truncated: its {fmt} data stops before the end marker{at}")


def read_image(path: str, fmt: str = "BGR", decoder: str = "torchvision") -> torch.Tensor:
    """Return the image at ``path`` as a uint8 tensor (3, H, W) in channel order ``fmt`` (BGR or RGB).

    ``decoder``: ``torchvision``, ``cv2`` or ``pil`` (same pixels for baseline JPEGs; see the module doc).
    Raises :class:`WrnDetError` for a missing or unreadable file, and for a JPEG or PNG that is
    cut short (which the decoders would return with grey rows and a warning).
    """
    if decoder == "torchvision":
        img, raw = _read_torchvision(path)
        if raw is None:
            check_complete(path)
        else:  # the bytes are in memory already
            _check_ends(path, raw[:8], raw[-4096:])
        return img.flip(0) if fmt == "BGR" else img
    img = _decode(path, fmt, decoder)
    check_complete(path)
    return img


def _decode(path: str, fmt: str, decoder: str) -> torch.Tensor:
    if decoder == "pil":
        arr = np.array(_open_pil(path))  # a writable copy
        arr = np.ascontiguousarray(arr[:, :, ::-1]) if fmt == "BGR" else arr
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if decoder != "cv2":
        check_decoder(decoder, ("torchvision", "cv2", "pil"))
    img = _read_cv2(path)
    if fmt == "RGB":
        img = img[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def _open_pil(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except FileNotFoundError:
        raise _unreadable(path) from None
    except UnidentifiedImageError:
        raise _unreadable(path) from None
    except (OSError, ValueError) as e:  # truncated or corrupt data
        raise _unreadable(path, str(e).splitlines()[0] if str(e) else "") from None


def resize_antialias(height: int, width: int, short: int, max_size: Optional[int]) -> bool:
    """Return whether resizing (height, width) to short side ``short`` (long side at most ``max_size``) shrinks it.

    Antialiasing only changes a shrinking resize; for an enlarging one bilinear
    interpolation with and without it gives the same pixels, and without it is twice as fast.
    """
    scale = short / min(height, width)
    if max_size:
        scale = min(scale, max_size / max(height, width))
    return scale < 1.0


# --------------------------------------------------------------------------- ImageNet


def image_loader(decoder: str) -> Callable[[str], object]:
    """Return an ``ImageFolder`` loader for ``decoder``: a PIL image (``pil``), a (3, H, W) uint8
    RGB tensor (``torchvision``, ``cv2``) or the file's bytes with the image size (``cuda``)."""
    check_decoder(decoder, ("pil", "torchvision", "cv2", "cuda"))
    if decoder == "pil":
        return _open_pil
    if decoder == "cuda":
        return read_bytes
    return lambda path: read_image(path, "RGB", decoder)


class EncodedImage:
    """A JPEG file's bytes (uint8 tensor) and its size, as the workers hand them over for GPU decoding."""

    def __init__(self, data: torch.Tensor, height: int, width: int):
        self.data, self.height, self.width = data, height, width


def jpeg_size(data: bytes) -> Tuple[int, int]:
    """Return (height, width) from a JPEG's frame header; raise ValueError when there is none."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if h > 0 and w > 0:
                return h, w
            break
        if length < 2:
            break
        i += 2 + length
    raise ValueError("no JPEG frame header")


def read_bytes(path: str) -> EncodedImage:
    """Return the bytes of the JPEG at ``path`` with its size (no decoding)."""
    data = _file_bytes(path)
    if data[:2] != _JPEG_MAGIC:
        raise _unreadable(path, "DATALOADER.DECODE cuda reads JPEG files only")
    try:
        h, w = jpeg_size(data)
    except ValueError as e:
        raise _unreadable(path, str(e)) from None
    return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), h, w)


def sample_crop(height: int, width: int, rng: random.Random, scale=(0.08, 1.0),
                ratio=(3.0 / 4.0, 4.0 / 3.0)) -> Tuple[int, int, int, int]:
    """Return a RandomResizedCrop box ``(top, left, h, w)`` (torchvision's rule) drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropSample:
    """What a worker returns for GPU decoding: the encoded image, its crop box, flip flag and label."""

    def __init__(self, image: EncodedImage, box: Tuple[int, int, int, int], flip: bool):
        self.image, self.box, self.flip = image, box, flip


class CropTransform:
    """The ImageNet training transform for GPU decoding: draw RandomResizedCrop's box and the flip, in the worker.

    ``seed``: None draws from Python's ``random`` (seeded per worker by the DataLoader).
    """

    def __init__(self, train: bool = True, test_resize: int = 256, test_size: int = 224, out_size: int = 224,
                 after=None):
        self.train, self.test_resize, self.test_size = train, test_resize, test_size
        self.out_size = out_size if train else test_size
        # the recipe's steps after the crop and flip (colour jitter, lighting), run on the GPU per image
        self.after = after

    def __call__(self, img: EncodedImage) -> CropSample:
        if self.train:
            return CropSample(img, sample_crop(img.height, img.width, random), random.random() < 0.5)
        # test: resize the short side to test_resize, centre crop test_size (as Resize + CenterCrop)
        s = self.test_resize / min(img.height, img.width)
        side = min(int(round(self.test_size / s)), img.height, img.width)
        return CropSample(img, ((img.height - side) // 2, (img.width - side) // 2, side, side), False)


def tensor_transform(transform):
    """Return ``transform`` (a ``Compose`` of PIL-or-tensor steps ending in ``PILToTensor``) for tensor input.

    torchvision's RandomResizedCrop, Resize, CenterCrop and flips take (3, H, W) uint8
    tensors as they take PIL images (antialiased resizing in both); ``PILToTensor`` is
    dropped since the decoder already gives a tensor.
    """
    from torchvision import transforms as T

    if isinstance(transform, T.Compose):
        return T.Compose([t for t in transform.transforms if not isinstance(t, T.PILToTensor)])
    return transform


def _steps_after_to_tensor(transform):
    """Return the steps of a ``Compose`` after its ``PILToTensor`` (as one ``Compose``), or None if there are none."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    steps = list(getattr(transform, "transforms", []))
    at = [i for i, t in enumerate(steps) if isinstance(t, (T.PILToTensor, v2.PILToTensor))]
    rest = steps[at[-1] + 1:] if at else []
    return v2.Compose(rest) if rest else None


def imagenet_transforms_for(decoder: str, train_transform, test_transform, input_cfg=None):
    """Return ``(train, test)`` transforms matching ``decoder``'s output (see :func:`image_loader`).

    ``pil``: unchanged. ``torchvision``/``cv2``: the same steps on tensors. ``cuda``: the
    crop boxes and flips drawn in the workers (:class:`CropTransform`), the decoding and
    resizing done by :class:`GPUDecodeLoader`; sizes from ``INPUT.TRAIN_CROP_SIZE``,
    ``TEST_RESIZE`` and ``TEST_CROP_SIZE``.
    """
    if decoder == "pil":
        return train_transform, test_transform
    if decoder == "cuda":
        size = int(getattr(input_cfg, "TRAIN_CROP_SIZE", 224))
        resize, test_size = int(getattr(input_cfg, "TEST_RESIZE", 256)), int(getattr(input_cfg, "TEST_CROP_SIZE", 224))
        return (CropTransform(True, out_size=size, after=_steps_after_to_tensor(train_transform)),
                CropTransform(False, resize, test_size, after=_steps_after_to_tensor(test_transform)))
    return tensor_transform(train_transform), tensor_transform(test_transform)


def collate_crops(batch: List[tuple]):
    """Collate ``(CropSample, label)`` pairs into (list of samples, labels tensor)."""
    return [b[0] for b in batch], torch.tensor([int(b[1]) for b in batch], dtype=torch.int64)


def gpu_crop_resize(images: List[torch.Tensor], boxes: Sequence[Tuple[int, int, int, int]], flips: Sequence[bool],
                    size: int) -> torch.Tensor:
    """Return the crops ``boxes`` (top, left, h, w) of decoded (3, H, W) uint8 images, resized to
    ``size`` x ``size`` and flipped where asked, as one uint8 batch (N, 3, size, size) on their device.

    Each crop is resized with antialiasing when it shrinks (as PIL and torchvision do),
    bilinear otherwise.
    """
    import torch.nn.functional as F

    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    for i, (img, (t, l, h, w), flip) in enumerate(zip(images, boxes, flips)):
        crop = img[:, t:t + h, l:l + w].unsqueeze(0).float()
        y = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=min(h, w) > size)
        y = y.round_().clamp_(0, 255)[0]
        out[i] = (y.flip(-1) if flip else y).to(torch.uint8)
    return out


class GPUDecodeLoader:
    """Wrap a DataLoader of :func:`collate_crops` batches: decode them on the GPU (nvJPEG), crop, resize, flip.

    Iterating yields ``(images (N, 3, size, size), labels)`` on ``device``: uint8, or float32 on
    the 0-255 scale after ``after`` (the recipe's colour jitter and lighting, per image); the
    wrapped loader's ``set_epoch``, ``num_images`` and ``len`` pass through.
    """

    def __init__(self, loader, device, size: int, after=None):
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise ConfigError("DATALOADER.DECODE cuda decodes on the GPU; this run has no CUDA device "
                              "(use torchvision, cv2 or pil)")
        self.loader, self.device, self.size = loader, torch.device(device), int(size)
        if after is not None:
            after = after.to(self.device) if isinstance(after, torch.nn.Module) else after
        self.after = after

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from torchvision.io import decode_jpeg

        for samples, labels in self.loader:
            with warnings.catch_warnings():  # torchvision 0.29's deprecation notice, once per batch otherwise
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_jpeg([s.image.data for s in samples], device=self.device)
            images = gpu_crop_resize(decoded, [s.box for s in samples], [s.flip for s in samples], self.size)
            if self.after is not None:  # the colour steps of the recipe, image by image as in the workers
                images = torch.stack([self.after(im) for im in images])
            yield images, labels.to(self.device, non_blocking=True)


def wrap_gpu_decode(dataset, loader):
    """Return ``loader`` wrapped in :class:`GPUDecodeLoader` when ``dataset`` yields GPU-decode crops, else ``loader``."""
    transform = getattr(dataset, "transform", None)
    if not isinstance(transform, CropTransform):
        return loader
    return GPUDecodeLoader(loader, torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                           else torch.device("cpu"), transform.out_size, transform.after)
