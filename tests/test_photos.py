"""Real photos: EXIF orientations, 16- and 32-bit files, CMYK and YCCK, palette with transparency, alpha,
multi-frame files, written in their real formats with PIL. The upright 8-bit RGB picture reaches the model in
every path (training mapper, test loader, Predictor, tools/demo.py, tools/visualize_data.py, ImageNet
loaders), the boxes come back in the upright image's pixels, and detectron2's read_image gives the same
pictures (where it differs, on purpose, it is said)."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import run_tool_in_process, write_coco_split
from PIL import Image, ImageOps

from wrn_det.data import decode
from wrn_det.data.det_loader import DetectionMapper, build_detection_test_loader, check_image_file
from wrn_det.detection.config import get_det_cfg
from wrn_det.engine.config import load_config
from wrn_det.engine.errors import WrnDetError

H, W = 60, 96  # the upright picture: wider than high, so a picture read sideways has the wrong size
BOX = (10, 8, 42, 30)  # x0, y0, x1, y1 of its red block, away from every symmetry of the picture
RED = (230, 20, 20)
T = Image.Transpose
# the stored picture is the upright one turned by the inverse of what the orientation asks
INVERSE = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
           7: T.TRANSVERSE, 8: T.ROTATE_270}
DECODERS = ("torchvision", "cv2", "pil")


def upright(h=H, w=W, seed=0):
    """Return the upright test picture: a smooth grey texture with a red block at BOX (uint8 HxWx3 RGB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([100 + 30 * np.sin(x / 9.0 + c) * np.cos(y / 7.0) for c in range(3)], -1) + rng.normal(0, 4, (h, w, 3))
    img = np.clip(img, 60, 140).astype(np.uint8)
    x0, y0, x1, y1 = BOX
    img[y0:y1, x0:x1] = RED
    return img


def exif(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e


def stored(picture, orientation):
    """Return the PIL image to store so that EXIF ``orientation`` turns it into ``picture``."""
    im = Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture
    return im.transpose(INVERSE[orientation]) if orientation in INVERSE else im


def save(im, path, orientation=1, **kw):
    """Write the PIL image ``im`` to ``path`` (format from the suffix) with EXIF ``orientation``; returns the path."""
    if orientation != 1:
        kw["exif"] = exif(orientation)
    if str(path).endswith(".jpg"):
        kw.setdefault("quality", 95)
        kw.setdefault("subsampling", 0)  # 4:4:4, so the red block keeps sharp edges
    im.save(path, **kw)
    return str(path)


def red_box(image, fmt="RGB"):
    """Return the box (x0, y0, x1, y1) of the red pixels of a uint8 (3, H, W) tensor."""
    img = image.int()
    r, g, b = (img[2], img[1], img[0]) if fmt == "BGR" else (img[0], img[1], img[2])
    ys, xs = torch.nonzero((r > 160) & (g < 90) & (b < 90), as_tuple=True)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def close(box, expected, tol=2.0):
    return all(abs(float(a) - float(b)) <= tol for a, b in zip(box, expected))


def chw(picture):
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1)


def png_chunks(data):
    i, out = 8, []
    while i < len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        out.append(data[i:i + 12 + n])
        i += 12 + n
    return out


def exif_after_image_data(path):
    """Move the eXIf chunk of the PNG at ``path`` after its image data (where some writers put it)."""
    chunks = png_chunks(open(path, "rb").read())
    ex = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + b"".join(rest[:-1] + ex + rest[-1:]))
    return path


@pytest.fixture(scope="module")
def oriented(tmp_path_factory):
    """Every orientation 1-8 in JPEG, PNG (eXIf before and after the image data), TIFF and WebP:
    ``{(format, orientation): path}``, each turning upright into :func:`upright`'s picture."""
    folder = tmp_path_factory.mktemp("oriented")
    pic = upright()
    files = {}
    for o in range(1, 9):
        for fmt in ("jpg", "png", "tif", "webp"):
            kw = {"lossless": True} if fmt == "webp" else {}
            files[fmt, o] = save(stored(pic, o), folder / f"o{o}.{fmt}", o, **kw)
        files["png-late", o] = exif_after_image_data(save(stored(pic, o), folder / f"o{o}_late.png", o))
    return files


