#!/usr/bin/env python
"""Export a trained detector to ONNX or TorchScript, pre- and post-processing inside.

    python tools/export_model.py --config-file shapes_wrn_frcnn.yaml --format onnx --output model.onnx \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python tools/export_model.py --config-file shapes_wrn_frcnn.yaml --format torchscript --output model.pt \\
        MODEL.WEIGHTS output/demo/model_final.pth

The exported model takes one uint8 RGB image ``(3, H, W)`` of any size and returns
``boxes`` (float32 ``(N, 4)`` XYXY in the image's pixels), ``scores`` and ``classes``
(contiguous ids); the class names and category ids are stored in the file
(:mod:`wrn_det.detection.export` says what is inside and what stays outside). Weights
come through ``MODEL.WEIGHTS`` (builtin or detectron2-engine checkpoints). Before the
file is put in place the export is run on ``--check-image`` files (default: two random
images of different sizes) and compared with the PyTorch model: onnxruntime for ONNX
(``pip install -e '.[export]'``), ``torch.jit.load`` for TorchScript. ``KEY VALUE``
pairs override the config.
"""
import argparse
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import ConfigError, cli_main, parse_args_with_overrides  # noqa: E402


def parse_args(argv=None):
    """Return the parsed command line; ``KEY VALUE`` config overrides may stand anywhere and go to ``opts``."""
    from wrn_det.detection.export import FORMATS

    p = argparse.ArgumentParser(description="Export a trained detector to ONNX or TorchScript",
                                epilog="Overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS output/demo/model_final.pth")
    p.add_argument("--config-file", "--config", required=True, metavar="FILE",
                   help="the config the model was trained with (a path or a file name under configs/)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, metavar="FILE", help="the file to write (.onnx, .pt)")
    p.add_argument("--check-image", nargs="+", default=[], metavar="PATH",
                   help="images to trace and check the export on (default: two random images)")
    return parse_args_with_overrides(p, argv)


def main(args) -> int:
    """Export as ``args`` ask; returns 0."""
    import torch

    from wrn_det.detection.export import InferenceModel, export_onnx, export_torchscript, metadata_json
    from wrn_det.detection.predictor import Predictor, image_to_tensor

    with torch.no_grad():  # inference only; the caller's grad mode is left as it was
        predictor = Predictor(args.config_file, opts=args.opts)
        if not predictor.cfg.MODEL.WEIGHTS:
            raise ConfigError("set MODEL.WEIGHTS to the trained model to export")
        device = predictor.model.device
        images = [image_to_tensor(p, "RGB").to(device) for p in args.check_image] or None
        wrapper = InferenceModel(predictor.model, predictor.cfg, float_resize=args.format == "onnx")
        meta = metadata_json(predictor.cfg, predictor.weights)
        export = export_onnx if args.format == "onnx" else export_torchscript
        report = export(wrapper, args.output, meta, images)
        size = os.path.getsize(args.output) / 2 ** 20
        check = report["check"]
        if check is None:
            how = "not run: onnxruntime is not installed (pip install -e '.[export]')"
        else:
            how = (f"{'onnxruntime' if args.format == 'onnx' else 'torch.jit.load'} on {check['images']} images: "
                   f"{check['matched']} of {check['detections']} detections of PyTorch found, boxes within "
                   f"{check['max_box']:.2g} px, scores within {check['max_score']:.2g}")
            if check["borderline"]:  # the rest: kept by one and not the other, for a difference within the tolerances
                how += (f"; {len(check['borderline'])} borderline (at the score threshold, the per-image limit or a "
                        f"tie in NMS), allowed to differ: " + "; ".join(
                            f"image {n + 1}, {'PyTorch' if d['side'] == 'ref' else 'export'}'s class {d['class']} "
                            f"score {d['score']:.4g} ({d['why']})" for n, d in check["borderline"][:5]))
                if len(check["borderline"]) > 5:
                    how += f"; and {len(check['borderline']) - 5} more"
        print(f"wrote {args.output} ({args.format}, {size:.1f} MiB, {len(predictor.thing_classes)} classes); check {how}",
              flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
