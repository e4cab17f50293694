"""The one image reader: every file reaches the model as the upright 8-bit RGB picture a photo viewer shows.

Training, evaluation, :class:`~wrn_det.detection.predictor.Predictor`, ``tools/demo.py``,
``tools/visualize_data.py`` and the ImageNet folders all read images here, as detectron2's
``read_image`` does for detectron2:

* **Upright**: the EXIF orientation (2-8) of JPEG (APP1), PNG (``eXIf``, before or after the
  image data), TIFF (IFD0) and WebP (``EXIF``) files is applied as PIL's
  ``ImageOps.exif_transpose`` applies it. The tag is read from the file's bytes already in
  memory (:func:`exif_orientation`); a missing, out-of-range or malformed tag is orientation 1,
  without an error (detectron2 ignores an EXIF block PIL cannot parse too). XMP's
  ``tiff:Orientation`` is not read (PIL reads it when a file has no EXIF orientation).
* **8-bit RGB**: grayscale, bilevel and palette files (transparency or not) in their colours;
  LA, RGBA and PA with the alpha dropped (as detectron2); CMYK and YCCK JPEGs as PIL converts
  them; 16-bit files scaled to 0-255 by their high byte (as Pillow reduces 16-bit colour PNGs;
  detectron2 clips them at 255 instead, so a 16-bit picture is white there); 32-bit integer
  files as 16-bit when their values fit, else scaled from 0 to their maximum; 32-bit float
  files from 0-1, or from 0 to their maximum when larger (negative values shift the floor
  down, non-finite ones are black); multi-frame files (GIF, TIFF, MPO, APNG) by their first frame.

``DATALOADER.DECODE`` picks the decoder of the common files (8-bit JPEGs of 1 or 3
components, PNGs of at most 8 bits); every other file goes through Pillow and the
conversions above, whatever the choice, so all decoders give the same pixels:

* ``torchvision`` (detection default): ``torchvision.io.decode_jpeg`` (libjpeg-turbo),
  which returns the (3, H, W) RGB tensor the model takes, and ``decode_image`` for PNGs. As
  fast as OpenCV's decoder and it skips the copy from OpenCV's (H, W, 3) BGR array to
  (3, H, W). (torchvision 0.29 deprecates its image decoders in favour of TorchCodec;
  without them this reads with OpenCV.)
* ``cv2``: ``cv2.imdecode`` (the builtin engine's reader before this option existed); same pixels.
* ``pil``: Pillow (classification default: torchvision's ``ImageFolder`` loader, the PIL
  transforms of the ImageNet recipe).
* ``cuda`` (classification, ImageNet): the DataLoader workers only read the JPEG bytes and
  draw the crop; the main process decodes each batch on the GPU with nvJPEG
  (``decode_jpeg(device="cuda")``), turns it upright and crops, resizes and flips it there
  (:class:`GPUDecodeLoader`). Files nvJPEG is not given (PNGs, CMYK JPEGs) are decoded
  in the workers by this reader. On a machine without CUDA it is an error.

Every reader raises :class:`WrnDetError` with one line naming the file when it cannot be read,
whatever the decoder's own complaint was.
"""
import functools
import io
import math
import os
import random
import struct
import warnings
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from wrn_det.engine.errors import ConfigError, WrnDetError

__all__ = ["DECODERS", "check_complete", "check_decoder", "read_image", "open_image", "pil_to_tensor", "image_header",
           "exif_orientation", "orient", "to_rgb", "image_loader", "resize_antialias", "read_bytes",
           "imagenet_transforms_for", "tensor_transform", "CropTransform", "collate_crops", "GPUDecodeLoader",
           "gpu_crop_resize", "decode_encoded", "sample_crop", "jpeg_size", "wrap_gpu_decode"]

DECODERS = ("torchvision", "cv2", "pil", "cuda")
_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ORIENTATION_TAG = 0x0112