def _reference(path):
    """The upright picture as PIL's ImageOps.exif_transpose gives it (the reference), (3, H, W) RGB."""
    with Image.open(path) as im:
        return chw(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


# --- the tag, the reader ----------------------------------------------------------------------------------------


def test_orientation_is_read_as_pil_reads_it_from_every_format(oriented):
    for (fmt, o), path in oriented.items():
        raw = open(path, "rb").read()
        with Image.open(path) as im:
            assert im.getexif().get(0x0112, 1) == o, (fmt, o)  # the test wrote what it meant to
        assert decode.exif_orientation(raw) == o, (fmt, o)
        # the header check: no decoding, the size upright
        assert decode.image_header(path) == (H, W, o), (fmt, o)
        lossless = fmt != "jpg"
        ref = _reference(path)
        if lossless:
            assert torch.equal(ref, chw(upright())), (fmt, o)


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_hands_over_the_upright_picture(oriented, decoder):
    for (fmt, o), path in oriented.items():
        for channels in ("RGB", "BGR"):
            img = decode.read_image(path, channels, decoder)
            assert img.shape == (3, H, W) and img.dtype == torch.uint8, (fmt, o, decoder)
            rgb = img if channels == "RGB" else img.flip(0)
            ref = _reference(path)
            if fmt == "jpg":  # libjpeg-turbo in torchvision, OpenCV and PIL: within a grey level
                assert (rgb.int() - ref.int()).abs().float().mean() < 1.0, (fmt, o, decoder)
                assert close(red_box(rgb), BOX, 1), (fmt, o, decoder)
            else:
                assert torch.equal(rgb, ref), (fmt, o, decoder)
    # the ImageNet PIL loader and a PIL image given to the Predictor: the same pictures
    for (fmt, o), path in oriented.items():
        if fmt != "jpg":
            assert np.array_equal(np.asarray(decode.open_image(path)), upright()), (fmt, o)
            with Image.open(path) as im:
                assert torch.equal(decode.pil_to_tensor(im), chw(upright())), (fmt, o)


def test_orient_is_pil_exif_transpose():
    pic = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for o in range(1, 9):
        im = Image.fromarray(pic)
        im.info["exif"] = exif(o).tobytes()
        expected = np.asarray(ImageOps.exif_transpose(im))
        assert torch.equal(decode.orient(chw(pic), o), chw(expected)), o
        assert np.array_equal(np.asarray(decode._pil_transpose(Image.fromarray(pic), o)), expected), o


# --- every mode --------------------------------------------------------------------------------------------------


def _write_modes(folder):
    """Write one file per unusual mode; returns ``{name: (path, expected upright RGB uint8 HxWx3 or None)}``.

    None: compared with PIL's own conversion (lossy files)."""
    rng = np.random.default_rng(1)
    pic = upright()
    out = {}
    # 16-bit grayscale PNG (mode I;16), stored sideways (EXIF 6): scaled by its high byte, not clipped
    g16 = (rng.integers(0, 65536, (H, W))).astype(np.uint16)
    out["png16"] = (save(stored(Image.fromarray(g16), 6), folder / "g16.png", 6), np.repeat((g16 >> 8)[..., None], 3, 2))
    # 16-bit colour PNG (OpenCV writes them; PIL reduces them to their high byte), EXIF 3 in an added eXIf chunk
    import cv2

    c16 = rng.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(c16[::-1, ::-1, ::-1]))  # turned 180 degrees, BGR
    out["png48"] = (_add_exif_chunk(buf.tobytes(), folder / "c16.png", 3), (c16 >> 8).astype(np.uint8))
    # 32-bit integer TIFF (mode I): within 16 bits as 16-bit data; beyond, scaled from 0 to its maximum
    i32 = rng.integers(0, 65536, (H, W)).astype(np.int32)
    out["tif-i16"] = (save(Image.fromarray(i32), folder / "i16.tif"), np.repeat((i32 >> 8)[..., None], 3, 2).astype(np.uint8))
    big = rng.integers(0, 1_000_000, (H, W)).astype(np.int32)
    big[0, 0] = 1_000_000
    out["tif-i32"] = (save(Image.fromarray(big), folder / "i32.tif"),
                      np.repeat(np.rint(big * (255 / 1_000_000))[..., None], 3, 2).astype(np.uint8))
    # 32-bit float TIFF (mode F): 0-1, or 0 to its maximum when larger
    f01 = rng.random((H, W)).astype(np.float32)
    out["tif-f01"] = (save(Image.fromarray(f01), folder / "f01.tif"),
                      np.repeat(np.rint(f01.astype(np.float64) * 255)[..., None], 3, 2).astype(np.uint8))
    f4 = (rng.random((H, W)) * 4).astype(np.float32)
    f4[0, 0] = 4.0
    out["tif-f4"] = (save(Image.fromarray(f4), folder / "f4.tif"),
                     np.repeat(np.rint(f4.astype(np.float64) * (255 / 4))[..., None], 3, 2).astype(np.uint8))
    # CMYK JPEG, sideways (EXIF 8); YCCK JPEG (Adobe transform 2)
    cmyk = Image.fromarray(pic).convert("CMYK")
    out["cmyk"] = (save(stored(cmyk, 8), folder / "cmyk.jpg", 8), None)
    out["ycck"] = (_ycck_jpeg(cmyk, folder / "ycck.jpg"), None)
    # palette with a transparent index (the transparent pixels keep their palette colour: alpha dropped)
    pal = Image.fromarray(pic).quantize(16)
    out["palette"] = (save(stored(pal, 5), folder / "pal.png", 5, transparency=int(np.asarray(pal)[BOX[1], BOX[0]])),
                      np.asarray(pal.convert("RGB")))
    # LA and RGBA: alpha dropped
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    gray = np.asarray(Image.fromarray(pic).convert("L"))
    out["la"] = (save(Image.fromarray(np.stack([gray, alpha], -1), "LA"), folder / "la.png"),
                 np.repeat(gray[..., None], 3, 2))
    out["rgba"] = (save(stored(Image.fromarray(np.concatenate([pic, alpha[..., None]], -1)), 7), folder / "rgba.png", 7),
                   pic)
    out["gray-jpg"] = (save(Image.fromarray(pic).convert("L"), folder / "gray.jpg"), None)
    out["bilevel"] = (save(Image.fromarray(pic).convert("1"), folder / "one.png"),
                      np.asarray(Image.fromarray(pic).convert("1").convert("RGB")))
    # multi-frame: the first frame
    other = Image.fromarray(255 - pic)
    gif_first = Image.fromarray(pic).quantize(64)
    gif_first.save(folder / "frames.gif", save_all=True, append_images=[other.quantize(64)], duration=100)
    out["gif"] = (str(folder / "frames.gif"), np.asarray(gif_first.convert("RGB")))
    Image.fromarray(pic).save(folder / "pages.tif", save_all=True, append_images=[other])
    out["tif-pages"] = (str(folder / "pages.tif"), pic)
    return out


