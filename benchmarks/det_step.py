"""Detection training time per iteration and inference time per image.

Same synthetic images (random pixels, a few random boxes each) and sizes for every
row; each training iteration is forward, backward and an SGD step; inference is one
image at a time in eval mode. Rows:

* builtin engine, WRN-34-2-FPN (``configs/COCO-Detection/wrn34_2_frcnn.yaml``);
* builtin engine, ResNet-50-FPN (the same config with ``MODEL.WRN.NAME wide_resnet50_1``,
  which is torchvision's ResNet-50 layout);
* torchvision's own ``fasterrcnn_resnet50_fpn`` (FrozenBN, res2..res5 trained, as above);
* detectron2's engine, WRN-34-2-FPN, the same config through ``wrn_det.d2`` (when
  detectron2 is installed).

Goal: the builtin engine no slower than detectron2's on the same backbone and images.
Sizes default to a short side of 256 so that the CPU rows finish in a few minutes.

    python benchmarks/det_step.py [--size 256] [--batch 2] [--iters 3] [--device cpu]
"""
import argparse
import logging
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

CONFIG = "COCO-Detection/wrn34_2_frcnn.yaml"


def make_inputs(n: int, size: int, seed: int = 0):
    """Return ``n`` dicts with a uint8 image of short side ``size`` (4:3), XYXY ``boxes`` and ``classes``."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, size * 4 // 3
    out = []
    for _ in range(n):
        k = 6
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        out.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
                    "boxes": torch.cat([xy, xy + wh], 1), "classes": torch.randint(0, 80, (k,), generator=g),
                    "height": h, "width": w})
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(train_step, infer_one, inputs, iters: int, batch: int, device) -> tuple:
    """Return (median seconds per training iteration, median seconds per image in inference)."""
    train_step(inputs[:batch])  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for i in range(iters):
        b = inputs[(i * batch) % len(inputs):][:batch]
        _sync(device)
        t = time.perf_counter()
        train_step(b)
        _sync(device)
        times.append(time.perf_counter() - t)
    infer_one(inputs[0])
    inf = []
    for x in inputs[:max(iters, 2)]:
        _sync(device)
        t = time.perf_counter()
        infer_one(x)
        _sync(device)
        inf.append(time.perf_counter() - t)
    return statistics.median(times), statistics.median(inf)


def builtin_row(opts, inputs, a, device):
    """Time the builtin engine's Faster R-CNN built from CONFIG with ``opts``."""
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.modeling import build_detector
    from wrn_det.engine.config import load_config

    torch.manual_seed(0)
    cfg = load_config(get_det_cfg(), CONFIG, ["MODEL.DEVICE", str(device)] + opts)
    model = build_detector(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step(batch):
        model.train()
        loss = sum(model(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer_one(x):
        model.eval()
        model([x])

    return time_model(train_step, infer_one, inputs, a.iters, a.batch, device)


def torchvision_row(inputs, a, device):
    """Time torchvision's fasterrcnn_resnet50_fpn (FrozenBN, res2..res5 trained) on the same inputs."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=4)
    # min_size = the images' short side: torchvision's transform then leaves them at that size
    model = FasterRCNN(backbone, num_classes=81, min_size=a.size, max_size=a.size * 2).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def to_tv(batch):
        imgs = [x["image"].to(device).float() / 255 for x in batch]
        tg = [{"boxes": x["boxes"].to(device), "labels": x["classes"].to(device) + 1} for x in batch]
        return imgs, tg

    def train_step(batch):
        model.train()
        imgs, tg = to_tv(batch)
        loss = sum(model(imgs, tg).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer_one(x):
        model.eval()
        model(to_tv([x])[0])

    return time_model(train_step, infer_one, inputs, a.iters, a.batch, device)


def detectron2_row(inputs, a, device):
    """Time detectron2's GeneralizedRCNN with the WRN-34-2-FPN backbone of ``wrn_det.d2``; None without detectron2."""
    try:
        from detectron2.modeling import build_model
        from detectron2.structures import Boxes, Instances
        from detectron2.utils.events import EventStorage

        from wrn_det.d2.train import build_config
    except ImportError:
        return None
    torch.manual_seed(0)
    cfg = build_config(CONFIG, ["MODEL.DEVICE", str(device)])
    model = build_model(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def to_d2(x):
        h, w = x["image"].shape[-2:]
        inst = Instances((h, w), gt_boxes=Boxes(x["boxes"]), gt_classes=x["classes"])
        return {"image": x["image"], "instances": inst, "height": h, "width": w}

    def train_step(batch):
        model.train()
        with EventStorage(0):  # detectron2's heads log their statistics into it
            loss = sum(model([to_d2(x) for x in batch]).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer_one(x):
        model.eval()
        model([{"image": x["image"], "height": x["height"], "width": x["width"]}])

    return time_model(train_step, infer_one, inputs, a.iters, a.batch, device)


def main() -> int:
    """Print the table and the goal line; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="short side of the images")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    logging.getLogger("wrn_det").setLevel(logging.WARNING)
    device = torch.device(a.device)
    inputs = make_inputs(max(a.batch * a.iters, 2), a.size)
    print(f"{device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads; images {a.size}x{a.size * 4 // 3}, "
          f"batch {a.batch}, median of {a.iters} iterations")
    rows = [
        ("builtin, WRN-34-2-FPN", lambda: builtin_row([], inputs, a, device)),
        ("builtin, ResNet-50-FPN", lambda: builtin_row(["MODEL.WRN.NAME", "wide_resnet50_1"], inputs, a, device)),
        ("torchvision fasterrcnn_resnet50_fpn", lambda: torchvision_row(inputs, a, device)),
        ("detectron2, WRN-34-2-FPN", lambda: detectron2_row(inputs, a, device)),
    ]
    print(f"{'engine, backbone':<38}{'s/iter (train)':>15}{'s/image (test)':>16}")
    res = {}
    for name, fn in rows:
        r = fn()
        res[name] = r
        if r is None:
            print(f"{name:<38}{'detectron2 not installed':>31}")
        else:
            print(f"{name:<38}{r[0]:>15.3f}{r[1]:>16.3f}", flush=True)
    ours, d2 = res["builtin, WRN-34-2-FPN"], res["detectron2, WRN-34-2-FPN"]
    wrn, r50 = ours, res["builtin, ResNet-50-FPN"]
    print(f"WRN-34-2-FPN / ResNet-50-FPN on the builtin engine: training {wrn[0] / r50[0]:.2f}x, "
          f"inference {wrn[1] / r50[1]:.2f}x the time")
    if d2 is None:
        print("goal: builtin no slower than detectron2: not measured (detectron2 is not installed)")
    else:
        tr, inf = d2[0] / ours[0], d2[1] / ours[1]
        met = tr >= 1.0 and inf >= 1.0
        print(f"goal: builtin no slower than detectron2 (detectron2 time / builtin time): measured training {tr:.2f}x, "
              f"inference {inf:.2f}x, goal >= 1.00x, {'met' if met else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
