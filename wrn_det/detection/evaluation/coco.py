"""COCO box evaluation: results file, AP table, and the one conversion of detections to COCO results.

Predictions of every process are gathered to rank 0, written to
``<output>/inference/coco_instances_results.json`` and scored once with
faster-coco-eval (the default; the same numbers as pycocotools, computed in C++) or
pycocotools (``TEST.COCO_EVAL_BACKEND``). Metrics are returned in percent under
detectron2's names: ``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>"...}}``.
Each evaluation also draws its precision-recall curves, per-class AP and confusion matrix
into the same folder (:mod:`wrn_det.detection.evaluation.plots`).

At most ``max_dets`` detections per image are scored (``TEST.DETECTIONS_PER_IMAGE``, 100
by default, COCO's): COCOeval's ``maxDets`` ladder is ``[1, 10, max_dets]``, as detectron2's
``max_dets_per_image``, and AP is read at its top, so a dense scene (hundreds of objects an
image) is scored on all its detections once the cap is raised. The table's recall columns
are named for the ladder (``AR@1``, ``AR@10``, ``AR@<max_dets>``). When an image holds more
objects than the cap, one warning says how many images and what to raise.

The ground truth is read and checked once (:class:`CocoGroundTruth`) and serves every
evaluation of a run: a :class:`COCOEvaluator` is built once per test set and ``reset()``
between evaluations.
"""
import contextlib
import io
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torchvision.ops import box_convert

from wrn_det.data.catalog import MetadataCatalog, resolve_json_file
from wrn_det.data.coco import read_coco_file
from wrn_det.engine import comm
from wrn_det.engine.errors import ConfigError, WrnDetError, a_type
from wrn_det.engine.fileio import read_json, write_json

from .evaluator import format_table
from .plots import write_evaluation_plots

__all__ = ["COCOEvaluator", "CocoGroundTruth", "coco_results", "evaluate_coco_results", "read_coco_results",
           "summary_tables", "max_dets_ladder", "BACKENDS", "METRICS", "MAX_DETS", "MAX_RESULTS_BYTES"]

logger = logging.getLogger("wrn_det")

BACKENDS = ("faster_coco_eval", "pycocotools")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MAX_DETS = 100  # COCO's cap on the detections scored per image

#: The largest results file read (1 GiB: some ten million detections); a larger one is refused unread.
MAX_RESULTS_BYTES = 1 << 30


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
        images, _, anns, _ = read_coco_file(json_file, self._data)
        self.image_ids = set(images)
        self.category_ids = {c["id"] for c in self._data["categories"]}
        counts: Dict[int, int] = dict.fromkeys(images, 0)
        for a in anns:
            if not a.get("iscrowd", 0):
                counts[a["image_id"]] += 1
        self.objects_per_image = counts  # what COCOeval can match, for the dense-scene warning
        self._index = {}

    def warn_if_dense(self, max_dets: int, key: str = "TEST.DETECTIONS_PER_IMAGE") -> int:
        """Log one warning when an image holds more objects than the ``max_dets`` detections scored per image.

        The warning names how many images and ``key``, the setting to raise. Returns the
        number of such images.
        """
        over = [n for n in self.objects_per_image.values() if n > max_dets]
        if over:
            logger.warning("%d of %d images hold more than %d objects (up to %d): only %d detections per image are "
                           "scored, so their recall and AP cannot reach 100; raise %s to at least %d",
                           len(over), len(self.objects_per_image), max_dets, max(over), max_dets, key, max(over))
        return len(over)

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


def max_dets_ladder(max_dets: int, key: str = "TEST.DETECTIONS_PER_IMAGE") -> List[int]:
    """Return COCOeval's ``maxDets`` for a cap of ``max_dets`` detections per image: ``[1, 10, max_dets]``.

    detectron2's ``max_dets_per_image`` ladder. Raises :class:`ConfigError` naming ``key`` for
    a cap that is not a positive integer.
    """
    if isinstance(max_dets, bool) or not isinstance(max_dets, (int, np.integer)) or max_dets < 1:
        raise ConfigError(f"{key} must be a positive number of detections per image, got {max_dets!r}")
    return [1, 10, int(max_dets)]


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean() * 100) if valid.size else float("nan")


