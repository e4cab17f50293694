#!/usr/bin/env python
"""Export a trained model: a detector to ONNX or TorchScript (pre- and post-processing inside), a detector or a
classifier to .safetensors or to a Hugging Face Hub folder.

    python tools/export_model.py --config-file shapes_wrn_frcnn.yaml --format onnx --output model.onnx \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python tools/export_model.py --config-file shapes_wrn_frcnn.yaml --format torchscript --output model.pt \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python tools/export_model.py --config-file output/demo/config.yaml --format hub --output hub/shapes_wrn \\
        --license apache-2.0 MODEL.WEIGHTS output/demo/model_final.pth
    python tools/export_model.py --config-file output/cifar10_wrn_28_10/config.yaml --format safetensors \\
        --output wrn_28_10.safetensors MODEL.WEIGHTS output/cifar10_wrn_28_10/model_best.pth

ONNX and TorchScript: the exported model takes one uint8 RGB image ``(3, H, W)`` of any size
and returns ``boxes`` (float32 ``(N, 4)`` XYXY in the image's pixels), ``scores`` and
``classes`` (contiguous ids); the class names and category ids are stored in the file
(:mod:`wrn_det.detection.export` says what is inside and what stays outside). Before the
file is put in place the export is run on ``--check-image`` files (default: two random
images of different sizes) and compared with the PyTorch model: onnxruntime for ONNX
(``pip install -e '.[export]'``), ``torch.jit.load`` for TorchScript.

safetensors: the weights, with the class names and the config in the file's header (no
code can be in it); usable as ``MODEL.WEIGHTS`` of the trainers and the predictor. hub: a
folder the Hugging Face Hub shows as a model: ``config.yaml``, ``model.safetensors`` and a
``README.md`` model card (network, dataset, classes, the evaluation table and training
command of the run in ``--run-dir``, ``--license``, the paper's citation), read back by
``wrn_det.Predictor.from_pretrained`` (detectors) and ``wrn_det.models.from_pretrained``
(classifiers); upload it with ``hf upload <you>/<name> FOLDER`` (huggingface_hub). The config
says which kind of model it is (a classification config has ``MODEL.NAME``). Weights come
through ``MODEL.WEIGHTS`` (for detectors: builtin or detectron2-engine checkpoints);
``KEY VALUE`` pairs override the config.
"""
import argparse
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import ConfigError, cli_main, parse_args_with_overrides  # noqa: E402

#: Formats that hold the weights (both tasks), beside the detector graphs of wrn_det.detection.export.
WEIGHTS_FORMATS = ("safetensors", "hub")


def parse_args(argv=None):
    """Return the parsed command line; ``KEY VALUE`` config overrides may stand anywhere and go to ``opts``."""
    from wrn_det.detection.export import FORMATS

    p = argparse.ArgumentParser(description="Export a trained model to ONNX, TorchScript, .safetensors or a Hub folder",
                                epilog="Overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS output/demo/model_final.pth")
    p.add_argument("--config-file", "--config", required=True, metavar="FILE",
                   help="the config the model was trained with (a path or a file name under configs/)")
    p.add_argument("--format", required=True, choices=tuple(FORMATS) + WEIGHTS_FORMATS)
    p.add_argument("--output", required=True, metavar="PATH",
                   help="the file to write (.onnx, .pt, .safetensors), or the folder (hub)")
    p.add_argument("--check-image", nargs="+", default=[], metavar="PATH",
                   help="images to trace and check the export on (default: two random images)")
    p.add_argument("--license", default="unknown", metavar="ID",
                   help="hub: the model card's licence, a Hub licence id (apache-2.0, mit, cc-by-4.0, ...)")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="hub: the run whose metrics.json and log.txt the card reports (default: MODEL.WEIGHTS's folder)")
    p.add_argument("--repo-id", default=None, metavar="OWNER/NAME", help="hub: the Hub name the card's example loads")
    return parse_args_with_overrides(p, argv)


