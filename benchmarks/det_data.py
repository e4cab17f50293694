"""The detection data path alone at COCO size: images per second of one DataLoader worker.

The benchmark writes 200 photo-like JPEGs of 640x480 (smooth gradients, shapes and
textured noise; about the 160 KB of an average COCO image) with seven boxes each, then
maps them for training the way each library's loader does: decode, resize to short side
800 (long side at most 1333), random horizontal flip, boxes along; then pads every
``--batch`` of them into one uint8 batch (the same code for every side). One process, one
thread (a DataLoader worker), sides alternating in rounds over all images, medians
reported:

* ``ours``: the builtin engine's ``DetectionMapper`` (``DATALOADER.DECODE torchvision``,
  the default: ``torchvision.io.decode_jpeg``);
* ``ours-cv2``: the same with ``DATALOADER.DECODE cv2`` (``cv2.imread``);
* ``detectron2``: detectron2's ``DatasetMapper`` with its default augmentations
  (``ResizeShortestEdge`` + ``RandomFlip``, PIL decoding), when detectron2 is installed;
* ``torchvision``: torchvision's detection reference transforms (PIL decoding,
  ``transforms.v2`` on the PIL image and its ``BoundingBoxes``, then ``PILToTensor``),
  with the resize that its model would otherwise do.

With ``--gpu`` (and CUDA) it also times decoding the same files in batches on the GPU
(``decode_jpeg(device="cuda")``, nvJPEG), with the resize and flip there.

Goal: ours at least 1.5x detectron2's ``DatasetMapper`` per worker.

``--exif N`` gives every file an EXIF block with orientation N, as phone photos carry one
(N 6: stored sideways, 480x640 upright; the reader turns it, detectron2's too, the torchvision
reference does not); without it the files have none, as most datasets' files. ``--sides``
times only the named sides (``ours,ours-cv2``: the reader's cost alone, quicker).

    python benchmarks/det_data.py [--images 200] [--rounds 3] [--batch 2] [--gpu] [--exif N] [--sides a,b]
"""
import argparse
import os
import random
import struct
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_utils import alternate, median, result, timed, write_photo_jpegs  # noqa: E402

GOAL = 1.5
SIZE, MAX_SIZE = 800, 1333


def add_exif(path: str, orientation: int) -> None:
    """Put an EXIF APP1 segment with ``orientation`` right after the JPEG's start marker (where cameras put it)."""
    tiff = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    segment = b"Exif\x00\x00" + tiff
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[2:])


def make_dicts(folder: str, n: int, seed: int = 0, exif: int = 0):
    """Write ``n`` photo-like 640x480 JPEGs under ``folder`` (with EXIF orientation ``exif`` when given); return
    detectron2-style dataset dicts (XYWH boxes, sizes upright)."""
    paths = write_photo_jpegs(folder, [(480, 640)] * n, seed)
    for p in paths if exif else []:
        add_exif(p, exif)
    h, w = (640, 480) if exif >= 5 else (480, 640)
    rng = np.random.default_rng(seed)
    dicts = []
    for i, p in enumerate(paths):
        xy = rng.uniform(0, [500, 350], (7, 2))
        wh = rng.uniform(10, 130, (7, 2))
        annos = [{"bbox": [float(a), float(b), float(c), float(d)], "bbox_mode": 1, "category_id": int(k),
                  "iscrowd": 0} for (a, b), (c, d), k in zip(xy, wh, rng.integers(0, 80, 7))]
        dicts.append({"file_name": p, "height": h, "width": w, "image_id": i, "annotations": annos})
    return dicts


def pad_batch(images):
    """Return the uint8 images (3, H, W) zero-padded into one (N, 3, Hmax, Wmax) batch (multiples of 32)."""
    h = -(-max(im.shape[1] for im in images) // 32) * 32
    w = -(-max(im.shape[2] for im in images) // 32) * 32
    out = images[0].new_zeros((len(images), 3, h, w))
    for o, im in zip(out, images):
        o[:, :im.shape[1], :im.shape[2]].copy_(im)
    return out


def ours_mapper(decoder: str):
    """Return ``map(d, i) -> image tensor`` of the builtin engine's training mapper with ``decoder``."""
    from wrn_det.data.det_loader import DetectionMapper
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    cfg = load_config(get_det_cfg(), "COCO-Detection/wrn34_2_frcnn.yaml",
                      ["INPUT.MIN_SIZE_TRAIN", f"({SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(MAX_SIZE),
                       "DATALOADER.DECODE", decoder])
    mapper = DetectionMapper(cfg, True)

    def run(d, i):
        out = mapper(d, i)
        if "image" not in out:
            raise RuntimeError(out.get("message"))
        return out["image"]
    return run


def d2_mapper():
    """Return detectron2's DatasetMapper (train, default augmentations at short side 800) or None."""
    try:
        from detectron2.config import get_cfg
        from detectron2.data import DatasetMapper
    except ImportError:
        return None
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = MAX_SIZE
    cfg.INPUT.FORMAT = "RGB"
    mapper = DatasetMapper(cfg, is_train=True)

    def run(d, i):
        random.seed(i)
        np.random.seed(i % (2 ** 32))
        return mapper(dict(d))["image"]
    return run


def torchvision_mapper():
    """Return torchvision's detection reference transforms (PIL), with the resize its model would do."""
    from PIL import Image
    from torchvision import tv_tensors
    from torchvision.ops import box_convert
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(SIZE, max_size=MAX_SIZE, antialias=True), v2.RandomHorizontalFlip(0.5),
                     v2.PILToTensor(), v2.SanitizeBoundingBoxes()])

    def run(d, i):
        torch.manual_seed(i)
        img = Image.open(d["file_name"]).convert("RGB")
        b = torch.tensor([a["bbox"] for a in d["annotations"]])
        boxes = tv_tensors.BoundingBoxes(box_convert(b, "xywh", "xyxy"), format="XYXY",
                                         canvas_size=(img.height, img.width))
        target = {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in d["annotations"]])}
        image, _ = tf(img, target)
        return image
    return run


