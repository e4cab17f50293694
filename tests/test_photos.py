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


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's, opening the file for pil_to_tensor
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


def _bomb_tiff():
    """A TIFF whose header claims 60000 x 60000 pixels: PIL refuses it as a decompression bomb (not an OSError)."""
    buf = io.BytesIO()
    Image.new("L", (3, 3)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    e = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(e + "I", data, 4)
    for k in range(struct.unpack_from(e + "H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        tag, kind = struct.unpack_from(e + "HH", data, at)
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into(e + ("H" if kind == 3 else "I"), data, at + 8, 60000)
    return bytes(data)


def test_unreadable_files_are_named_whatever_failed(tmp_path, monkeypatch):
    big = tmp_path / "bomb.tif"
    big.write_bytes(_bomb_tiff())
    for decoder in DECODERS:
        with pytest.raises(WrnDetError, match=f"^image file {big} cannot be read: Image size .3600000000 pixels. "
                                              "exceeds limit"):
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


# --- every path: the mapper, the test loader, the Predictor, the tools, the ImageNet loaders -----------------------


def _cv2_png16(picture, path, orientation):
    """Write ``picture`` (upright, 8-bit RGB) as a 16-bit colour PNG (its values times 257) stored for EXIF
    ``orientation``; returns the path. Its high bytes are the picture."""
    import cv2

    raw = np.asarray(stored(picture, orientation))[:, :, ::-1].astype(np.uint16) * 257
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(raw))
    return _add_exif_chunk(buf.tobytes(), path, orientation)


@pytest.fixture(scope="module")
def photos(oriented, tmp_path_factory):
    """Files of every kind whose upright picture is :func:`upright`'s (exactly, or within JPEG's and a palette's
    loss): ``{name: path}``."""
    folder = tmp_path_factory.mktemp("photos")
    pic = upright()
    files = {f"{fmt}-{o}": path for (fmt, o), path in oriented.items()}
    files["png16-6"] = _cv2_png16(pic, folder / "c16.png", 6)
    files["cmyk-8"] = save(stored(Image.fromarray(pic).convert("CMYK"), 8), folder / "cmyk.jpg", 8)
    files["rgba-7"] = save(stored(Image.fromarray(np.concatenate([pic, np.full((H, W, 1), 9, np.uint8)], -1)), 7),
                           folder / "rgba.png", 7)
    pal = Image.fromarray(pic).quantize(32)
    files["palette-5"] = save(stored(pal, 5), folder / "pal.png", 5, transparency=0)
    Image.fromarray(pic).quantize(64).save(folder / "frames.gif", save_all=True,
                                           append_images=[Image.fromarray(255 - pic).quantize(64)])
    files["gif"] = str(folder / "frames.gif")
    Image.fromarray(pic).save(folder / "pages.tif", save_all=True, append_images=[Image.fromarray(255 - pic)])
    files["tif-pages"] = str(folder / "pages.tif")
    return files


EXACT = ("png-", "png-late-", "tif-", "webp-", "png16-6", "rgba-7")  # lossless files of the very picture


def _det_cfg(opts=()):
    """The demo config at test size 120 (the 60-pixel pictures enlarged twice), no flip, no workers."""
    return load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml",
                       ["INPUT.MIN_SIZE_TRAIN", "(120,)", "INPUT.MAX_SIZE_TRAIN", "1000", "INPUT.MIN_SIZE_TEST", "120",
                        "INPUT.MAX_SIZE_TEST", "1000", "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0",
                        *opts])


def _dicts(files):
    x0, y0, x1, y1 = BOX
    return [{"file_name": p, "height": H, "width": W, "image_id": i,
             "annotations": [{"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": 0, "iscrowd": 0}]}
            for i, p in enumerate(files.values())]


@pytest.mark.parametrize("decoder", DECODERS)
def test_training_mapper_and_test_loader_hand_the_model_the_upright_picture(photos, decoder):
    from wrn_det.data.det_loader import check_dataset_images

    cfg = _det_cfg(["DATALOADER.DECODE", decoder])
    fmt = cfg.INPUT.FORMAT
    enlarged = tuple(2 * v for v in BOX)
    dicts = _dicts(photos)
    check_dataset_images(dicts, "photos")  # the header check: every size upright
    mapper = DetectionMapper(cfg, True)
    for d in dicts:
        out = mapper(d, seed=5)
        assert "image" in out, out
        assert out["image"].shape == (3, 2 * H, 2 * W), d["file_name"]
        assert close(red_box(out["image"], fmt), enlarged, 3), d["file_name"]
        assert out["boxes"].tolist() == [list(map(float, enlarged))]  # the annotation lies on the red block
    n = 0
    for batch in build_detection_test_loader(cfg, dicts):
        for x in batch:
            assert x["image"].shape == (3, 2 * H, 2 * W) and close(red_box(x["image"], fmt), enlarged, 3), x["file_name"]
            n += 1
    assert n == len(dicts)


class RedBlockFinder(torch.nn.Module):
    """Stands in for a trained detector: one box around the red block of each image it is given, in the original
    image's pixels (as the detector returns them, from the input's ``height`` and ``width``)."""

    def __init__(self, fmt):
        super().__init__()
        self.fmt = fmt
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, inputs):
        out = []
        for x in inputs:
            h, w = x["image"].shape[-2:]
            x0, y0, x1, y1 = red_box(x["image"], self.fmt)
            sx, sy = x["width"] / w, x["height"] / h
            out.append({"boxes": torch.tensor([[x0 * sx, y0 * sy, x1 * sx, y1 * sy]]), "scores": torch.ones(1),
                        "classes": torch.zeros(1, dtype=torch.int64)})
        return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder: the config at test size 120 and the checkpoint of an untrained narrow detector."""
    from wrn_det.detection.modeling import build_detector
    from wrn_det.engine.config import save_config

    folder = tmp_path_factory.mktemp("tiny_run")
    cfg = _det_cfg(["MODEL.WRN.NAME", "wrn_10_1", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
                    "MODEL.DEVICE", "cpu"])
    torch.save({"model": build_detector(cfg).state_dict(),
                "metadata": {"thing_classes": ["block", "circle", "triangle"],
                             "contiguous_id_to_thing_dataset_id": {0: 1, 1: 2, 2: 3}}}, folder / "model_final.pth")
    save_config(cfg, str(folder / "config.yaml"))
    return folder


def test_predictor_returns_boxes_in_the_upright_pictures_pixels(photos, tiny_run):
    from wrn_det import Predictor

    p = Predictor(str(tiny_run / "config.yaml"), weights=str(tiny_run / "model_final.pth"), device="cpu")
    p.model = RedBlockFinder(p.input_format)
    for name, path in photos.items():
        with Image.open(path) as im:
            for image in (path, im):  # a path and a PIL image: turned upright
                out = p(image)
                assert (out["height"], out["width"]) == (H, W), name
                assert close(out["boxes"][0].tolist(), BOX, 2), (name, out["boxes"])
    # arrays and tensors are taken as given, as detectron2's predictor takes them: the stored, sideways pixels
    with Image.open(photos["png-6"]) as im:
        raw = np.asarray(im.convert("RGB"))
    for image in (raw, chw(raw)):
        out = p(image)
        assert (out["height"], out["width"]) == (W, H) and close(out["boxes"][0].tolist(), red_box(chw(raw)), 2)
    # a file that cannot be read is named as the user gave it
    with pytest.raises(WrnDetError, match="^image file nowhere/photo.jpg cannot be read: no such file$"):
        p("nowhere/photo.jpg")


def _run(name, argv, capsys):
    from helpers import load_tool

    from wrn_det.engine.cli import cli_main

    tool = load_tool(name)
    capsys.readouterr()
    status = cli_main(tool.main, tool.parse_args(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _broken_files(folder):
    """Files no reader can use, each for another reason: ``{file name: what the error line says}``."""
    good = io.BytesIO()
    Image.fromarray(upright()).save(good, "JPEG")
    files = {"cut.jpg": (good.getvalue()[:300], "cannot be read"), "text.png": (b"not an image", "cannot be read"),
             "empty.jpg": (b"", "cannot be read: empty file"),
             "tail.jpg": (good.getvalue()[:-2], "cannot be read: image file is truncated"),
             "bomb.tif": (_bomb_tiff(), "cannot be read: Image size (3600000000 pixels) exceeds limit")}
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: why for name, (_, why) in files.items()}


def test_demo_draws_upright_and_names_each_unreadable_file(photos, tiny_run, tmp_path, capsys, monkeypatch):
    import shutil

    from wrn_det.detection import predictor as predictor_module

    init = predictor_module.Predictor.__init__

    def with_finder(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.model = RedBlockFinder(self.input_format)

    monkeypatch.setattr(predictor_module.Predictor, "__init__", with_finder)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, path in photos.items():
        shutil.copy(path, inputs / f"{name}{path[path.rindex('.'):]}")
    save(Image.fromarray(upright()), inputs / "reference.png")
    broken = _broken_files(inputs)
    out, js = tmp_path / "pictures", tmp_path / "detections.json"
    status, stdout, err = _run("demo", ["--config-file", str(tiny_run / "config.yaml"), "--input", str(inputs),
                                        "--output", str(out), "--json", str(js),
                                        "MODEL.WEIGHTS", str(tiny_run / "model_final.pth")], capsys)
    assert status == 1, err  # some failed; the others were done
    lines = sorted(line for line in err.splitlines() if line.startswith("error:"))
    assert len(lines) == len(broken) == len(err.strip().splitlines()), err
    for line, (name, why) in zip(lines, sorted(broken.items())):
        assert line.startswith(f"error: image file {inputs / name} {why}") and line.endswith("(skipped)"), line
    done = len(photos) + 1
    assert f"{done} of {done + len(broken)} images" in stdout and f"{len(broken)} failed" in stdout
    results = json.loads(js.read_text())
    assert len(results) == done
    for r in results:
        x, y, w, h = r["bbox"]
        assert close((x, y, x + w, y + h), BOX, 2), r
    reference = _png(out / "reference.png")
    for name in photos:
        picture = _png(out / f"{name}.png")
        assert picture.shape == reference.shape, name  # drawn upright
        if name.startswith(EXACT):
            assert np.array_equal(picture, reference), name


def test_visualize_data_draws_the_annotations_on_the_upright_picture(photos, tmp_path, capsys, monkeypatch):
    import shutil

    from wrn_det.detection.visualize import enlarge_factor

    images = tmp_path / "datasets" / "coco" / "train2017"
    images.mkdir(parents=True)
    names = {}
    for name, path in photos.items():
        names[name] = f"{name}{path[path.rindex('.'):]}"
        shutil.copy(path, images / names[name])
    save(Image.fromarray(upright()), images / "reference.png")
    names["reference"] = "reference.png"
    names["cut"] = "cut.jpg"
    _broken_files(images)
    x0, y0, x1, y1 = BOX
    entries = [{"id": i + 1, "file_name": f, "height": H, "width": W} for i, f in enumerate(names.values())]
    annos = [{"id": i + 1, "image_id": i + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
              "category_id": 1, "iscrowd": 0} for i in range(len(entries))]
    write_coco_split(tmp_path / "datasets", "train2017", entries, annos, [{"id": 1, "name": "block"}], write_images=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    out = tmp_path / "pictures"
    status, stdout, err = _run("visualize_data", ["--config-file", "shapes_wrn_frcnn.yaml", "--source", "annotation",
                                                  "--dataset", "coco_2017_train", "--output", str(out)], capsys)
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1, err  # the one unreadable image named and skipped, the others drawn
    assert lines[0].startswith(f"error: image file {images / 'cut.jpg'} cannot be read: ") and lines[0].endswith(
        "(skipped)"), err
    assert "1 images failed" in stdout
    rows = H * enlarge_factor(H, W)  # the drawn picture under its caption
    reference = _png(out / "reference.png")[-rows:]
    for name, f in names.items():
        if name.startswith(EXACT):
            assert np.array_equal(_png(out / f"{f[:f.rindex('.')]}.png")[-rows:], reference), name


@pytest.mark.parametrize("decoder", ["pil", "torchvision", "cv2", "cuda"])
def test_imagenet_loaders_hand_over_the_upright_picture(photos, tmp_path, decoder):
    import shutil

    from wrn_det.data.classification import read_imagenet

    kept = {n: p for n, p in photos.items() if p.endswith((".jpg", ".png", ".tif", ".webp"))}  # ImageFolder's kinds
    (tmp_path / "val" / "n0").mkdir(parents=True)
    for i, path in enumerate(kept.values()):
        shutil.copy(path, tmp_path / "val" / "n0" / f"{i:03d}{path[path.rindex('.'):]}")
    ds = read_imagenet(str(tmp_path), False, None, decoder)
    assert len(ds) == len(kept)
    samples = [ds[i][0] for i in range(len(ds))]
    if decoder == "cuda":
        # the workers hand over JPEG bytes with the upright size (other files decoded there); the batch is decoded
        # (nvJPEG on a GPU, here the CPU) and turned upright before the crops are cut
        assert all((s.height, s.width) == (H, W) for s in samples)
        assert {s.orientation for s in samples if s.data is not None} == set(range(1, 9))
        assert any(s.data is None for s in samples)  # PNGs, TIFFs, WebPs, the CMYK JPEG
        images = decode.decode_encoded(samples, "cpu")
        for img, (path, _) in zip(images, ds.samples):
            assert torch.equal(img, decode.read_image(path, "RGB", "torchvision")), path
        crops = decode.gpu_crop_resize(images, [(BOX[1], BOX[0], BOX[3] - BOX[1], BOX[2] - BOX[0])] * len(images),
                                       [False] * len(images), 16)
        assert (crops[:, 0] > 160).all() and (crops[:, 1:] < 90).all()  # the red block, cut from the upright picture
        return
    for x, (path, _) in zip(samples, ds.samples):
        img = chw(np.asarray(x)) if decoder == "pil" else x
        assert img.shape == (3, H, W) and close(red_box(img), BOX, 1), path


def test_a_trained_detector_sees_a_sideways_photo_as_the_upright_one(trained_shapes_detector, tmp_path):
    """The session's shapes detector on held-out pictures stored sideways (EXIF 6, 8, 3) and as 16-bit colour PNGs
    (EXIF 5): the very detections of the upright picture, in its pixels."""
    from pathlib import Path

    from wrn_det import Predictor

    run = trained_shapes_detector
    p = Predictor(str(run.dir / "config.yaml"), weights=run.weights, device="cpu")
    val = sorted((Path(run.datasets_root) / "coco" / "val2017").glob("*.jpg"))[:3]
    found = 0
    for k, (path, o) in enumerate(zip(val, (6, 8, 3))):
        with Image.open(path) as im:
            pic = np.asarray(im.convert("RGB"))
        expected = p(chw(pic))
        found += len(expected["boxes"])
        for f in (save(stored(pic, o), tmp_path / f"{k}.png", o), _cv2_png16(pic, tmp_path / f"{k}_16.png", 5)):
            got = p(f)
            assert torch.equal(got["boxes"], expected["boxes"]) and torch.equal(got["scores"], expected["scores"]), f
            assert (got["height"], got["width"]) == pic.shape[:2]
    assert found >= 3