def _add_exif_chunk(png: bytes, path, orientation):
    """Write ``png`` to ``path`` with an eXIf chunk of ``orientation`` before its image data; returns the path."""
    body = exif(orientation).tobytes()
    body = body[6:] if body.startswith(b"Exif\x00\x00") else body  # a PNG chunk holds the TIFF structure alone
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    chunks = png_chunks(png)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunks[0] + chunk + b"".join(chunks[1:]))
    return str(path)


def _ycck_jpeg(cmyk, path):
    """Write ``cmyk`` as a YCCK JPEG (Adobe transform 2), as Photoshop writes CMYK photos; returns the path.

    libjpeg turns YCCK into CMYK by YCbCr -> RGB and C = 255 - R (and so on), K as stored; PIL stores a CMYK
    JPEG inverted (Adobe's convention). So the YCC planes hold YCbCr of (C, M, Y) and the K plane 255 - K;
    PIL writes the planes given as a CMYK image inverted, hence the inversions here, and the Adobe marker's
    transform byte is set from 0 (CMYK) to 2 (YCCK)."""
    c = np.asarray(cmyk).astype(np.float64)
    y = 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]
    cb = 128 - 0.168736 * c[..., 0] - 0.331264 * c[..., 1] + 0.5 * c[..., 2]
    cr = 128 + 0.5 * c[..., 0] - 0.418688 * c[..., 1] - 0.081312 * c[..., 2]
    planes = np.clip(np.rint(np.stack([y, cb, cr, 255 - c[..., 3]], -1)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(255 - planes, "CMYK").save(buf, "JPEG", quality=95)
    data = bytearray(buf.getvalue())
    at = data.find(b"Adobe")
    assert at > 0 and data[at + 11] == 0, "PIL's CMYK JPEG has an Adobe marker with transform 0"
    data[at + 11] = 2
    open(path, "wb").write(bytes(data))
    return str(path)


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    return _write_modes(tmp_path_factory.mktemp("modes"))


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_mode_becomes_upright_8bit_rgb(modes, decoder):
    pic = upright()
    for name, (path, expected) in modes.items():
        img = decode.read_image(path, "RGB", decoder)
        assert img.dtype == torch.uint8 and img.shape[0] == 3, (name, decoder)
        got = img.permute(1, 2, 0).numpy()
        if expected is not None:
            assert got.shape == expected.shape and np.array_equal(got, expected), (name, decoder)
        else:  # JPEGs: PIL's decoding (CMYK and YCCK go through PIL whatever the decoder) and the upright picture
            ref = _reference(path).permute(1, 2, 0).numpy()
            assert np.abs(got.astype(int) - ref).mean() < 1.0, (name, decoder)
            target = pic if name != "gray-jpg" else np.repeat(np.asarray(Image.fromarray(pic).convert("L"))[..., None], 3, 2)
            assert got.shape == target.shape and np.abs(got.astype(int) - target).mean() < 4.0, (name, decoder)
        if expected is not None:  # the ImageNet PIL loader: the same picture
            assert np.array_equal(np.asarray(decode.open_image(path)), expected), name


def test_size_check_is_upright_and_names_both_sizes(oriented, tmp_path):
    for (fmt, o), path in oriented.items():
        check_image_file(path, H, W)  # the dataset's size is the upright one
        if o >= 5:
            with pytest.raises(WrnDetError) as e:
                check_image_file(path, W, H, "image id 7")
            assert str(e.value) == (f"image file {path} is {W}x{H} but its annotation says {H}x{W} (image id 7); "
                                    f"it is stored {H}x{W} and its EXIF orientation {o} turns it upright")
    # the mapper checks the decoded picture against the dataset's size too
    path = oriented["jpg", 6]
    cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", [])
    out = DetectionMapper(cfg, False)({"file_name": path, "height": W, "width": H, "image_id": 3})
    assert out["message"] == f"image file {path} is {W}x{H} but its annotation says {H}x{W} (image id 3)"


# --- hostile EXIF -----------------------------------------------------------------------------------------------


def _tiff(entries, order=">", count=None, ifd=8):
    """A TIFF structure with IFD0 holding ``entries`` (tag, type, count, value bytes)."""
    head = (b"MM\x00*" if order == ">" else b"II*\x00") + struct.pack(order + "I", ifd)
    body = struct.pack(order + "H", len(entries) if count is None else count)
    for tag, kind, n, value in entries:
        body += struct.pack(order + "HHI", tag, kind, n) + value.ljust(4, b"\x00")
    return head + body + b"\x00\x00\x00\x00"


def _with_app1(jpeg: bytes, block: bytes) -> bytes:
    seg = b"Exif\x00\x00" + block
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(seg) + 2) + seg + jpeg[2:]


HOSTILE = {
    "orientation 0": _tiff([(0x0112, 3, 1, struct.pack(">H", 0))]),
    "orientation 9": _tiff([(0x0112, 3, 1, struct.pack(">H", 9))]),
    "orientation 65535": _tiff([(0x0112, 3, 1, struct.pack(">H", 65535))]),
    "orientation as text": _tiff([(0x0112, 2, 2, b"6\x00")]),
    "two orientation values": _tiff([(0x0112, 3, 2, struct.pack(">HH", 6, 6))]),
    "IFD beyond the block": _tiff([(0x0112, 3, 1, struct.pack(">H", 6))], ifd=4000),
    "entry count beyond the block": _tiff([], count=900),
    "truncated in the entry": _tiff([(0x0112, 3, 1, struct.pack(">H", 6))])[:14],
    "no byte order": b"XX\x00*\x00\x00\x00\x08",
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_exif_is_orientation_1_without_an_error(tmp_path, case):
    pic = upright()
    buf = io.BytesIO()
    Image.fromarray(pic).save(buf, "JPEG", quality=95, subsampling=0)
    path = tmp_path / "hostile.jpg"
    path.write_bytes(_with_app1(buf.getvalue(), HOSTILE[case]))
    assert decode.exif_orientation(path.read_bytes()) == 1
    for decoder in DECODERS:
        img = decode.read_image(str(path), "RGB", decoder)
        assert img.shape == (3, H, W) and close(red_box(img), BOX, 1), (case, decoder)
    assert decode.image_header(str(path)) == (H, W, 1)
    with Image.open(path) as im:
        assert decode.pil_to_tensor(im).shape == (3, H, W)
    # a PNG eXIf chunk whose CRC is wrong is no chunk
    png = tmp_path / "bad_crc.png"
    save(stored(pic, 6), png, 6)
    data = bytearray(png.read_bytes())
    at = data.find(b"eXIf")
    data[at + 4 + struct.unpack(">I", data[at - 4:at])[0]] ^= 0xFF
    assert decode.exif_orientation(bytes(data)) == 1


def test_unreadable_files_are_named_whatever_failed(tmp_path, monkeypatch):
    big = tmp_path / "bomb.tif"  # a header claiming 60000 x 60000 pixels: PIL refuses it as a decompression bomb
    big.write_bytes(_tiff([(256, 4, 1, struct.pack(">I", 60000)), (257, 4, 1, struct.pack(">I", 60000)),
                           (258, 3, 1, struct.pack(">H", 8)), (273, 4, 1, struct.pack(">I", 8)),
                           (277, 3, 1, struct.pack(">H", 3))]))
    for decoder in DECODERS:
        with pytest.raises(WrnDetError, match=f"^image file {big} cannot be read: "):
            decode.read_image(str(big), "RGB", decoder)
    path = save(Image.fromarray(upright()), tmp_path / "fine.png")

    def boom(*a, **k):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(decode, "_sniff", boom)
    with pytest.raises(WrnDetError) as e:
        decode.read_image(path, "RGB")
    assert str(e.value) == f"image file {path} cannot be read: unpack requires a buffer of 4 bytes"


# --- detectron2 --------------------------------------------------------------------------------------------------


def test_same_pictures_as_detectron2_read_image(oriented, modes):
    """detectron2's read_image on the same files: the same upright pictures, except (on purpose) 16- and 32-bit
    files, which detectron2 clips at 255 (PIL's conversion) where this reader scales them, and TIFFs with an
    orientation, which detectron2 turns twice with a Pillow that turns TIFFs as it loads them (Pillow 13 here)."""
    d2 = pytest.importorskip("detectron2.data.detection_utils")
    files = {f"{fmt} {o}": (path, fmt == "jpg") for (fmt, o), path in oriented.items()}
    files.update({name: (path, expected is None) for name, (path, expected) in modes.items()})
    for name, (path, lossy) in files.items():
        theirs = chw(d2.read_image(path, format="RGB"))
        ours = decode.read_image(path, "RGB", "pil")
        if name in ("png16", "tif-i16", "tif-i32", "tif-f01", "tif-f4"):
            # detectron2: values above 255 clip (16-bit picture nearly white), 0-1 floats nearly black
            assert ours.shape == theirs.shape and not torch.equal(ours, theirs), name
            continue
        if name.startswith("tif ") and name != "tif 1":
            with Image.open(path) as im:
                assert im.size == (W, H)  # this Pillow reports (and loads) the TIFF upright already
            assert torch.equal(theirs, decode.orient(ours, int(name.split()[1]))), name  # turned once more
            continue
        assert torch.equal(ours, theirs), name
        assert torch.equal(ours, theirs), name  # the same PIL decoding underneath
        fast = decode.read_image(path, "RGB", "torchvision")
        assert (fast.int() - theirs.int()).abs().float().mean() < (1.0 if lossy else 1e-9), name