def check_decoder(name: str, allowed: Sequence[str] = DECODERS, key: str = "DATALOADER.DECODE") -> str:
    """Return ``name`` if it is one of ``allowed``; else raise :class:`ConfigError` naming ``key``."""
    if name not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {name!r}")
    return name


def _unreadable(path: str, why: str = "") -> WrnDetError:
    if not os.path.exists(path):
        why = "no such file"
    return WrnDetError(f"image file {path} cannot be read: {why or 'not a readable image'}")


def _why(e: BaseException) -> str:
    """Return what went wrong in a decoder's exception, in a few words on one line."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):  # its text names an in-memory buffer, not the file
        return "not a readable image"
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


def _file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        raise _unreadable(path) from None


# --------------------------------------------------------------------------- EXIF orientation
# Read from the bytes already in memory: a walk over a JPEG's markers up to its image data, a
# search for PNG's eXIf chunk, IFD0 of a TIFF, WebP's RIFF chunks. Most files have no tag, and
# the walk costs microseconds against the milliseconds of decoding.


def _tiff_orientation(data: bytes, start: int = 0) -> int:
    """Return the Orientation tag (2-8) of IFD0 of the TIFF structure at ``data[start:]``; 1 when it has none,
    one out of range, or cannot be read."""
    order = data[start:start + 4]
    e = "<" if order == b"II*\x00" else ">" if order == b"MM\x00*" else None
    if e is None:
        return 1
    try:
        ifd = start + struct.unpack_from(e + "I", data, start + 4)[0]
        for k in range(struct.unpack_from(e + "H", data, ifd)[0]):
            at = ifd + 2 + 12 * k
            tag, kind, count = struct.unpack_from(e + "HHI", data, at)
            if tag == _ORIENTATION_TAG:
                # BYTE, SHORT (the standard's) or LONG, one value, as PIL reads it
                fmt = {1: "B", 3: "H", 4: "I"}.get(kind)
                value = struct.unpack_from(e + fmt, data, at + 8)[0] if fmt and count == 1 else 1
                return value if 2 <= value <= 8 else 1
    except struct.error:  # cut short
        return 1
    return 1


def _exif_block_orientation(block: bytes) -> int:
    """Return the orientation of an EXIF block (a TIFF structure, with or without the ``Exif\\0\\0`` prefix)."""
    return _tiff_orientation(block, 6 if block[:6] == b"Exif\x00\x00" else 0)


def _jpeg_header(data: bytes) -> Tuple[int, int, int, int, int]:
    """Return ``(height, width, components, bits, orientation)`` from a JPEG's markers before its image data.

    The size and layout come from the first frame header (all 0 when there is none), the
    orientation from the first ``Exif`` APP1 segment (as PIL keeps the first).
    """
    i, n = 2, len(data)
    height = width = components = bits = 0
    orientation = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF or marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # fill byte, markers without a length
            i += 1 if marker == 0xFF else 2
            continue
        if marker in (0xDA, 0xD9):  # start of the image data, or its end
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            break
        if marker == 0xE1 and orientation is None and data[i + 4:i + 10] == b"Exif\x00\x00":
            # the TIFF structure inside the segment (offsets relative to its start), bounded by the segment
            orientation = _tiff_orientation(data[:i + 2 + length], i + 10)
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and not components and i + 10 <= n:
            bits = data[i + 4]
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            components = data[i + 9]
        i += 2 + length
    return height, width, components, bits, orientation or 1


def _png_orientation(data: bytes) -> int:
    """Return the orientation of the ``eXIf`` chunk found in ``data`` (a PNG file, or its last bytes), else 1.

    A chunk counts only with its CRC intact, so the four letters inside compressed image data are no chunk.
    """
    at = data.find(b"eXIf")
    while at >= 4:
        (length,) = struct.unpack_from(">I", data, at - 4)
        end = at + 4 + length
        if end + 4 <= len(data) and zlib.crc32(data[at:end]) == struct.unpack_from(">I", data, end)[0]:
            return _exif_block_orientation(data[at + 4:end])
        at = data.find(b"eXIf", at + 1)
    return 1


def _webp_orientation(data: bytes) -> int:
    """Return the orientation of a WebP file's ``EXIF`` chunk, else 1."""
    i = 12
    while i + 8 <= len(data):
        size = struct.unpack_from("<I", data, i + 4)[0]
        if data[i:i + 4] == b"EXIF":
            return _exif_block_orientation(data[i + 8:i + 8 + size])
        i += 8 + size + (size & 1)
    return 1


