"""Correctness on the device before any timing: one RESULT line per check, printed as it is done.

* ``check_step_{fp32,bf16,fp16}``: one builtin training step of the detector (the trainer's own
  :class:`~wrn_det.engine.optim.OptimizerStep`: autocast, float16 with the gradient scaler) gives
  finite losses and finite weights;
* ``check_d2_same_detections``: the builtin engine and detectron2's, with the same weights (the
  rows of ``benchmarks/det_step.py``, the classifier given random weights so that scores do not
  tie), detect the same boxes on the same image (float32, TF32 off): the share of the builtin's 20
  best detections that detectron2 also reports (same class, IoU >= 0.95);
* ``check_anchors_bf16``: the RPN's anchors under bfloat16 autocast are float32 and equal to the
  float32 run's (bfloat16 holds 8 significant bits: an anchor near x = 1000 would land on a 4-pixel grid).

    python benchmarks/device/check.py [--device cuda] [--size 800] [--config COCO-Detection/wrn34_2_frcnn.yaml]

As every benchmark here, a check that fails says so in its RESULT line (``not met``, ``NOT FINITE``);
the exit status is 0 unless the script itself fails.
"""
import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import det_step  # noqa: E402
from bench_utils import result  # noqa: E402


def _cfg(config: str, device, opts=()):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    return load_config(get_det_cfg(), config, ["MODEL.DEVICE", str(device), *opts])


def check_steps(config: str, device, size: int) -> bool:
    """One training step per precision through the trainer's OptimizerStep; True when all are finite."""
    from wrn_det.detection.modeling import build_detector
    from wrn_det.detection.train import build_optimizer
    from wrn_det.engine.optim import OptimizerStep

    ok = True
    batch = det_step.make_inputs(2, size, num_classes=min(_cfg(config, device).MODEL.ROI_HEADS.NUM_CLASSES, 80))
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        torch.manual_seed(0)
        model = build_detector(_cfg(config, device)).train()
        step = OptimizerStep(build_optimizer(_cfg(config, device), model), device, dtype)
        with step.autocast():
            losses = model(batch)
        step.step(sum(losses.values()))
        values = {k: float(v) for k, v in losses.items()}
        finite = all(math.isfinite(v) for v in values.values()) and all(
            bool(torch.isfinite(p).all()) for p in model.parameters())
        ok &= finite
        detail = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        print(f"RESULT check_step_{name} {'finite' if finite else 'NOT FINITE'} ({detail}"
              f"{', scale %g' % step.scaler.get_scale() if step.scaler.is_enabled() else ''})", flush=True)
    return ok


#: the builtin's best detections that must be among detectron2's
TOP = 20


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a.float(), b.float())


def check_same_detections(device, size: int) -> bool:
    """Builtin and detectron2 detections with the same weights; True when 95% of the builtin's are matched."""
    if not det_step.have_detectron2():
        result("check_d2_same_detections", None, 0.95, note="detectron2 not installed")
        return True
    from wrn_det.engine.run import set_tf32

    set_tf32(False)
    try:
        rows = det_step.build_rows(["builtin", "d2"], size, device, det_step.nullcontext)
        # det_step's heads score every proposal alike (ties: each engine keeps another 100); here the
        # classifier and box regressor get random weights, copied to detectron2's model as before
        x = det_step.make_inputs(1, size, seed=3)[0]
        predictor = rows["builtin"].model.roi_heads.box_predictor
        seen = []
        hook = predictor.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].flatten(1)))
        rows["builtin"].infer(x)
        hook.remove()
        norm = seen[0].norm(dim=1).median().clamp(min=1e-6).item()
        torch.manual_seed(1)
        with torch.no_grad():  # class logits spread by about 2 around the favoured biases: no near-ties at the top
            predictor.cls_score.weight.normal_(0, 2.0 / norm)
            predictor.bbox_pred.weight.normal_(0, 0.05 / norm)
        det_step.copy_builtin_to_d2(rows["builtin"].model, rows["d2"].model)
        ours, theirs = rows["builtin"].infer(x), rows["d2"].infer(x)["instances"]
        # the best TOP of each: below them the scores crowd and NMS ties may go either way
        b1, c1 = ours["boxes"][:TOP], ours["classes"][:TOP]
        b2, c2 = theirs.pred_boxes.tensor, theirs.pred_classes
        if len(b1) == 0:
            result("check_d2_same_detections", None, 0.95, note="no builtin detection to compare")
            return False
        iou = _iou(b1, b2) if len(b2) else torch.zeros(len(b1), 0)
        same_class = c1[:, None].to(c2.device) == c2[None, :]
        matched = ((iou >= 0.95) & same_class).any(dim=1).float().mean().item() if len(b2) else 0.0
        result("check_d2_same_detections", matched, 0.95, unit="",
               note=f"{len(b1)} builtin, {len(b2)} detectron2 detections")
        return matched >= 0.95
    finally:
        set_tf32(True)


def _anchor_generator(model):
    for m in model.modules():
        if "anchor" in type(m).__name__.lower():
            return m
    return None


def check_anchors(config: str, device, size: int) -> bool:
    """The RPN's anchors under bfloat16 autocast against float32; True when float32 and equal."""
    from wrn_det.detection.modeling import build_detector

    torch.manual_seed(0)
    model = build_detector(_cfg(config, device)).eval()
    gen = _anchor_generator(model)
    if gen is None:
        result("check_anchors_bf16", None, 0.0, higher_is_better=False, unit=" px", note="no anchor generator found")
        return False
    x = det_step.make_inputs(1, size)[0]
    with torch.no_grad():
        images = model.preprocess_image([x])
        feats = [model.backbone(images.tensors)[f] for f in model.rpn.in_features]
        anchors32 = torch.cat(gen(feats))  # every level's anchors
        with torch.autocast(device.type, dtype=torch.bfloat16):
            feats16 = [model.backbone(images.tensors)[f] for f in model.rpn.in_features]
            anchors16 = torch.cat(gen(feats16))
    diff = (anchors16.double() - anchors32.double()).abs().max().item()
    if anchors16.dtype != torch.float32:
        result("check_anchors_bf16", None, 0.0, higher_is_better=False, unit=" px",
               note=f"the anchors are {anchors16.dtype} under bf16 autocast, shifted by up to {diff:g} px")
        return False
    result("check_anchors_bf16", diff, 0.0, higher_is_better=False, unit=" px",
           note="float32 under bf16 autocast; the largest shift from the float32 run's")
    return diff == 0.0


def main() -> int:
    """Run the checks and print their RESULT lines (and whether all passed); returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=800, help="short side of the images")
    p.add_argument("--config", default=det_step.CONFIG, help="the detector of the training-step checks")
    a = p.parse_args()
    import logging

    logging.getLogger("wrn_det").setLevel(logging.WARNING)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    device = torch.device(a.device)
    print(f"{device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, images of short side {a.size}", flush=True)
    ok = check_steps(a.config, device, a.size)
    ok &= check_same_detections(device, a.size)
    ok &= check_anchors(det_step.CONFIG, device, a.size)
    print(f"checks: {'all passed' if ok else 'SOME FAILED (see the RESULT lines)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
