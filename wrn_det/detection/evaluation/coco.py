"""COCO box evaluation: results file, AP table.

Predictions of every process are gathered to rank 0, written to
``<output>/inference/coco_instances_results.json`` and scored once with
faster-coco-eval (the default; the same numbers as pycocotools, computed in C++) or
pycocotools (``TEST.COCO_EVAL_BACKEND``). Metrics are returned in percent under
detectron2's names: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>"...}}``.
Each evaluation also draws its precision-recall curves, per-class AP and confusion matrix
into the same folder (:mod:`wrn_det.detection.evaluation.plots`).
"""
import contextlib
import io
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch

from wrn_det.data.catalog import MetadataCatalog, resolve_json_file
from wrn_det.data.coco import read_coco_file
from wrn_det.engine import comm
from wrn_det.engine.errors import ConfigError, WrnDetError
from wrn_det.engine.fileio import write_json

from .evaluator import format_table
from .plots import write_evaluation_plots

__all__ = ["COCOEvaluator", "evaluate_coco_results", "BACKENDS", "METRICS"]

logger = logging.getLogger("wrn_det")

BACKENDS = ("faster_coco_eval", "pycocotools")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_api(backend: str):
    """Return (COCO class, COCOeval class) of ``backend``."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ConfigError(f"TEST.COCO_EVAL_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")


def evaluate_coco_results(json_file: str, results: List[dict], backend: str = "faster_coco_eval",
                          class_names: Optional[List[str]] = None,
                          plot_dir: Optional[str] = None) -> "OrderedDict[str, float]":
    """Score box ``results`` (COCO results format) against the annotations in ``json_file``.

    Returns an OrderedDict of AP, AP50, AP75, APs, APm, APl and ``AP-<category name>``,
    in percent (NaN where undefined, all NaN when there are no results). With
    ``plot_dir``, the precision-recall curves, per-class AP and confusion matrix are
    drawn there too (:mod:`wrn_det.detection.evaluation.plots`).
    """
    COCO, COCOeval = _coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
    cats = sorted(gt.loadCats(gt.getCatIds()), key=lambda c: c["id"])
    names = class_names or [c["name"] for c in cats]
    if not results:
        logger.warning("no predictions: every AP is NaN")
        return OrderedDict([(k, float("nan")) for k in METRICS] + [(f"AP-{n}", float("nan")) for n in names])
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        kwargs = {"print_function": lambda *a, **k: None} if backend == "faster_coco_eval" else {}
        ev = COCOeval(gt, dt, "bbox", **kwargs)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = OrderedDict((k, float(ev.stats[i] * 100) if ev.stats[i] >= 0 else float("nan")) for i, k in enumerate(METRICS))
    # precision: (IoU thresholds, recall points, categories, area ranges, max detections)
    precision = np.asarray(ev.eval["precision"])
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[f"AP-{name}"] = float(np.mean(p) * 100) if p.size else float("nan")
    if plot_dir:
        _write_plots(plot_dir, ev, json_file, results, names)
    return out


def _write_plots(plot_dir: str, ev, json_file: str, results: List[dict], names: List[str]) -> None:

    try:
        paths = write_evaluation_plots(plot_dir, ev, json_file, results, names)
    except Exception as e:  # a picture must never cost the evaluation of a finished training
        logger.warning("the evaluation pictures could not be drawn in %s: %s: %s", plot_dir, type(e).__name__, e)
        return
    logger.info("precision-recall curves, AP per class and confusion matrix: %s", ", ".join(paths[1:]))


def _summary_tables(metrics: Dict[str, float]) -> str:
    head = format_table([[metrics[k] for k in METRICS]], list(METRICS))
    per = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
    cols = 3
    rows = []
    for i in range(0, len(per), cols):
        chunk = per[i:i + cols]
        rows.append([x for pair in chunk for x in pair] + ["", ""] * (cols - len(chunk)))
    table = format_table(rows, ["category", "AP"] * min(cols, max(len(per), 1)))
    return f"Evaluation results for bbox:\n{head}\nPer-category bbox AP:\n{table}"


class COCOEvaluator:
    """Collect detections of a dataset and compute COCO box AP.

    ``process(inputs, outputs)`` takes model inputs and outputs per batch; ``evaluate()``
    gathers to rank 0, writes ``<output_dir>/coco_instances_results.json`` and returns
    ``{"bbox": metrics}`` on rank 0 (an empty dict elsewhere).
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, backend: str = "faster_coco_eval"):
        _coco_api(backend)  # reject a bad backend before any inference
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.backend = backend
        self.json_file = resolve_json_file(dataset_name)
        if not os.path.isfile(self.json_file):
            raise WrnDetError(f"dataset {dataset_name!r}: annotation file {self.json_file} not found; COCO "
                              "evaluation needs it")
        read_coco_file(self.json_file)  # the ground truth is checked (NaN boxes, unknown ids) before any inference
        self.meta = MetadataCatalog.get(dataset_name)
        self.reset()

    def reset(self) -> None:
        """Forget collected predictions."""
        self._results: List[dict] = []

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        """Convert one batch of outputs to COCO result entries (XYWH boxes, dataset category ids)."""
        to_dataset_id = self.meta.get("contiguous_id_to_thing_dataset_id")
        for x, out in zip(inputs, outputs):
            boxes = out["boxes"].detach().cpu().to(torch.float64)
            boxes[:, 2:] -= boxes[:, :2]
            for b, s, c in zip(boxes.tolist(), out["scores"].tolist(), out["classes"].tolist()):
                cid = to_dataset_id[int(c)] if to_dataset_id else int(c) + 1
                self._results.append({"image_id": x["image_id"], "category_id": cid,
                                      "bbox": [round(v, 3) for v in b], "score": round(float(s), 5)})

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Return ``{"bbox": metrics}`` on rank 0 after writing the results file; ``{}`` on other ranks."""
        parts = comm.gather(self._results, dst=0)
        if not comm.is_main_process():
            return {}
        results = [r for p in parts for r in p]
        if self.output_dir:
            write_json(os.path.join(self.output_dir, "coco_instances_results.json"), results)
        metrics = evaluate_coco_results(self.json_file, results, self.backend, self.meta.get("thing_classes"),
                                        plot_dir=self.output_dir)
        logger.info("%s (%s, %d detections)\n%s", self.dataset_name, self.backend, len(results), _summary_tables(metrics))
        return {"bbox": metrics}
