#!/usr/bin/env python
"""How far an exported detector's detections are from PyTorch's, at COCO size, on photo-like images.

    python benchmarks/export_parity.py                          # WRN-34-2-FPN, 80 classes, 800/1333, 2 images
    python benchmarks/export_parity.py --images 1 --out /tmp/parity MODEL.WRN.NAME wide_resnet18_1 MODEL.FPN.OUT_CHANNELS 32

No COCO weights can be downloaded here, so the detector is ``configs/COCO-Detection/wrn34_2_frcnn.yaml``
with random weights made to behave like a detector on photos (:func:`near_threshold_detector`): norm
statistics taken from the images, class and objectness logits spread so that many detections score
near the threshold and overlap at the NMS threshold, the hard case for an export check. It writes
the detector and photo-like JPEGs (``bench_utils.write_photo_jpegs``), exports it with
``tools/export_model.py`` (ONNX and TorchScript, the tools' own checks), then compares, on every
image, as :func:`wrn_det.detection.export.match_detections` does:

* ONNX (onnxruntime) with the PyTorch module it was exported from (float resize);
* ONNX with the evaluation's detections (``wrn_det.Predictor``: uint8 resize);
* TorchScript with the evaluation's detections.

It prints how far the two resizes' images are apart (grey levels), then two ``PARITY`` lines per
comparison: the pairs (same class, IoU >= 0.5) with their box (px) and score differences, and the
verdict at the tools' tolerances (agree, borderline, unexplained). Differences, not timings: any
machine will do (about 6 minutes on 2 CPU cores at the default size).
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

CONFIG = "wrn34_2_frcnn.yaml"
# photo sizes as COCO's (640 on the long side), landscape and portrait
SIZES = [(480, 640), (427, 640), (640, 480), (512, 640), (640, 427), (375, 500)]


def near_threshold_detector(cfg, images, seed: int = 0, above: int = 150) -> dict:
    """Return a detector checkpoint (``{"model", "metadata"}``) of ``cfg``'s network with random weights that
    acts on ``images`` (uint8 RGB ``(3, H, W)`` tensors) as a detector whose scores sit near the threshold.

    Random weights alone give no detector: activations grow through the layers until every score is
    0 or 1. So, from ``images[0]``: every norm layer's statistics are those of its input (a
    data-dependent initialisation), and the class logits are spread (standard deviation 1.5 over
    the proposals) with a background bias that puts about ``above`` (proposal, class) pairs over
    ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``: a crowd of detections around the threshold, many of them
    overlapping near the NMS threshold (other images get more or fewer).
    """
    from torchvision.ops import FrozenBatchNorm2d

    from wrn_det.detection.export import InferenceModel
    from wrn_det.detection.modeling import build_detector

    cfg = cfg.clone()
    cfg.defrost()
    for key in ("CONV", "PACK_WEIGHTS", "ROI_ALIGN"):  # plain modules: their weights are edited below
        cfg.MODEL.FAST_CPU[key] = False
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    torch.manual_seed(seed)
    model = build_detector(cfg).eval()
    image = images[0]

    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)) + 1e-3)

    norms = [m for m in model.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
    heads = model.roi_heads
    logits = {}  # the box features of the proposals, for the classifier below
    hooks.append(heads.box_predictor.register_forward_pre_hook(lambda m, a: logits.setdefault("features", a[0])))
    wrapper = InferenceModel(model, cfg)
    wrapper.model = model  # the wrapper's copy would keep the statistics to itself
    with torch.no_grad():
        wrapper(image)
        for h in hooks:
            h.remove()
        # classes: spread logits, then the background bias that leaves about `above` pairs over the threshold
        features = logits["features"]
        score = heads.box_predictor.cls_score
        score.bias.zero_()
        raw = features @ score.weight.t()
        score.weight.mul_(1.5 / max(float(raw[:, 1:].std()), 1e-12))
        raw = features @ score.weight.t()
        thresh = float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
        lo, hi = -20.0, 20.0
        for _ in range(50):
            mid = (lo + hi) / 2
            z = raw.clone()
            z[:, 0] += mid
            n = int((torch.softmax(z, -1)[:, 1:] > thresh).sum())
            lo, hi = (mid, hi) if n > above else (lo, mid)
        score.bias[0] = (lo + hi) / 2
    from wrn_det.detection.weights import checkpoint_metadata

    meta = checkpoint_metadata(cfg)  # COCO's names where the catalog has them for this many classes
    n = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if len(meta.get("thing_classes", ())) != n:
        meta = {"thing_classes": [f"class_{i}" for i in range(n)],
                "contiguous_id_to_thing_dataset_id": {i: i + 1 for i in range(n)}}
    return {"model": model.state_dict(), "metadata": meta}


def parse_args(argv=None):
    """Return the parsed command line (``KEY VALUE`` pairs override the config)."""
    from wrn_det.engine import parse_args_with_overrides

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=CONFIG)
    p.add_argument("--images", type=int, default=2, help="photo-like images to compare on (at most 6)")
    p.add_argument("--out", default="", help="folder for the detector, images and exports (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--above", type=int, default=150,
                   help="(proposal, class) pairs over the score threshold on the first image (see near_threshold_detector)")
    return parse_args_with_overrides(p, argv)


def main(args) -> int:
    """Make the detector, export it both ways and print the ``PARITY`` lines; returns 0."""
    import onnxruntime

    from bench_utils import write_photo_jpegs
    from wrn_det import Predictor
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.export import (BOX_TOLERANCE, SCORE_TOLERANCE, InferenceModel, detection_limits,
                                          match_detections)
    from wrn_det.detection.predictor import image_to_tensor
    from wrn_det.engine.cli import cli_main
    from wrn_det.engine.config import load_config
    from wrn_det.engine.fileio import atomic_save

    out = args.out or tempfile.mkdtemp(prefix="export_parity_")
    os.makedirs(out, exist_ok=True)
    opts = ["MODEL.DEVICE", "cpu", *args.opts]
    cfg = load_config(get_det_cfg(), args.config_file, opts)
    paths = write_photo_jpegs(os.path.join(out, "photos"), SIZES[:args.images], seed=args.seed)
    images = [image_to_tensor(p, "RGB") for p in paths]
    weights = os.path.join(out, "detector.pth")
    atomic_save(near_threshold_detector(cfg, images, seed=args.seed, above=args.above), weights)

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
    import export_model

    files = {}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        files[fmt] = os.path.join(out, name)
        # the tool checks on the first photo (its own verdict); every photo is compared below
        argv = ["--config-file", args.config_file, "--format", fmt, "--output", files[fmt], "--check-image", paths[0],
                "MODEL.WEIGHTS", weights, *opts]
        status = cli_main(export_model.main, export_model.parse_args(argv))
        if status != 0:
            print(f"PARITY {fmt} export refused (status {status})", flush=True)
            return status

    predictor = Predictor(args.config_file, weights=weights, device="cpu", opts=args.opts)
    session = onnxruntime.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(files["torchscript"])
    float_module = InferenceModel(predictor.model, predictor.cfg, float_resize=True)
    limits = detection_limits(predictor.cfg)
    limits_text = f"{BOX_TOLERANCE:g} px, {SCORE_TOLERANCE:g} in score"
    rows = {"onnx vs its PyTorch module (float resize)": [], "onnx vs the evaluation (uint8 resize)": [],
            "torchscript vs the evaluation": []}
    with torch.no_grad():
        for im in images:
            ev = predictor(im)
            ev = (ev["boxes"], ev["scores"], ev["classes"])
            onnx_out = session.run(None, {"image": im.numpy()})
            pairs = [(float_module(im), onnx_out), (ev, onnx_out), (ev, scripted(im))]
            for (name, found), (ref, got) in zip(rows.items(), pairs):
                found.append(match_detections(ref, got, **limits))  # the default tolerances of the tools' check
    import numpy as np

    # the source of the difference: the test-time resize in float32 (ONNX) and in uint8 (the evaluation's)
    diffs = []
    for im in images:
        h, w = float_module.resized_size(im)
        x = im[None]
        uint8 = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        flt = torch.nn.functional.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False,
                                              antialias=True)
        diffs.append((uint8.float() - flt).abs().flatten())
    d = torch.cat(diffs)
    print(f"PARITY resized images, float32 vs uint8 resize: grey levels off by mean {float(d.mean()):.3g}, max "
          f"{float(d.max()):.3g}; {100 * float((d > 0.5).float().mean()):.2g}% of the values by more than 0.5", flush=True)
    for name, found in rows.items():
        n = [r["count"][0] for r in found]
        paired = [p for r in found for p in r["pairs"]]
        box = np.array([p[1] for p in paired] or [0.0])
        score = np.array([p[2] for p in paired] or [0.0])
        lone = sum(r["count"][0] + r["count"][1] - 2 * len(r["pairs"]) for r in found)
        print(f"PARITY {name}: {len(found)} images, {sum(n)} detections {n}; {len(paired)} pairs (same class, IoU >= "
              f"0.5): boxes off by median {np.median(box):.3g} px, 99th percentile {np.percentile(box, 99):.3g}, max "
              f"{box.max():.3g}; scores by median {np.median(score):.3g}, 99th percentile {np.percentile(score, 99):.3g}, "
              f"max {score.max():.3g}; {lone} without a pair", flush=True)
        agree = sum(r["matched"] for r in found)
        border = [d for r in found for d in r["borderline"]]
        bad = [d for r in found for d in r["unexplained"]]
        kinds = {}
        for d in border:
            kind = ("threshold" if "threshold 0" in d["why"] else "limit" if "last of" in d["why"] else
                    "NMS" if "NMS" in d["why"] else "knock-on")
            kinds[kind] = kinds.get(kind, 0) + 1
        print(f"PARITY {name}: at the tools' tolerances ({limits_text}): {agree} agree, {len(border)} borderline "
              f"{kinds}, {len(bad)} unexplained", flush=True)
    return 0


if __name__ == "__main__":
    from wrn_det.engine.cli import cli_main

    sys.exit(cli_main(main, parse_args()))
