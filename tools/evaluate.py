#!/usr/bin/env python
"""Evaluate a detections file without a model: COCO box AP, or VOC AP for a Pascal VOC dataset.

    python tools/evaluate.py --results output/demo/inference/coco_instances_results.json --dataset shapes_val
    python tools/evaluate.py --results dets.json --coco-json annotations/instances_val.json --max-dets 300
    python tools/evaluate.py --results dets.json --dataset voc_2007_test --output metrics.json

``--results``: detections in COCO results form, a list of ``{"image_id", "category_id",
"bbox": [x, y, width, height], "score"}`` (what an evaluation writes to
``inference/coco_instances_results.json``, and what other libraries and papers publish).
For a VOC dataset ``image_id`` is the VOC file id (``"2007_000027"``), ``category_id`` is 1 +
the class's index in the dataset's class list, and boxes are in the dataset dicts' pixel
coordinates (VOC's 1-based ``xmin``/``ymin`` minus 1).

The ground truth is a catalog name (``--dataset``: ``coco_2017_val``, ``voc_2007_test``, the
shapes sets, ...; its metadata decides COCO or VOC evaluation, as in training) or a COCO
annotation file (``--coco-json``); no image is read. The tables printed are the training's
evaluation's; ``--output`` writes ``{"bbox": {"AP": ..., "AP50": ..., ...}}`` as detectron2's
evaluators return it. ``--max-dets N``: detections scored per image in COCO evaluation
(default 100, COCO's; raise it for dense scenes). A bad results file is one ``error:`` line
naming the entry and what was expected, exit status 2.
"""
import argparse
import logging
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import ConfigError, WrnDetError, cli_main  # noqa: E402


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv=None):
    """Return the parsed command line."""
    from wrn_det.detection.evaluation.coco import BACKENDS, MAX_DETS

    p = argparse.ArgumentParser(description="Evaluate a detections file (COCO results form) against a dataset",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, metavar="FILE.json", help="detections in COCO results form")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--dataset", metavar="NAME", help="a registered dataset (coco_2017_val, voc_2007_test, ...)")
    gt.add_argument("--coco-json", metavar="FILE", help="a COCO instances file (no images needed)")
    p.add_argument("--max-dets", type=_positive, default=None, metavar="N",
                   help=f"detections scored per image in COCO evaluation (default {MAX_DETS})")
    p.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0], help="COCO evaluation library")
    p.add_argument("--output", default="", metavar="FILE.json", help="write the metrics here as JSON")
    return p.parse_args(argv)


def _warnings_to_stderr() -> None:
    # the library's warnings (an image denser than the cap, no detections) as "warning:" lines
    log = logging.getLogger("wrn_det")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)


def _evaluate_voc(args, name: str):
    from wrn_det.data.catalog import DatasetCatalog, MetadataCatalog
    from wrn_det.detection.evaluation.coco import read_coco_results
    from wrn_det.detection.evaluation.voc import VOCGroundTruth, evaluate_voc_results, voc_tables

    if args.max_dets is not None:
        raise ConfigError(f"--max-dets applies to COCO evaluation; {name} is a VOC dataset, whose evaluation scores "
                          "every detection")
    dicts = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    gt = VOCGroundTruth(dicts, meta.thing_classes)
    by_image = read_coco_results(args.results, set(gt.image_ids), set(range(1, len(gt.class_names) + 1)))
    results = [r for rs in by_image.values() for r in rs]
    metrics = evaluate_voc_results(gt, results, meta.year)
    print(f"{name}: VOC{meta.year} metric ({'11-point' if meta.year == 2007 else 'area'} AP), {len(results)} "
          f"detections on {len(gt.image_ids)} images\n{voc_tables(metrics)}", flush=True)
    return metrics


def _evaluate_coco(args, json_file: str, what: str):
    from wrn_det.detection.evaluation.coco import (MAX_DETS, METRICS, CocoGroundTruth, evaluate_coco_results,
                                                   read_coco_results, summary_tables)

    gt = CocoGroundTruth(json_file)
    by_image = read_coco_results(args.results, gt.image_ids, gt.category_ids)
    results = [r for rs in by_image.values() for r in rs]
    max_dets = args.max_dets or MAX_DETS
    recall = {}
    metrics = evaluate_coco_results(gt, results, args.backend, max_dets=max_dets, max_dets_key="--max-dets",
                                    recall=recall)
    print(f"{what} ({args.backend}, at most {max_dets} detections per image), {len(results)} detections on "
          f"{len(gt.image_ids)} images\n{summary_tables(metrics, METRICS, extra=recall)}", flush=True)
    return metrics


def main(args) -> int:
    """Evaluate ``args.results`` and print the tables; returns 0."""
    import wrn_det.data  # noqa: F401  (the builtin dataset names)
    from wrn_det.data.catalog import DatasetCatalog, MetadataCatalog, resolve_json_file
    from wrn_det.engine.fileio import check_output_dir, write_json

    _warnings_to_stderr()
    if args.output:  # a path that cannot be written is found before the evaluation
        check_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output")
    if args.dataset:
        name = args.dataset
        if name not in DatasetCatalog:
            raise WrnDetError(f"--dataset {name!r} is not a registered dataset; expected one of "
                              f"{', '.join(DatasetCatalog.list())} (or pass --coco-json FILE)")
        if MetadataCatalog.get(name).get("evaluator_type") == "pascal_voc":
            metrics = _evaluate_voc(args, name)
        else:
            metrics = _evaluate_coco(args, resolve_json_file(name), name)
    else:
        metrics = _evaluate_coco(args, args.coco_json, args.coco_json)
    if args.output:
        write_json(args.output, {"bbox": dict(metrics)}, indent=2)
        print(f"metrics written to {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