def _summary(ev):
    """Return (detectron2's metrics, recall by ``AR@<n>``) of an accumulated COCOeval, read at the ladder's top.

    Computed here rather than by ``summarize()``: pycocotools' reads AP at 100 detections
    whatever ``maxDets`` holds, faster-coco-eval's at the ladder's top; both fill the same arrays.
    """
    p = ev.params
    precision = np.asarray(ev.eval["precision"])  # (IoU thresholds, recall points, classes, areas, max dets)
    recall = np.asarray(ev.eval["recall"])  # (IoU thresholds, classes, areas, max dets)
    ious = np.asarray(p.iouThrs, dtype=np.float64)
    area = {name: i for i, name in enumerate(p.areaRngLbl)}
    top = len(p.maxDets) - 1
    at = {t: np.flatnonzero(np.abs(ious - t) < 1e-9) for t in (0.5, 0.75)}
    metrics = OrderedDict([
        ("AP", _mean_valid(precision[:, :, :, area["all"], top])),
        ("AP50", _mean_valid(precision[at[0.5], :, :, area["all"], top])),
        ("AP75", _mean_valid(precision[at[0.75], :, :, area["all"], top])),
        ("APs", _mean_valid(precision[:, :, :, area["small"], top])),
        ("APm", _mean_valid(precision[:, :, :, area["medium"], top])),
        ("APl", _mean_valid(precision[:, :, :, area["large"], top])),
    ])
    ar = OrderedDict((f"AR@{n}", _mean_valid(recall[:, :, area["all"], i])) for i, n in enumerate(p.maxDets))
    return metrics, ar


def evaluate_coco_results(ground_truth: Union[str, CocoGroundTruth], results: List[dict],
                          backend: str = "faster_coco_eval", class_names: Optional[List[str]] = None,
                          plot_dir: Optional[str] = None, max_dets: int = MAX_DETS,
                          max_dets_key: str = "TEST.DETECTIONS_PER_IMAGE",
                          recall: Optional[dict] = None) -> "OrderedDict[str, float]":
    """Score box ``results`` (COCO results format) against ``ground_truth`` (an annotation file, or one read already).

    Returns an OrderedDict of AP, AP50, AP75, APs, APm, APl and ``AP-<category name>``,
    in percent (NaN where undefined, all NaN when there are no results), with at most
    ``max_dets`` detections per image scored (the best). An image with more objects than
    that gets one warning naming ``max_dets_key``, the setting to raise. ``recall``, when
    given, receives the average recall ``AR@1``, ``AR@10``, ``AR@<max_dets>`` (the table's
    columns). With ``plot_dir``, the precision-recall curves, per-class AP and confusion
    matrix are drawn there too (:mod:`wrn_det.detection.evaluation.plots`).
    """
    ladder = max_dets_ladder(max_dets, max_dets_key)
    _, COCOeval = _coco_api(backend)
    if not isinstance(ground_truth, CocoGroundTruth):
        ground_truth = CocoGroundTruth(ground_truth)
    gt = ground_truth.index(backend)
    cats = sorted(gt.loadCats(gt.getCatIds()), key=lambda c: c["id"])
    names = class_names or [c["name"] for c in cats]
    ground_truth.warn_if_dense(max_dets, max_dets_key)
    if not results:
        logger.warning("no predictions: every AP is NaN")
        if recall is not None:
            recall.update((f"AR@{n}", float("nan")) for n in ladder)
        return OrderedDict([(k, float("nan")) for k in METRICS] + [(f"AP-{n}", float("nan")) for n in names])
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        kwargs = {"print_function": lambda *a, **k: None} if backend == "faster_coco_eval" else {}
        ev = COCOeval(gt, dt, "bbox", **kwargs)
        ev.params.maxDets = ladder
        ev.evaluate()
        ev.accumulate()
    out, ar = _summary(ev)
    if recall is not None:
        recall.update(ar)
    # precision: (IoU thresholds, recall points, categories, area ranges, max detections)
    precision = np.asarray(ev.eval["precision"])
    for k, name in enumerate(names):
        out[f"AP-{name}"] = _mean_valid(precision[:, :, k, 0, -1])
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


def summary_tables(metrics: Dict[str, float], columns: Sequence[str], per_class_prefix: str = "AP-",
                   extra: Optional[Dict[str, float]] = None) -> str:
    """Return the evaluation's tables as detectron2 prints them: ``columns`` of ``metrics`` (then ``extra``'s),
    and the per-class values (keys starting with ``per_class_prefix``), three classes a row."""
    head_keys = list(columns) + list(extra or {})
    values = {**metrics, **(extra or {})}
    head = format_table([[values[k] for k in head_keys]], head_keys)
    per = [(k[len(per_class_prefix):], v) for k, v in metrics.items() if k.startswith(per_class_prefix)]
    label = per_class_prefix.rstrip("-")
    cols = 3
    rows = []
    for i in range(0, len(per), cols):
        chunk = per[i:i + cols]
        rows.append([x for pair in chunk for x in pair] + ["", ""] * (cols - len(chunk)))
    table = format_table(rows, ["category", label] * min(cols, max(len(per), 1)))
    return f"Evaluation results for bbox:\n{head}\nPer-category bbox {label}:\n{table}"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RESULT_FORM = '{"image_id", "category_id", "bbox": [x, y, width, height], "score"}'