def exif_orientation(data: bytes) -> int:
    """Return the EXIF orientation (1-8) of the JPEG, PNG, TIFF or WebP file whose bytes are ``data``.

    1 (upright as stored) for other formats and for a tag that is missing, out of range or
    malformed. 2-8 mean what they mean to PIL's ``ImageOps.exif_transpose`` (see :func:`orient`).
    """
    if data[:2] == _JPEG_MAGIC:
        return _jpeg_header(data)[4]
    if data[:8] == _PNG_MAGIC:
        return _png_orientation(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_orientation(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_orientation(data)
    return 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Return ``image`` (``(..., H, W)``) turned upright for EXIF ``orientation``, as ``ImageOps.exif_transpose``.

    2 mirrors left-right, 3 turns 180 degrees, 4 mirrors top-bottom, 5 transposes, 6 turns
    90 degrees clockwise, 7 transverses, 8 turns 90 degrees anticlockwise; 5-8 swap height
    and width. 1 (and anything else) returns ``image`` itself.
    """
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation not in (5, 6, 7, 8):
        return image
    t = image.transpose(-2, -1)
    flips = {5: (), 6: (-1,), 7: (-2, -1), 8: (-2,)}[orientation]
    return (t.flip(*flips) if flips else t).contiguous()


def _pil_transpose(im, orientation: int):
    """Return the PIL image ``im`` turned upright for ``orientation`` (the PIL twin of :func:`orient`)."""
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return im.transpose(method) if method is not None else im


def _pil_orientation(im, load: bool = True) -> int:
    """Return the EXIF orientation still to apply to a PIL image (JPEG, PNG, WebP ``info["exif"]``; TIFF's IFD0),
    else 1.

    ``load``: load the image first (the header check passes False). A PNG whose ``eXIf`` chunk
    follows the image data reveals it only once loaded, and recent Pillow turns a TIFF upright
    as it loads it (and drops the tag), older Pillow does not.
    """
    if load:
        im.load()
    exif = im.info.get("exif")
    if isinstance(exif, (bytes, bytearray)):
        return _exif_block_orientation(bytes(exif))
    tags = getattr(im, "tag_v2", None)  # TIFF: IFD0, parsed when the file was opened
    value = tags.get(_ORIENTATION_TAG) if tags is not None else None
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


# --------------------------------------------------------------------------- every mode to 8-bit RGB


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Return the one-channel 16- or 32-bit array ``a`` scaled to uint8 (the rule in the module doc)."""
    if a.dtype.kind in "ui" and a.size and a.min() >= 0 and a.max() <= 65535:
        return (a.astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit data: its high byte, as Pillow for colour PNGs
    x = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if not x.size:
        return x.astype(np.uint8)
    lo, hi = min(0.0, float(x.min())), max(1.0 if a.dtype.kind == "f" else 65535.0, float(x.max()))
    return np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb(im):
    """Return the PIL image ``im`` (its current frame) as an 8-bit RGB PIL image (``im`` itself when it is one).

    Grayscale, bilevel, palette (transparency or not), CMYK, YCbCr, LAB and HSV in their colours;
    the alpha of LA, PA, RGBA dropped; 16- and 32-bit images scaled to 0-255 (see the module doc).
    """
    from PIL import Image

    if im.mode == "RGB":
        im.load()
        return im
    if im.mode.startswith("I") or im.mode == "F":
        gray = _to_uint8(np.asarray(im))
        return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))
    return im.convert("RGB")


def _pil_rgb(raw: bytes):
    """Return the first frame of the image file whose bytes are ``raw`` as an 8-bit RGB PIL image as Pillow
    loads it, and the EXIF orientation still to apply to it."""
    from PIL import Image

    with warnings.catch_warnings():  # PIL's warnings (large images, odd chunks): the caller names the file on failure
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(raw)) as im:
            orientation = _pil_orientation(im)
            return to_rgb(im), orientation


def _pil_tensor(im, fmt: str) -> torch.Tensor:
    arr = np.array(im)  # a writable copy
    if fmt == "BGR":
        arr = np.ascontiguousarray(arr[:, :, ::-1])
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def pil_to_tensor(im, fmt: str = "RGB") -> torch.Tensor:
    """Return the PIL image ``im`` as an upright uint8 (3, H, W) tensor in channel order ``fmt``.

    The EXIF orientation ``im`` carries is applied (an image that ``ImageOps.exif_transpose``
    already turned carries none) and its mode is turned into 8-bit RGB, as the file reader does.
    """
    orientation = _pil_orientation(im)
    return orient(_pil_tensor(to_rgb(im), fmt), orientation)


# --------------------------------------------------------------------------- reading files

# how an image file must end: the JPEG end-of-image marker, PNG's IEND chunk (a truncated
# file decodes without an error, the missing rows grey)
_IMAGE_ENDS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def check_complete(path: str, where: str = "") -> None:
    """Raise :class:`WrnDetError` if the JPEG or PNG file at ``path`` stops before its end marker.

    Reads the first 8 and the last 4096 bytes only; other formats are not checked. ``where``
    (an image id, say) is added to the message in parentheses.
    """
    head, tail = _head_and_tail(path)
    _check_ends(path, head, tail, where)


def _head_and_tail(path: str) -> Tuple[bytes, bytes]:
    """Return the first 8 and the last 4096 bytes of the file at ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            return head, f.read()
    except OSError:
        raise _unreadable(path) from None


def _check_ends(path: str, head: bytes, tail: bytes, where: str = "") -> None:
    """:func:`check_complete` on a file's first 8 and last 4096 bytes, already read."""
    fmt = "JPEG" if head[:2] == _JPEG_MAGIC else "PNG" if head[:8] == _PNG_MAGIC else None
    if fmt and _IMAGE_ENDS[fmt] not in tail:
        at = f" ({where})" if where else ""
        raise WrnDetError(f"image file {path} is truncated: its {fmt} data stops before the end marker{at}")


def _sniff(raw: bytes) -> Tuple[Optional[str], int]:
    """Return ``(kind, orientation)``: ``"jpeg"`` or ``"png"`` and the file's EXIF orientation when the fast
    decoders take it (8-bit JPEG of 1 or 3 components, PNG of at most 8 bits), else ``(None, 1)`` (Pillow
    reads it, and its orientation from what it parsed)."""
    if raw[:2] == _JPEG_MAGIC:
        _, _, components, bits, orientation = _jpeg_header(raw)
        return ("jpeg" if components in (1, 3) and bits == 8 else None), orientation
    if raw[:8] == _PNG_MAGIC:
        depth = raw[24] if raw[12:16] == b"IHDR" and len(raw) > 25 else 0
        return ("png" if 0 < depth <= 8 else None), _png_orientation(raw)
    return None, 1


@functools.lru_cache(maxsize=None)
def _tv_decoders():
    """Return torchvision's ``(decode_jpeg, decode_image, ImageReadMode)``, or None where they are gone."""
    try:
        # deprecated in torchvision 0.29 in favour of TorchCodec; OpenCV gives the same pixels when it is gone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    except ImportError:
        return None
    return decode_jpeg, decode_image, ImageReadMode


def _decode_fast(raw: bytes, kind: str, fmt: str, decoder: str) -> Optional[torch.Tensor]:
    """Return the common file ``raw`` decoded by ``decoder`` as stored, or None when that decoder refuses it."""
    tv = _tv_decoders() if decoder == "torchvision" else None
    if tv is not None:
        decode_jpeg, decode_image, mode = tv
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        try:
            with warnings.catch_warnings():  # the deprecation notice, once per image otherwise
                warnings.simplefilter("ignore", DeprecationWarning)
                img = (decode_jpeg if kind == "jpeg" else decode_image)(data, mode=mode.RGB)
        except RuntimeError:  # a flavour libjpeg-turbo or libpng refuses: Pillow tries
            return None
        return img.flip(0) if fmt == "BGR" else img
    import cv2

    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        return None
    if fmt == "RGB":
        img = img[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def _decode_bytes(raw: bytes, fmt: str, decoder: str) -> torch.Tensor:
    """Return the upright uint8 (3, H, W) image in ``fmt`` of the file whose bytes are ``raw``."""
    kind, orientation = _sniff(raw)
    img = _decode_fast(raw, kind, fmt, decoder) if kind is not None and decoder != "pil" else None
    if img is None:
        pil, orientation = _pil_rgb(raw)
        img = _pil_tensor(pil, fmt)
    return orient(img, orientation)


def read_image(path: str, fmt: str = "BGR", decoder: str = "torchvision") -> torch.Tensor:
    """Return the image at ``path`` upright as a uint8 tensor (3, H, W) in channel order ``fmt`` (BGR or RGB).

    ``decoder``: ``torchvision``, ``cv2`` or ``pil``, for the common files (see the module doc:
    the same pixels for lossless files, within a grey level or two for JPEGs). Raises
    :class:`WrnDetError` naming the file for a missing or unreadable file, whatever failed,
    and for a JPEG or PNG cut short (which the decoders would return with grey rows).
    """
    if decoder not in ("torchvision", "cv2", "pil"):
        check_decoder(decoder, ("torchvision", "cv2", "pil"))
    raw = _file_bytes(path)
    if not raw:
        raise _unreadable(path, "empty file")
    try:
        img = _decode_bytes(raw, fmt, decoder)
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises, the user hears which file
        raise _unreadable(path, _why(e)) from None
    _check_ends(path, raw[:8], raw[-4096:])  # the bytes are in memory already
    return img


def open_image(path: str):
    """Return the image at ``path`` upright as an 8-bit RGB PIL image (the ImageNet ``pil`` loader).

    The same picture as :func:`read_image` with the ``pil`` decoder; raises :class:`WrnDetError` as it does.
    """
    raw = _file_bytes(path)
    if not raw:
        raise _unreadable(path, "empty file")
    try:
        im = _pil_transpose(*_pil_rgb(raw))
    except Exception as e:  # noqa: BLE001 - as in read_image
        raise _unreadable(path, _why(e)) from None
    _check_ends(path, raw[:8], raw[-4096:])
    return im


def image_header(path: str, where: str = "") -> Tuple[int, int, int]:
    """Return the upright ``(height, width)`` and the EXIF orientation of the image file at ``path``,
    from its header (no decoding).

    The size :func:`read_image` will hand over: orientations 5-8 swap the stored width and height.
    Raises :class:`WrnDetError` naming the file (and ``where``, an image id say) for a missing
    or unreadable file, and for a JPEG or PNG cut short.
    """
    from PIL import Image

    at = f" ({where})" if where else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                width, height = im.size
                tags = getattr(im, "tag_v2", None)
                if tags is not None and isinstance(tags.get(256), int) and isinstance(tags.get(257), int):
                    width, height = tags[256], tags[257]  # a TIFF as stored (recent Pillow reports it upright)
                orientation = _pil_orientation(im, load=False)
                png = im.format == "PNG"
    except FileNotFoundError:
        raise WrnDetError(f"image file {path} cannot be read: no such file{at}") from None
    except Exception as e:  # noqa: BLE001 - PIL's complaint about a file that is no image, whatever it is
        raise WrnDetError(f"image file {path} cannot be read: not a readable image ({type(e).__name__}){at}") from None
    head, tail = _head_and_tail(path)
    _check_ends(path, head, tail, where)
    if png and orientation == 1:  # an eXIf chunk after the image data sits among the last bytes
        orientation = _png_orientation(tail)
    return ((width, height) if orientation >= 5 else (height, width)) + (orientation,)


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
    """Return an ``ImageFolder`` loader for ``decoder``: an upright 8-bit RGB PIL image (``pil``), an upright
    (3, H, W) uint8 RGB tensor (``torchvision``, ``cv2``) or an :class:`EncodedImage` (``cuda``: the JPEG's
    bytes, its upright size and orientation, applied after decoding on the GPU)."""
    check_decoder(decoder, ("pil", "torchvision", "cv2", "cuda"))
    if decoder == "pil":
        return open_image
    if decoder == "cuda":
        return read_bytes
    return lambda path: read_image(path, "RGB", decoder)


class EncodedImage:
    """What a worker hands over for GPU decoding: a JPEG file's bytes (uint8 tensor), the upright size
    and the EXIF orientation that turns it upright; or, for a file nvJPEG is not given, ``decoded``:
    the upright uint8 (3, H, W) RGB image the worker read itself (``data`` None)."""

    def __init__(self, data: Optional[torch.Tensor], height: int, width: int, orientation: int = 1,
                 decoded: Optional[torch.Tensor] = None):
        self.data, self.height, self.width = data, height, width
        self.orientation, self.decoded = orientation, decoded


def jpeg_size(data: bytes) -> Tuple[int, int]:
    """Return (height, width) as stored, from a JPEG's frame header; raise ValueError when there is none."""
    h, w = _jpeg_header(data)[:2]
    if h > 0 and w > 0:
        return h, w
    raise ValueError("no JPEG frame header")


def read_bytes(path: str) -> EncodedImage:
    """Return the bytes of the JPEG at ``path`` with its upright size and orientation (no decoding).

    nvJPEG gets 8-bit JPEGs of 1 or 3 components; any other file (a PNG, a CMYK JPEG) is read
    here by :func:`read_image`. Raises :class:`WrnDetError` naming the file as the reader does.
    """
    data = _file_bytes(path)
    if data[:2] == _JPEG_MAGIC:
        h, w, components, bits, orientation = _jpeg_header(data)
        if h > 0 and w > 0 and components in (1, 3) and bits == 8:
            _check_ends(path, data[:8], data[-4096:])
            if orientation >= 5:
                h, w = w, h
            return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), h, w, orientation)
    img = read_image(path, "RGB", "torchvision")
    return EncodedImage(None, int(img.shape[1]), int(img.shape[2]), decoded=img)


def decode_encoded(images: Sequence[EncodedImage], device) -> List[torch.Tensor]:
    """Return ``images`` decoded on ``device`` (nvJPEG on a GPU) and turned upright: uint8 (3, H, W) RGB each.

    The JPEG bytes are decoded in one batch; images the workers decoded are moved to ``device``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: List[Optional[torch.Tensor]] = [None if im.data is not None else im.decoded.to(device) for im in images]
    jpegs = [i for i, im in enumerate(images) if im.data is not None]
    if jpegs:
        with warnings.catch_warnings():  # torchvision 0.29's deprecation notice, once per batch otherwise
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg([images[i].data for i in jpegs], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpegs, decoded):
            out[i] = orient(img, images[i].orientation)
    return out


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
    """Wrap a DataLoader of :func:`collate_crops` batches: decode them on the GPU (nvJPEG), turn them upright
    (EXIF orientation), crop, resize, flip.

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
        for samples, labels in self.loader:
            decoded = decode_encoded([s.image for s in samples], self.device)
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
