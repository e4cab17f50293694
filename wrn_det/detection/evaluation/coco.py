"""COCO box evaluation: results file, AP table, and the one conversion of detections to COCO results.

Predictions of every process are gathered to rank 0, written to
``<output>/inference/coco_instances_results.json`` and scored once with
faster-coco-eval (the default; the same numbers as pycocotools, computed in C++) or
pycocotools (``TEST.COCO_EVAL_BACKEND``). Metrics are returned in percent under
detectron2's names: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>"...}}``.
Each evaluation also draws its precision-recall curves, per-class AP and confusion matrix
into the same folder (:mod:`wrn_det.detection.evaluation.plots`).

The ground truth is read and checked once (:class:`CocoGroundTruth`) and serves every
evaluation of a run: a :class:`COCOEvaluator` is built once per test set and ``reset()``
between evaluations.
"""
import contextlib
import io
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torchvision.ops import box_convert

from wrn_det.data.catalog import MetadataCatalog, resolve_json_file
from wrn_det.data.coco import read_coco_file
from wrn_det.engine import comm
from wrn_det.engine.errors import ConfigError, WrnDetError
from wrn_det.engine.fileio import read_json, write_json

from .evaluator import format_table
from .plots import write_evaluation_plots

__all__ = ["COCOEvaluator", "CocoGroundTruth", "coco_results", "evaluate_coco_results", "BACKENDS", "METRICS"]

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


def coco_results(prediction: dict, image_id, contiguous_id_to_thing_dataset_id: Optional[dict] = None,
                 file_name: Optional[str] = None) -> List[dict]:
    """Return one image's detections in COCO results format (XYWH boxes, dataset category ids).

    ``prediction``: a detector's output for the image (``boxes`` XYXY, ``scores``, ``classes``
    contiguous ids). Without an id map a category id is the contiguous id + 1. Rounded as
    detectron2's results files (boxes to 1e-3 pixels, scores to 1e-5); with ``file_name``
    every entry also names the image. The evaluation's results file and ``tools/demo.py``'s
    both come from here.
    """
    boxes = box_convert(prediction["boxes"].detach().cpu().to(torch.float64), "xyxy", "xywh")
    to_dataset_id = contiguous_id_to_thing_dataset_id
    out = []
    for b, s, c in zip(boxes.tolist(), prediction["scores"].tolist(), prediction["classes"].tolist()):
        cid = int(to_dataset_id[int(c)]) if to_dataset_id else int(c) + 1
        r = {"image_id": image_id, "category_id": cid, "bbox": [round(v, 3) for v in b], "score": round(float(s), 5)}
        if file_name is not None:
            r["file_name"] = file_name
        out.append(r)
    return out


class CocoGroundTruth:
    """A COCO annotation file read and checked once, indexed for evaluation by each backend that asks.

    The file is checked by :func:`wrn_det.data.coco.read_coco_file` (one line naming the file
    and the entry when it is broken); :meth:`index` builds a backend's ``COCO`` object from the
    same content, once per backend.
    """

    def __init__(self, json_file: str):
        self.json_file = json_file
        if not os.path.isfile(json_file):
            raise WrnDetError(f"annotation file {json_file} not found; COCO evaluation needs it")
        self._data = read_json(json_file)
        read_coco_file(json_file, self._data)
        self._index = {}

    def index(self, backend: str = "faster_coco_eval"):
        """Return the ``COCO`` object of ``backend`` (faster_coco_eval or pycocotools) over this ground truth."""
        if backend not in self._index:
            COCO, _ = _coco_api(backend)
            with contextlib.redirect_stdout(io.StringIO()):
                if backend == "faster_coco_eval":
                    gt = COCO(self._data)
                else:
                    gt = COCO()
                    gt.dataset = self._data
                    gt.createIndex()
            self._index[backend] = gt
        return self._index[backend]


def evaluate_coco_results(ground_truth: Union[str, CocoGroundTruth], results: List[dict],
                          backend: str = "faster_coco_eval", class_names: Optional[List[str]] = None,
                          plot_dir: Optional[str] = None) -> "OrderedDict[str, float]":
    """Score box ``results`` (COCO results format) against ``ground_truth`` (an annotation file, or one read already).

    Returns an OrderedDict of AP, AP50, AP75, APs, APm, APl and ``AP-<category name>``,
    in percent (NaN where undefined, all NaN when there are no results). With
    ``plot_dir``, the precision-recall curves, per-class AP and confusion matrix are
    drawn there too (:mod:`wrn_det.detection.evaluation.plots`).
    """
    _, COCOeval = _coco_api(backend)
    if not isinstance(ground_truth, CocoGroundTruth):
        ground_truth = CocoGroundTruth(ground_truth)
    gt = ground_truth.index(backend)
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
        _write_plots(plot_dir, ev, ground_truth, results, names)
    return out


def _write_plots(plot_dir: str, ev, ground_truth: CocoGroundTruth, results: List[dict], names: List[str]) -> None:
    try:
        paths = write_evaluation_plots(plot_dir, ev, ground_truth.index("faster_coco_eval"), results, names)
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
    ``{"bbox": metrics}`` on rank 0 (an empty dict elsewhere). The ground truth is read and
    checked when the evaluator is built, and serves every later evaluation (``reset()``
    between them; ``output_dir`` may change).
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
        # the ground truth is checked (NaN boxes, unknown ids) before any inference, and kept for every evaluation
        self.ground_truth = CocoGroundTruth(self.json_file)
        self.meta = MetadataCatalog.get(dataset_name)
        self.reset()

    def reset(self) -> None:
        """Forget collected predictions."""
        self._results: List[dict] = []

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        """Convert one batch of outputs to COCO result entries (XYWH boxes, dataset category ids)."""
        to_dataset_id = self.meta.get("contiguous_id_to_thing_dataset_id")
        for x, out in zip(inputs, outputs):
            self._results.extend(coco_results(out, x["image_id"], to_dataset_id))

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Return ``{"bbox": metrics}`` on rank 0 after writing the results file; ``{}`` on other ranks."""
        parts = comm.gather(self._results, dst=0)
        if not comm.is_main_process():
            return {}
        results = [r for p in parts for r in p]
        if self.output_dir:
            write_json(os.path.join(self.output_dir, "coco_instances_results.json"), results)
        metrics = evaluate_coco_results(self.ground_truth, results, self.backend, self.meta.get("thing_classes"),
                                        plot_dir=self.output_dir)
        logger.info("%s (%s, %d detections)\n%s", self.dataset_name, self.backend, len(results), _summary_tables(metrics))
        return {"bbox": metrics}