def gpu_side(dicts, batch: int):
    """Return a side decoding ``batch`` files at a time on the GPU (nvJPEG), resizing and flipping there."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg, read_file

    dev = torch.device("cuda")

    def run(_):
        def go():
            for s in range(0, len(dicts), batch):
                chunk = dicts[s:s + batch]
                imgs = decode_jpeg([read_file(d["file_name"]) for d in chunk], device=dev)
                out = []
                for k, im in enumerate(imgs):
                    h, w = im.shape[-2:]
                    scale = min(SIZE / min(h, w), MAX_SIZE / max(h, w))
                    y = F.interpolate(im[None].float(), size=(round(h * scale), round(w * scale)), mode="bilinear",
                                      align_corners=False, antialias=scale < 1)[0].round_().clamp_(0, 255)
                    out.append((y.flip(-1) if (s + k) % 2 else y).to(torch.uint8))
                pad_batch(out)
        return len(dicts) / timed(go, dev)
    return run


def cpu_side(fn, dicts, batch: int):
    """Return a side running ``fn`` over all dicts and padding every ``batch`` of them; it returns images/s."""
    def run(r):
        def go():
            for s in range(0, len(dicts), batch):
                pad_batch([fn(d, (r + 2) * 100000 + s + k) for k, d in enumerate(dicts[s:s + batch])])
        return len(dicts) / timed(go)
    return run


def main() -> int:
    """Print images/s per side and the RESULT lines; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="also time nvJPEG batch decoding (needs CUDA)")
    p.add_argument("--exif", type=int, default=0, choices=range(0, 9), metavar="N",
                   help="give every file an EXIF block with orientation N (1-8; 0: none, the default)")
    p.add_argument("--sides", default="", help="comma-separated sides to time (default: all)")
    a = p.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker
    import cv2

    cv2.setNumThreads(0)
    with tempfile.TemporaryDirectory() as tmp:
        dicts = make_dicts(tmp, a.images, exif=a.exif)
        kb = sum(os.path.getsize(d["file_name"]) for d in dicts) / len(dicts) / 1000
        wanted = set(a.sides.split(",")) if a.sides else None
        makers = {"ours": lambda: ours_mapper("torchvision"), "ours-cv2": lambda: ours_mapper("cv2"),
                  "detectron2": d2_mapper, "torchvision": torchvision_mapper}
        if wanted is not None and not wanted <= set(makers) | {"gpu-nvjpeg"}:
            p.error(f"--sides: unknown {', '.join(sorted(wanted - set(makers)))}; "
                    f"choose from {', '.join(makers)}, gpu-nvjpeg")
        sides = {}
        for k, make in makers.items():
            fn = make() if wanted is None or k in wanted else None
            if fn is not None:
                sides[k] = cpu_side(fn, dicts, a.batch)
        d2 = sides.get("detectron2")
        if a.gpu and torch.cuda.is_available() and (wanted is None or "gpu-nvjpeg" in wanted):
            sides["gpu-nvjpeg"] = gpu_side(dicts, max(a.batch, 16))
        exif = f", EXIF orientation {a.exif}" if a.exif else ""
        print(f"{a.images} JPEGs of 640x480{exif} ({kb:.0f} KB on average) -> short side {SIZE} (long <= {MAX_SIZE}), "
              f"flip, batches of {a.batch}; one process, one thread; median of {a.rounds} alternating rounds")
        res = {k: median(v) for k, v in alternate(sides, a.rounds, warmup=True).items()}
    labels = {"ours": "ours (DetectionMapper, torchvision decode)", "ours-cv2": "ours (DetectionMapper, cv2 decode)",
              "detectron2": "detectron2 DatasetMapper", "torchvision": "torchvision reference transforms",
              "gpu-nvjpeg": "GPU nvJPEG batches (+ resize, flip)"}
    for k, v in res.items():
        print(f"{labels[k]:<46}{v:>9.1f} images/s")
    if d2 is None and (wanted is None or "detectron2" in wanted):
        print("detectron2 DatasetMapper: detectron2 not installed")
    if "ours" not in res:
        return 0
    if "ours-cv2" in res:
        print(f"decoder: torchvision {res['ours']:.1f} vs cv2 {res['ours-cv2']:.1f} images/s "
              f"(the default, DATALOADER.DECODE torchvision, should be the faster)")
    if wanted is None or "detectron2" in wanted:
        result("det_data_ours_over_d2_mapper", res["ours"] / res["detectron2"] if d2 is not None else None, GOAL,
               note="" if d2 is not None else "detectron2 not installed")
    if "torchvision" in res:
        result("det_data_ours_over_torchvision_reference", res["ours"] / res["torchvision"], 1.0)
    if "ours-cv2" in res:
        result("det_data_default_decoder_is_fastest", res["ours"] / max(res["ours"], res["ours-cv2"]), 1.0,
               note="torchvision / best of torchvision, cv2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
