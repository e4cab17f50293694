#!/usr/bin/env python
"""Draw a dataset's ground-truth boxes, or a run's predictions beside them with the mistakes marked.

    python tools/visualize_data.py --config-file shapes_wrn_frcnn.yaml --source annotation --num 8
    python tools/visualize_data.py --config-file shapes_wrn_frcnn.yaml --source prediction --run output/demo

``--source annotation`` draws the boxes and classes of ``--dataset`` (default: the first
of ``DATASETS.TRAIN``) as the loader reads them. ``--source prediction`` reads the run's
``inference/coco_instances_results.json`` (``inference/<dataset>/`` when the run tested
several datasets; ``--run`` defaults to ``OUTPUT_DIR``) for ``--dataset`` (default: the
first of ``DATASETS.TEST``) and puts, for each image, the ground truth (left) beside the
detections at or above ``--confidence-threshold`` (right). Matching is COCO's at IoU 0.5
within each class (faster-coco-eval): a detection that matches no object is drawn red as
``FP``, an object no detection matches is drawn red as ``missed``. ``--num N``: the first
N images (default: all); ``--errors-only`` keeps the images with a mistake.

Pictures go to ``--output`` (default ``<run or OUTPUT_DIR>/visualize/<source>``) as
``<image name>.png``. ``KEY VALUE`` pairs override the config. Images are read as the loader
reads them (upright by their EXIF orientation, 8-bit RGB whatever their mode), so the boxes,
which a dataset gives in the upright image's pixels, land where they belong.

Exit status: 0 when every picture was drawn; 1 when some images could not be read (each is
named in one ``error:`` line and skipped, whatever the reason; the others are still drawn and
the summary line says how many failed); 2 for bad input (config, dataset, results file), as
every tool. (Not the number failed: 2 already means bad input.)
"""
import argparse
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import ConfigError, WrnDetError, cli_main, load_config, parse_args_with_overrides  # noqa: E402


def parse_args(argv=None):
    """Return the parsed command line; ``KEY VALUE`` config overrides may stand anywhere and go to ``opts``."""
    p = argparse.ArgumentParser(description="Draw ground-truth boxes, or predictions beside them",
                                epilog="Overrides: trailing KEY VALUE pairs, e.g. DATASETS.TEST \"('shapes_val',)\"")
    p.add_argument("--config-file", "--config", required=True, metavar="FILE", help="config path or name under configs/")
    p.add_argument("--source", required=True, choices=("annotation", "prediction"))
    p.add_argument("--dataset", default="", help="dataset name (default: DATASETS.TRAIN[0] / DATASETS.TEST[0])")
    p.add_argument("--run", default="", metavar="DIR", help="output folder of the run whose predictions to draw")
    p.add_argument("--output", default="", metavar="DIR", help="folder for the pictures")
    p.add_argument("--num", type=int, default=0, help="number of images to draw (0: all)")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="lowest score of a drawn detection")
    p.add_argument("--errors-only", action="store_true", help="only images with a false positive or a missed object")
    return parse_args_with_overrides(p, argv)


def _results_file(run: str, dataset: str, cfg) -> str:
    nested = os.path.join(run, "inference", dataset, "coco_instances_results.json")
    flat = os.path.join(run, "inference", "coco_instances_results.json")
    return nested if os.path.isfile(nested) or len(cfg.DATASETS.TEST) > 1 else flat


def main(args) -> int:
    """Write the pictures for parsed ``args``; returns 0, or 1 when some images could not be read (see the module doc)."""
    from wrn_det.data.catalog import MetadataCatalog, get_detection_dataset_dicts, resolve_json_file
    from wrn_det.data.det_loader import annotation_boxes, quiet_opencv, read_image
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.visualize import (ERROR_COLOUR, caption, class_colour, detection_labels, draw_boxes,
                                             match_detections, read_coco_results, save_png,
                                             side_by_side)

    quiet_opencv()
    cfg = load_config(get_det_cfg(), args.config_file, args.opts or [])
    split = cfg.DATASETS.TRAIN if args.source == "annotation" else cfg.DATASETS.TEST
    name = args.dataset or (split[0] if split else "")
    if not name:
        raise ConfigError(f"no dataset: pass --dataset NAME or set DATASETS.{'TRAIN' if args.source == 'annotation' else 'TEST'}")
    if args.num < 0:
        raise ConfigError(f"--num must be 0 (all) or a positive number of images, got {args.num}")
    dicts = get_detection_dataset_dicts([name], filter_empty=False)
    meta = MetadataCatalog.get(name)
    classes = list(meta.get("thing_classes") or [])
    to_contiguous = dict(meta.get("thing_dataset_id_to_contiguous_id") or {})
    run = args.run or cfg.OUTPUT_DIR
    out_dir = args.output or os.path.join(run, "visualize", args.source)

    gt = dt = None
    if args.source == "prediction":
        results_file = _results_file(run, name, cfg)
        by_image = read_coco_results(results_file, {d["image_id"] for d in dicts}, set(to_contiguous))
        gt, dt = match_detections(resolve_json_file(name), [r for rs in by_image.values() for r in rs], args.confidence_threshold)

    failed = written = 0
    for d in dicts:
        if args.num and written >= args.num:
            break
        try:
            image = read_image(d["file_name"], "RGB")
        except WrnDetError as e:
            print(f"error: {e} (skipped)", file=sys.stderr, flush=True)
            failed += 1
            continue
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        if args.source == "annotation":
            annos = d.get("annotations", [])
            boxes = annotation_boxes(annos)
            labels = detection_labels([classes[a["category_id"]] for a in annos],
                                      prefix=["crowd" if a.get("iscrowd") else "" for a in annos])
            picture = draw_boxes(image, boxes, labels, [class_colour(a["category_id"]) for a in annos])
            save_png(caption(picture, f"{name}: {stem} ({len(annos)} objects)"), os.path.join(out_dir, f"{stem}.png"))
            written += 1
            continue
        img_id = d["image_id"]
        objects = [a for a in gt.imgToAnns.get(img_id, []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        dets = sorted(dt.imgToAnns.get(img_id, []) if dt is not None else [], key=lambda a: -a["score"])
        missed = [bool(a.get("fn")) and not a.get("iscrowd") for a in objects]
        false_pos = [bool(a.get("fp")) for a in dets]
        if args.errors_only and not (any(missed) or any(false_pos)):
            continue

        def contiguous(a):
            return to_contiguous[a["category_id"]]

        left = draw_boxes(image, annotation_boxes(objects),
                          detection_labels([classes[contiguous(a)] for a in objects],
                                           prefix=["missed" if m else "" for m in missed]),
                          [ERROR_COLOUR if m else class_colour(contiguous(a)) for a, m in zip(objects, missed)])
        right = draw_boxes(image, annotation_boxes(dets),
                           detection_labels([classes[contiguous(a)] for a in dets], [a["score"] for a in dets],
                                            prefix=["FP" if f else "" for f in false_pos]),
                           [ERROR_COLOUR if f else class_colour(contiguous(a)) for a, f in zip(dets, false_pos)])
        picture = side_by_side([caption(left, f"ground truth: {len(objects)} objects, {sum(missed)} missed"),
                                caption(right, f"predictions >= {args.confidence_threshold:g}: {len(dets)}, "
                                               f"{sum(false_pos)} false positives")])
        save_png(picture, os.path.join(out_dir, f"{stem}.png"))
        written += 1
    print(f"{written} pictures of {name} ({args.source}) in {out_dir}" + (f"; {failed} images failed" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
