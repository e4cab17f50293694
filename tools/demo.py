#!/usr/bin/env python
"""Run a trained detector on image files and draw what it finds.

    python tools/demo.py --config-file shapes_wrn_frcnn.yaml --input photo.jpg 'images/*.png' folder/ \\
        --output predictions/ --json detections.json MODEL.WEIGHTS output/demo/model_final.pth

``--input`` takes image files, folders (their images, not recursive) and globs. For each
image, ``--output DIR`` gets ``<name>.png`` with the boxes, class names and scores of the
detections at or above ``--confidence-threshold``; ``--json FILE`` gets all of them in
COCO results format (XYWH boxes, the training set's category ids) plus ``file_name``.
Trailing ``KEY VALUE`` pairs override the config (the weights come through
``MODEL.WEIGHTS``); they may stand anywhere, also right after the inputs.

Every image is read as the training and the evaluation read it: upright (its EXIF orientation
applied, as photo viewers and detectron2 do) and in 8-bit RGB whatever its mode (16-bit,
grayscale, palette, CMYK, alpha dropped, the first frame of a GIF or TIFF); boxes are drawn
and written in the upright image's pixels.

Exit status: 0 when every image was done; 1 when some could not be read (each is named in
one ``error:`` line and skipped, whatever the reason, the others are still done, and the
summary line says how many failed); 2 for a bad config or missing weights (one line, nothing
done), as every tool; 130 when interrupted. (Not the number failed: 2 already means bad input.)
"""
import argparse
import glob
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import WrnDetError, atomic_write, cli_main, parse_args_with_overrides  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def parse_args(argv=None):
    """Return the parsed command line; ``KEY VALUE`` pairs (anywhere, even right after ``--input``) go to ``opts``."""
    p = argparse.ArgumentParser(description="Draw a trained detector's detections on images",
                                epilog="Overrides: trailing KEY VALUE pairs, e.g. MODEL.WEIGHTS out/model_final.pth")
    p.add_argument("--config-file", "--config", required=True, metavar="FILE",
                   help="the config the model was trained with (a path or a file name under configs/)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="image files, folders or globs")
    p.add_argument("--output", default="", metavar="DIR", help="folder for one drawn picture per image")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="lowest score drawn and written")
    p.add_argument("--json", default="", metavar="FILE", help="write all detections in COCO results format")
    return parse_args_with_overrides(p, argv)


def expand_inputs(patterns):
    """Return ``(files, problems)``: the image files named by ``patterns`` in order, and one line per pattern
    that names nothing."""
    files, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f)))
            if not found:
                problems.append(f"folder {pattern} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
            if not found:
                problems.append(f"{pattern!r} matches no file")
        else:
            found = [pattern]  # read (and reported if unreadable) with the others
        files.extend(found)
    return files, problems


def _output_names(files):
    """Return one output file name per input: ``<stem>.png``, numbered when two inputs share a stem."""
    seen, names = {}, []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0] or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
    return names


def main(args) -> int:
    """Run the demo for parsed ``args``; returns 0, or 1 when some inputs could not be read (see the module doc)."""
    import json

    import torch
    from tqdm import tqdm

    from wrn_det.detection.predictor import Predictor, coco_results, image_to_tensor
    from wrn_det.data.det_loader import quiet_opencv
    from wrn_det.detection.visualize import class_colour, detection_labels, draw_boxes, save_png

    with torch.no_grad():  # inference only; the caller's grad mode is left as it was
        quiet_opencv()
        predictor = Predictor(args.config_file, opts=args.opts or [])
        files, problems = expand_inputs(args.input)
        for line in problems:
            print(f"error: {line}", file=sys.stderr, flush=True)
        failed = len(problems)
        names = _output_names(files)
        results, drawn, n_det = [], 0, 0
        for i, (path, out_name) in enumerate(zip(tqdm(files, desc="images", unit="img", disable=None), names)):
            try:
                image = image_to_tensor(path, "RGB")
            except WrnDetError as e:
                tqdm.write(f"error: {e} (skipped)", file=sys.stderr)
                failed += 1
                continue
            pred = predictor(image)
            keep = pred["scores"] >= args.confidence_threshold
            pred = {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in pred.items()}
            pred["class_names"] = [predictor.thing_classes[c] for c in pred["classes"].tolist()]
            n_det += len(pred["scores"])
            results += coco_results(pred, i, predictor.contiguous_id_to_thing_dataset_id, file_name=path)
            if args.output:
                picture = draw_boxes(image, pred["boxes"], detection_labels(pred["class_names"], pred["scores"].tolist()),
                                     [class_colour(c) for c in pred["classes"].tolist()])
                save_png(picture, os.path.join(args.output, out_name))
                drawn += 1
            if not args.output and not args.json:
                found = ", ".join(detection_labels(pred["class_names"], pred["scores"].tolist())) or "nothing"
                tqdm.write(f"{path}: {found}")
        if args.json:
            def write(tmp):
                with open(tmp, "w") as f:
                    json.dump(results, f)

            atomic_write(args.json, write, suffix=".json")
        done = len(files) - (failed - len(problems))
        summary = f"{done} of {len(files)} images: {n_det} detections with score >= {args.confidence_threshold:g}"
        if args.output:
            summary += f"; {drawn} pictures in {args.output}"
        if args.json:
            summary += f"; detections in {args.json}"
        print(summary + (f"; {failed} failed" if failed else ""), flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
