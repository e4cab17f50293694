"""The ImageNet training data path: decode, RandomResizedCrop(224), flip; images per second per worker.

The benchmark writes ``--images`` photo-like JPEGs of ImageNet's sizes (sides of 300-500
pixels, about 110 KB) as an ``ImageFolder`` tree and reads them through the project's
``read_imagenet`` with each ``DATALOADER.DECODE`` option and the matching transforms
(:mod:`wrn_det.data.decode`), one process and one thread (a DataLoader worker), the
options alternating in rounds over all images, medians reported:

* ``pil``: PIL decoding and torchvision's PIL transforms (the recipe's reference path);
* ``torchvision``: ``torchvision.io.decode_jpeg`` and the same transforms on tensors;
* ``cv2``: OpenCV decoding, the same transforms on tensors;
* ``cuda`` (with CUDA): the worker only reads the bytes and draws the crop box; the main
  process decodes batches of ``--batch`` on the GPU (nvJPEG) and crops, resizes and flips
  there. Its rate is the smaller of ``--workers`` x the worker rate and the GPU's rate.

What it must feed: ``benchmarks/gpu.py --model wide_resnet50_2`` prints the training
step rate of WRN-50-2 on the GPU; pass it as ``--gpu-rate`` (the GPU script does). The
CPU options' feed rate is taken as ``--workers`` (16) x the one-worker rate.

Goal (GPU): one option feeds at least 1.2x the WRN-50-2 step rate on one GPU with 16 CPU cores.

    python benchmarks/imagenet_data.py [--images 200] [--rounds 3] [--workers 16] [--gpu-rate IMG_PER_S]
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_utils import alternate, median, result, timed, write_photo_jpegs  # noqa: E402

GOAL = 1.2


def write_imagefolder(root: str, n: int, seed: int = 0) -> None:
    """Write ``n`` JPEGs of ImageNet-like sizes as ``root/train/<class>/<image>.jpg`` (10 classes)."""
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(300, 501)), int(rng.integers(300, 501))) for _ in range(n)]
    for c in range(10):
        write_photo_jpegs(os.path.join(root, "train", f"n{c:08d}"), sizes[c::10], seed + c)


def cpu_side(dataset):
    """Return a side reading every image of ``dataset`` once; it returns images/s."""
    def run(_):
        def go():
            for i in range(len(dataset)):
                x, _ = dataset[i]
                if x.shape[-2:] != (224, 224):
                    raise RuntimeError(f"unexpected output {tuple(x.shape)}")
        return len(dataset) / timed(go)
    return run


def gpu_side(dataset, batch: int):
    """Return a side decoding the ``cuda`` option's worker output on the GPU in batches; it returns images/s."""
    from wrn_det.data.decode import collate_crops, gpu_crop_resize
    from torchvision.io import decode_jpeg

    dev = torch.device("cuda")
    samples = [dataset[i] for i in range(len(dataset))]

    def run(_):
        def go():
            for s in range(0, len(samples), batch):
                crops, _ = collate_crops(samples[s:s + batch])
                imgs = decode_jpeg([c.image.data for c in crops], device=dev)
                gpu_crop_resize(imgs, [c.box for c in crops], [c.flip for c in crops], 224)
        return len(samples) / timed(go, dev)
    return run


def main() -> int:
    """Print images/s per option and the RESULT lines; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=16, help="CPU cores (DataLoader workers) of the GPU machine")
    p.add_argument("--batch", type=int, default=256, help="GPU decoding batch")
    p.add_argument("--gpu-rate", type=float, default=0.0,
                   help="WRN-50-2 training images/s on the GPU (benchmarks/gpu.py --model wide_resnet50_2)")
    a = p.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(0)
    from wrn_det.data.classification import read_imagenet
    from wrn_det.data.cls_loader import imagenet_transforms
    from wrn_det.data.decode import imagenet_transforms_for

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        write_imagefolder(tmp, a.images)
        kb = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(tmp) for f in fs) / a.images / 1000
        train_tf, test_tf = imagenet_transforms()
        sides, datasets = {}, {}
        for decoder in ("pil", "torchvision", "cv2") + (("cuda",) if cuda else ()):
            tf, _ = imagenet_transforms_for(decoder, train_tf, test_tf)
            datasets[decoder] = read_imagenet(tmp, True, tf, decoder)
        for decoder in ("pil", "torchvision", "cv2"):
            sides[decoder] = cpu_side(datasets[decoder])
        if cuda:
            def worker(_, ds=datasets["cuda"]):
                return len(ds) / timed(lambda: [ds[i] for i in range(len(ds))])
            sides["cuda-worker"] = worker
            sides["cuda-gpu"] = gpu_side(datasets["cuda"], a.batch)
        print(f"{a.images} JPEGs of 300-500 pixels a side ({kb:.0f} KB on average), RandomResizedCrop(224) + flip; "
              f"one process, one thread; median of {a.rounds} alternating rounds")
        res = {k: median(v) for k, v in alternate(sides, a.rounds).items()}
    feed = {k: a.workers * res[k] for k in ("pil", "torchvision", "cv2")}
    for k in ("pil", "torchvision", "cv2"):
        print(f"DATALOADER.DECODE {k:<12}{res[k]:>9.1f} images/s per worker  -> {a.workers} workers: {feed[k]:>8.0f}")
    if cuda:
        feed["cuda"] = min(a.workers * res["cuda-worker"], res["cuda-gpu"])
        print(f"DATALOADER.DECODE {'cuda':<12}{res['cuda-worker']:>9.1f} images/s per worker (bytes + crop box), "
              f"GPU decode+crop {res['cuda-gpu']:.0f} images/s -> {feed['cuda']:.0f}")
    best = max(feed, key=feed.get)
    print(f"fastest option: DATALOADER.DECODE {best} ({feed[best]:.0f} images/s)")
    print(f"torchvision / PIL per worker: {res['torchvision'] / res['pil']:.2f}x, cv2 / PIL: {res['cv2'] / res['pil']:.2f}x")
    if a.gpu_rate > 0:
        result("imagenet_data_feed_over_wrn50_2_step_rate", feed[best] / a.gpu_rate, GOAL,
               note=f"DATALOADER.DECODE {best}, {a.workers} workers, WRN-50-2 at {a.gpu_rate:.0f} img/s")
    else:
        result("imagenet_data_feed_over_wrn50_2_step_rate", None, GOAL,
               note="needs --gpu-rate from benchmarks/gpu.py --model wide_resnet50_2 on a GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