def config_task(config_file: str) -> str:
    """Return ``classification`` when ``config_file`` (or a ``_BASE_`` of it) has ``MODEL.NAME`` or
    ``DATASETS.NAME``, the keys only classification configs have; else ``detection``."""
    import yaml

    from wrn_det.engine.config import resolve_config_file

    path, seen = resolve_config_file(config_file), set()
    while path and path not in seen and os.path.isfile(path):
        seen.add(path)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            break
        model, datasets = data.get("MODEL") or {}, data.get("DATASETS") or {}
        if (isinstance(model, dict) and "NAME" in model) or (isinstance(datasets, dict) and "NAME" in datasets):
            return "classification"
        base = data.get("_BASE_")
        path = os.path.join(os.path.dirname(path), base) if isinstance(base, str) else None
    return "detection"


def _run_dir(args, weights: str) -> str:
    return args.run_dir or os.path.dirname(os.path.abspath(weights))


def export_classifier(args) -> int:
    """Write the classifier of ``args`` (a classification config, ``MODEL.WEIGHTS``) as .safetensors or a Hub folder."""
    from wrn_det.classification import get_cls_cfg
    from wrn_det.engine.config import load_config, resolve_config_file
    from wrn_det.engine.weights_file import read_weights_file
    from wrn_det.models import build_model, load_classifier_weights, save_pretrained
    from wrn_det.models.pretrained import save_classifier_safetensors

    cfg = load_config(get_cls_cfg(), resolve_config_file(args.config_file), args.opts)
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ConfigError("set MODEL.WEIGHTS to the trained classifier to export (model_best.pth, model_final.pth)")
    num_classes = cfg.MODEL.NUM_CLASSES or None
    if num_classes is None:  # 0: taken from the dataset at training time; the classifier's rows say it here
        state = read_weights_file(weights).model or {}
        num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else None
    try:
        model = build_model(cfg.MODEL.NAME, num_classes=num_classes)
    except ValueError as e:
        raise ConfigError(f"MODEL.NAME {cfg.MODEL.NAME!r}: {e}") from None
    load_classifier_weights(model, weights)
    model.eval()
    if args.format == "hub":
        save_pretrained(model, args.output, cfg, run_dir=_run_dir(args, weights), license=args.license,
                        repo_id=args.repo_id)
        what = "Hub folder: config.yaml, model.safetensors, README.md"
    else:
        save_classifier_safetensors(args.output, model, cfg)
        what = "safetensors"
    print(f"wrote {args.output} ({what}; {cfg.MODEL.NAME}, {model.num_classes} classes) from {weights}", flush=True)
    return 0


def main(args) -> int:
    """Export as ``args`` ask; returns 0."""
    if args.format in WEIGHTS_FORMATS and config_task(args.config_file) == "classification":
        return export_classifier(args)

    import torch

    from wrn_det.detection.export import InferenceModel, export_onnx, export_torchscript, metadata_json
    from wrn_det.detection.predictor import Predictor, image_to_tensor

    with torch.no_grad():  # inference only; the caller's grad mode is left as it was
        predictor = Predictor(args.config_file, opts=args.opts)
        weights = predictor.cfg.MODEL.WEIGHTS
        if not weights:
            raise ConfigError("set MODEL.WEIGHTS to the trained model to export")
        if args.format in WEIGHTS_FORMATS:
            if args.format == "hub":
                predictor.save_pretrained(args.output, run_dir=_run_dir(args, weights), license=args.license,
                                          repo_id=args.repo_id)
                what = "Hub folder: config.yaml, model.safetensors, README.md"
            else:
                predictor.save_weights(args.output)
                what = "safetensors"
            print(f"wrote {args.output} ({what}; {len(predictor.thing_classes)} classes) from {weights}", flush=True)
            return 0
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
            how = (f"{'onnxruntime' if args.format == 'onnx' else 'torch.jit.load'} on {check['images']} images: boxes within "
                   f"{check['max_box']:.2g} px, scores within {check['max_score']:.2g} of PyTorch")
        print(f"wrote {args.output} ({args.format}, {size:.1f} MiB, {len(predictor.thing_classes)} classes); check {how}",
              flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
