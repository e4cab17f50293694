"""DATALOADER.DECODE: every decoder gives the same pixels, bad files are one-line errors, and the
ImageNet options (workers' tensors, GPU crops) give the recipe's crops."""
import random

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from wrn_det.classification.config import get_cls_cfg
from wrn_det.data import decode
from wrn_det.data.classification import build_cls_datasets
from wrn_det.data.cls_loader import build_imagenet_loader, imagenet_transforms
from wrn_det.data.det_loader import DetectionMapper
from wrn_det.detection.config import get_det_cfg
from wrn_det.engine.config import load_config
from wrn_det.engine.errors import ConfigError, WrnDetError


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 7.0 + c) * np.cos(y / 11.0) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(path, h=48, w=64, seed=0):
    cv2.imwrite(str(path), _photo(h, w, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return str(path)


def test_decoders_give_the_same_pixels_in_either_channel_order(tmp_path):
    path = _jpeg(tmp_path / "a.jpg")
    bgr = cv2.imread(path)
    ref = torch.from_numpy(bgr).permute(2, 0, 1)
    for decoder in ("torchvision", "cv2"):
        assert torch.equal(decode.read_image(path, "BGR", decoder), ref), decoder
        assert torch.equal(decode.read_image(path, "RGB", decoder), ref.flip(0)), decoder
    pil = decode.read_image(path, "BGR", "pil")
    assert pil.shape == ref.shape and (pil.int() - ref.int()).abs().float().mean() < 1.0
    png = tmp_path / "b.png"
    cv2.imwrite(str(png), bgr)
    assert torch.equal(decode.read_image(str(png), "RGB", "torchvision"), ref.flip(0))


@pytest.mark.parametrize("decoder", ["torchvision", "cv2", "pil"])
def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path, decoder):
    good = open(_jpeg(tmp_path / "g.jpg"), "rb").read()
    files = {"missing.jpg": None, "empty.jpg": b"", "text.jpg": b"not an image at all", "header.jpg": good[:40],
             "noise.jpg": b"\xff\xd8" + bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))}
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(WrnDetError) as e:
            decode.read_image(str(tmp_path / name), "RGB", decoder)
        msg = str(e.value)
        assert "\n" not in msg and f"image file {tmp_path / name} cannot be read" in msg, (name, msg)
        if name == "missing.jpg":
            assert msg.endswith("no such file")


def test_jpeg_bytes_and_size_for_gpu_decoding(tmp_path):
    path = _jpeg(tmp_path / "a.jpg", 37, 53)
    enc = decode.read_bytes(path)
    assert (enc.height, enc.width) == (37, 53) and enc.data.dtype == torch.uint8
    assert bytes(enc.data.numpy()) == open(path, "rb").read()
    for name, data in {"trunc.jpg": open(path, "rb").read()[:30], "png.jpg": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                       "zero.jpg": b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x00" + b"\0" * 20}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WrnDetError, match=f"{name} cannot be read"):
            decode.read_bytes(str(tmp_path / name))


def test_enlarging_resize_needs_no_antialiasing():
    assert not decode.resize_antialias(480, 640, 800, 1333)
    assert decode.resize_antialias(480, 640, 400, 1333)
    assert decode.resize_antialias(480, 2000, 800, 1333)  # the long side's cap shrinks it
    img = torch.from_numpy(_photo(30, 41)).permute(2, 0, 1).contiguous()
    for size in ([64, 87], [31, 42], [100, 300]):
        assert torch.equal(TF.resize(img, size, antialias=True), TF.resize(img, size, antialias=False)), size


def test_detection_mapper_decoders_agree_and_bad_value_is_an_error(tmp_path):
    path = _jpeg(tmp_path / "a.jpg", 60, 80)
    d = {"file_name": path, "height": 60, "width": 80, "image_id": 1,
         "annotations": [{"bbox": [5.0, 6.0, 30.0, 20.0], "category_id": 1, "iscrowd": 0}]}
    outs = {}
    for decoder in ("torchvision", "cv2"):
        cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", ["INPUT.MIN_SIZE_TRAIN", "(90,)",
                                                                   "DATALOADER.DECODE", decoder])
        outs[decoder] = DetectionMapper(cfg, True)(d, seed=3)
    assert torch.equal(outs["torchvision"]["image"], outs["cv2"]["image"])
    assert torch.equal(outs["torchvision"]["boxes"], outs["cv2"]["boxes"])
    cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", ["DATALOADER.DECODE", "libjpeg"])
    with pytest.raises(ConfigError, match="DATALOADER.DECODE must be one of torchvision, cv2, pil, got 'libjpeg'"):
        DetectionMapper(cfg, True)


def _imagenet(root):
    for c in range(2):
        (root / "train" / f"n{c}").mkdir(parents=True)
        (root / "val" / f"n{c}").mkdir(parents=True)
        for i in range(2):
            _jpeg(root / "train" / f"n{c}" / f"{i}.jpg", 90 + 10 * i, 120, seed=c * 2 + i)
            _jpeg(root / "val" / f"n{c}" / f"{i}.jpg", 100, 80 + 20 * i, seed=9 + i)