def read_coco_results(path: str, image_ids: Optional[set] = None, category_ids: Optional[set] = None
                      ) -> Dict[object, List[dict]]:
    """Return the detections of a COCO box results file grouped by image id.

    Each entry must be an object with an ``image_id`` (an integer, or with ``image_ids``
    one of them: the file ids of a VOC dataset are strings), an integer ``category_id``
    (one of ``category_ids`` when given), a ``bbox`` of four finite numbers ``[x, y, width,
    height]`` with non-negative sides and a finite ``score``. A file over
    :data:`MAX_RESULTS_BYTES` is refused unread. Raises :class:`WrnDetError` naming the file
    and the entry otherwise.
    """
    if not os.path.isfile(path):
        raise WrnDetError(f"results file {path} not found (an evaluation writes inference/coco_instances_results.json)")
    size = os.path.getsize(path)
    if size > MAX_RESULTS_BYTES:
        raise WrnDetError(f"results file {path} is {_size(size)}; expected at most {_size(MAX_RESULTS_BYTES)} of "
                          "detections (keep each image's best ones)")
    data = read_json(path, "results file")
    if not isinstance(data, list):
        raise WrnDetError(f"results file {path}: expected a list of detections {_RESULT_FORM}, got {a_type(data)}")
    by_image: Dict[object, List[dict]] = {}
    for i, r in enumerate(data):
        where = f"results file {path}, entry {i}"
        if not isinstance(r, dict):
            raise WrnDetError(f"{where}: expected an object {_RESULT_FORM}, got {a_type(r)}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in r:
                raise WrnDetError(f"{where}: has no {key!r}; expected {_RESULT_FORM}")
        img, cat, box, score = r["image_id"], r["category_id"], r["bbox"], r["score"]
        known = image_ids is None or (type(img) in (int, str) and img in image_ids)
        if not known or (image_ids is None and type(img) is not int):
            raise WrnDetError(f"{where}: image_id {img!r:.60} is not an image of the dataset; expected one of its "
                              "image ids")
        if type(cat) is not int or (category_ids is not None and cat not in category_ids):
            allowed = f" ({', '.join(map(str, sorted(category_ids)[:25]))})" if category_ids else ""
            raise WrnDetError(f"{where}: category_id {cat!r:.60} is not a category of the dataset; expected one of "
                              f"its category ids{allowed}")
        if not isinstance(box, list) or len(box) != 4 or not all(_finite_number(v) for v in box) or box[2] < 0 \
                or box[3] < 0:
            raise WrnDetError(f"{where}: bbox {box!r:.80} is not [x, y, width, height] with finite values and sides "
                              ">= 0")
        if not _finite_number(score):
            raise WrnDetError(f"{where}: score {score!r} is not a finite number")
        by_image.setdefault(img, []).append({"image_id": img, "category_id": cat, "bbox": [float(v) for v in box],
                                             "score": float(score)})
    return by_image


class COCOEvaluator:
    """Collect detections of a dataset and compute COCO box AP.

    ``process(inputs, outputs)`` takes model inputs and outputs per batch; ``evaluate()``
    gathers to rank 0, writes ``<output_dir>/coco_instances_results.json`` and returns
    ``{"bbox": metrics}`` on rank 0 (an empty dict elsewhere). The ground truth is read and
    checked when the evaluator is built, and serves every later evaluation (``reset()``
    between them; ``output_dir`` may change). ``max_dets``: the detections scored per image
    (``TEST.DETECTIONS_PER_IMAGE``).
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, backend: str = "faster_coco_eval",
                 max_dets: int = MAX_DETS):
        _coco_api(backend)  # reject a bad backend before any inference
        max_dets_ladder(max_dets)
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.backend = backend
        self.max_dets = int(max_dets)
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
        recall: Dict[str, float] = {}
        metrics = evaluate_coco_results(self.ground_truth, results, self.backend, self.meta.get("thing_classes"),
                                        plot_dir=self.output_dir, max_dets=self.max_dets, recall=recall)
        logger.info("%s (%s, %d detections)\n%s", self.dataset_name, self.backend, len(results),
                    summary_tables(metrics, METRICS, extra=recall))
        return {"bbox": metrics}