def _cls_cfg(root, decoder):
    return load_config(get_cls_cfg(), None, ["DATASETS.NAME", "imagenet", "DATASETS.ROOT", str(root),
                                             "DATALOADER.DECODE", decoder, "INPUT.TRAIN_CROP_SIZE", "32",
                                             "INPUT.TEST_RESIZE", "40", "INPUT.TEST_CROP_SIZE", "32"])


def test_imagenet_decoders_give_the_recipe_crops(tmp_path):
    _imagenet(tmp_path)
    for decoder in ("pil", "torchvision", "cv2"):
        cfg = _cls_cfg(tmp_path, decoder)
        tr, te = imagenet_transforms(32, 40, 32)
        train, test = build_cls_datasets(cfg, tr, te)
        for ds in (train, test):
            x, y = ds[1]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.shape == (3, 32, 32), decoder
            assert y in (0, 1)
    # the centre crop of the test transform is deterministic: the tensor decoders give PIL's crop to a grey level or so
    tr, te = imagenet_transforms(32, 40, 32)
    crops = {dec: build_cls_datasets(_cls_cfg(tmp_path, dec), tr, te)[1][0][0].int() for dec in ("pil", "torchvision")}
    assert (crops["pil"] - crops["torchvision"]).abs().float().mean() < 3.0


def test_cuda_decoding_draws_crops_in_workers_and_needs_a_gpu(tmp_path):
    _imagenet(tmp_path)
    tr, te = imagenet_transforms(32, 40, 32)
    train, test = build_cls_datasets(_cls_cfg(tmp_path, "cuda"), tr, te)
    sample, label = train[0]
    t, l, h, w = sample.box
    assert 0 <= t and 0 <= l and t + h <= sample.image.height and l + w <= sample.image.width and h > 0 and w > 0
    crops, labels = decode.collate_crops([train[i] for i in range(len(train))])
    assert len(crops) == 4 and labels.tolist() == [0, 0, 1, 1]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="DATALOADER.DECODE cuda decodes on the GPU; this run has no CUDA"):
            build_imagenet_loader(train, 4, True, 0, 0, 0, 1)


def test_gpu_crop_resize_equals_torchvision_resized_crop():
    rng = random.Random(0)
    imgs = [torch.from_numpy(_photo(h, w, i)).permute(2, 0, 1).contiguous() for i, (h, w) in
            enumerate([(90, 120), (40, 30), (200, 150)])]
    boxes = [decode.sample_crop(im.shape[1], im.shape[2], rng) for im in imgs]
    out = decode.gpu_crop_resize(imgs, boxes, [False, True, False], 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    for i, (im, (t, l, h, w)) in enumerate(zip(imgs, boxes)):
        ref = TF.resized_crop(im, t, l, h, w, [32, 32], antialias=True)
        ref = ref.flip(-1) if i == 1 else ref
        assert (out[i].int() - ref.int()).abs().max() <= 1, i
    for _ in range(200):  # RandomResizedCrop's boxes always lie inside the image
        hh, ww = rng.randint(1, 300), rng.randint(1, 300)
        t, l, h, w = decode.sample_crop(hh, ww, rng)
        assert 0 <= t and 0 <= l and 0 < h and 0 < w and t + h <= hh and l + w <= ww


def test_imagenet_colour_steps_with_every_decoder(tmp_path):
    """The recipe's colour jitter and lighting run after the crop whichever decoder reads the file."""
    from torchvision.transforms import v2

    from wrn_det.data.cls_loader import Lighting

    _imagenet(tmp_path)
    tr, te = imagenet_transforms(32, 40, 32, (0.4, 0.4, 0.4), 0.1)
    for decoder in ("pil", "torchvision"):
        train, _ = build_cls_datasets(_cls_cfg(tmp_path, decoder), tr, te)
        torch.manual_seed(0)
        x, _ = train[0]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32), decoder
        assert 0 <= float(x.mean()) <= 255 and float(x.std()) > 1, decoder  # the 0-255 scale of PIXEL_MEAN
    # GPU decoding: the workers draw the crop, the colour steps travel with it to run on the decoded batch
    train, test = build_cls_datasets(_cls_cfg(tmp_path, "cuda"), tr, te)
    after = train.transform.after
    kinds = [type(t) for t in after.transforms]
    assert v2.ColorJitter in kinds and Lighting in kinds and test.transform.after is None
    out = after(torch.full((3, 32, 32), 128, dtype=torch.uint8))
    assert out.dtype == torch.float32 and abs(float(out.mean()) - 128) < 80


def test_gpu_decode_batch_is_rgb_and_upright_for_every_file(tmp_path):
    """The GPU path's batch decoding (run here on the CPU): grayscale JPEGs come out RGB, files nvJPEG is not given
    (PNG, CMYK JPEG) arrive decoded by the workers, and every picture equals what read_image gives."""
    from PIL import Image

    rgb = _photo(24, 40)
    paths = [_jpeg(tmp_path / "a.jpg", 24, 40)]
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).save(tmp_path / "b.png")
    paths += [str(tmp_path / n) for n in ("gray.jpg", "cmyk.jpg", "b.png")]
    encoded = [decode.read_bytes(p) for p in paths]
    assert [e.data is not None for e in encoded] == [True, True, False, False]
    for img, e, p in zip(decode.decode_encoded(encoded, "cpu"), encoded, paths):
        assert img.shape == (3, e.height, e.width) and torch.equal(img, decode.read_image(p, "RGB", "torchvision")), p
