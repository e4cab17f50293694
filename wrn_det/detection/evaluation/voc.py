"""Pascal VOC box evaluation: detectron2's ``PascalVOCDetectionEvaluator``'s numbers, computed in one pass.

The metric is the VOC devkit's as detectron2 implements it (from py-faster-rcnn's
``voc_eval``): per class, the detections of every image sorted by score; each is matched
to the object of its class and image it overlaps most, with VOC's pixel-inclusive IoU
(``+1`` on every side), and is a true positive when that IoU exceeds the threshold and the
object is not yet taken, a false positive otherwise; one that matches a ``difficult``
object counts as neither, and difficult objects are not counted as missed. AP is the
11-point AP of VOC2007 for a dataset of year 2007, the area under the precision envelope
(VOC2010 on) for 2012. Returned in percent, under detectron2's names::

    {"bbox": {"AP": mean over IoU 0.50:0.95 (step 0.05), "AP50", "AP75", "AP50-<class>": ...}}

detectron2's evaluator writes its detections to text files (score to 3 decimals, corners to
0.1 pixel, ``xmin``/``ymin`` + 1: the inverse of the dataset's ``- 1``) and reads them back;
the same rounding is applied here, so the numbers are detectron2's on the same detections.
One difference: a class without any (non-difficult) object has AP NaN and is left out of
the means, where detectron2 averages in 0 (2007) or NaN (2012).

Detections of every process are gathered to rank 0 and written to
``<output_dir>/coco_instances_results.json`` in COCO results form (``image_id`` the VOC file id,
``category_id`` 1 + the class index, ``bbox`` XYWH in the dataset dicts' pixel coordinates), the
form ``tools/evaluate.py`` reads.
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

from wrn_det.data.catalog import DatasetCatalog, MetadataCatalog
from wrn_det.data.voc import VOC_YEARS
from wrn_det.engine import comm
from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.fileio import write_json

from .coco import coco_results, summary_tables

__all__ = ["VOCEvaluator", "VOCGroundTruth", "evaluate_voc_results", "voc_ap", "devkit_detections",
           "IOU_THRESHOLDS", "METRICS"]

logger = logging.getLogger("wrn_det")

IOU_THRESHOLDS = tuple(range(50, 100, 5))  # percent, as detectron2 loops over them
METRICS = ("AP", "AP50", "AP75")


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """Return the AP (0..1) of a precision-recall curve: VOC2007's 11-point AP, or the area under the envelope."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # the devkit's points 0, 0.1, ..., 1 (as floats accumulate them)
            p = np.max(prec[rec >= t]) if np.any(rec >= t) else 0.0
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope: the best precision at any higher recall
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _round(values: np.ndarray, decimals: int) -> np.ndarray:
    # detectron2 formats with "%.{decimals}f" and parses back; for float32 values the scaled value is exact in
    # float64, so round-half-even here gives the formatted number
    scale = 10.0 ** decimals
    return np.rint(np.asarray(values, dtype=np.float64) * scale) / scale


def devkit_detections(boxes: np.ndarray, scores: np.ndarray):
    """Return ``(boxes, scores)`` as detectron2's VOC evaluator scores them, from XYXY pixel boxes and scores.

    Boxes become VOC's 1-based corners (``xmin + 1``, ``ymin + 1``; the sum taken in the
    input's precision, float32 for a detector's output) rounded to 0.1 pixel, scores are
    rounded to 3 decimals; both float64.
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    one = np.asarray(1, dtype=boxes.dtype)
    corners = np.stack([boxes[:, 0] + one, boxes[:, 1] + one, boxes[:, 2], boxes[:, 3]], axis=1)
    return _round(corners, 1), _round(scores, 3)


class VOCGroundTruth:
    """The objects of a VOC dataset by class and image, as the devkit's evaluation sees them.

    Built from the dataset dicts (the VOC reader's: ``bbox_mode`` 0, ``[xmin - 1, ymin - 1,
    xmax, ymax]``; COCO-form XYWH boxes are taken too) with the boxes turned back into VOC's
    1-based corners, and each object's ``difficult`` flag.
    """

    def __init__(self, dicts: Sequence[dict], class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.image_ids = []
        # class -> image id -> (boxes (G, 4) float64 in VOC corners, difficult (G,) bool)
        self.objects: List[Dict[object, tuple]] = [{} for _ in self.class_names]
        self.num_positive = np.zeros(len(self.class_names), dtype=np.int64)
        seen = set()
        for d in dicts:
            iid = d["image_id"]
            if iid in seen:
                raise WrnDetError(f"VOC evaluation: image id {iid!r} is in the dataset twice; expected each image once")
            seen.add(iid)
            self.image_ids.append(iid)
            per_class: Dict[int, list] = {}
            for a in d.get("annotations", []):
                if a.get("iscrowd", 0):
                    continue
                x, y, u, v = (float(t) for t in a["bbox"])
                box = [x + 1.0, y + 1.0, u, v] if a.get("bbox_mode", 0) == 0 else [x + 1.0, y + 1.0, x + u, y + v]
                per_class.setdefault(int(a["category_id"]), []).append((box, bool(a.get("difficult", 0))))
            for k, objs in per_class.items():
                if not 0 <= k < len(self.class_names):
                    raise WrnDetError(f"VOC evaluation: image {iid!r} has category id {k}; expected 0.."
                                      f"{len(self.class_names) - 1} (the dataset's {len(self.class_names)} classes)")
                boxes = np.array([b for b, _ in objs], dtype=np.float64)
                difficult = np.array([f for _, f in objs], dtype=bool)
                self.objects[k][iid] = (boxes, difficult)
                self.num_positive[k] += int((~difficult).sum())

    def class_ap(self, k: int, image_ids: Sequence, scores: np.ndarray, boxes: np.ndarray,
                 thresholds: Sequence[float], use_07_metric: bool) -> np.ndarray:
        """Return the AP (0..1) of class ``k`` at each IoU threshold, NaN when the class has no positive object.

        ``image_ids``, ``scores``, ``boxes``: the class's detections in the order they were
        made (ties in score keep detectron2's order), boxes in VOC corners.
        """
        if self.num_positive[k] == 0:
            return np.full(len(thresholds), np.nan)
        order = np.argsort(-scores)  # the same sort as detectron2's, so that equal scores fall the same way
        boxes = boxes[order]
        ids = [image_ids[i] for i in order]
        n = len(ids)
        ovmax = np.full(n, -np.inf)
        match = np.zeros(n, dtype=np.int64)  # index of the matched object over all images of the class
        difficult = np.zeros(n, dtype=bool)
        rows: Dict[object, List[int]] = {}
        for d, iid in enumerate(ids):
            rows.setdefault(iid, []).append(d)
        offset = 0
        for iid, (gt, gt_difficult) in self.objects[k].items():
            idx = rows.get(iid)
            if idx:
                idx = np.asarray(idx)
                bb = boxes[idx]
                # the devkit's overlap, term by term as detectron2 computes it (so the same floats compare)
                ixmin = np.maximum(gt[None, :, 0], bb[:, None, 0])
                iymin = np.maximum(gt[None, :, 1], bb[:, None, 1])
                ixmax = np.minimum(gt[None, :, 2], bb[:, None, 2])
                iymax = np.minimum(gt[None, :, 3], bb[:, None, 3])
                iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
                ih = np.maximum(iymax - iymin + 1.0, 0.0)
                inters = iw * ih
                uni = ((bb[:, None, 2] - bb[:, None, 0] + 1.0) * (bb[:, None, 3] - bb[:, None, 1] + 1.0)
                       + (gt[None, :, 2] - gt[None, :, 0] + 1.0) * (gt[None, :, 3] - gt[None, :, 1] + 1.0) - inters)
                overlaps = inters / uni
                j = overlaps.argmax(axis=1)
                ovmax[idx] = overlaps.max(axis=1)
                match[idx] = offset + j
                difficult[idx] = gt_difficult[j]
            offset += len(gt)
        out = np.empty(len(thresholds))
        for t_i, t in enumerate(thresholds):
            hit = ovmax > t
            tp = np.zeros(n)
            candidates = np.flatnonzero(hit & ~difficult)
            # the first detection (best score) on an object takes it; later ones on the same object are false
            _, first = np.unique(match[candidates], return_index=True)
            tp[candidates[first]] = 1.0
            fp = (~hit).astype(np.float64)
            fp[candidates] = 1.0
            fp[candidates[first]] = 0.0
            tp, fp = np.cumsum(tp), np.cumsum(fp)
            rec = tp / float(self.num_positive[k])
            prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            out[t_i] = voc_ap(rec, prec, use_07_metric)
        return out


def _score(ground_truth: VOCGroundTruth, image_ids: Sequence, classes: np.ndarray, scores: np.ndarray,
           boxes: np.ndarray, use_07_metric: bool) -> "OrderedDict[str, float]":
    """Return the metrics of detections given in devkit form (see :func:`devkit_detections`)."""
    thresholds = [t / 100.0 for t in IOU_THRESHOLDS]
    aps = np.full((len(ground_truth.class_names), len(thresholds)), np.nan)
    classes = np.asarray(classes, dtype=np.int64)
    for k in range(len(ground_truth.class_names)):
        sel = np.flatnonzero(classes == k)
        aps[k] = ground_truth.class_ap(k, [image_ids[i] for i in sel], scores[sel], boxes[sel], thresholds,
                                       use_07_metric)
    aps *= 100
    valid = ~np.isnan(aps[:, 0])
    per_iou = {t: float(np.mean(aps[valid, i])) if valid.any() else float("nan")
               for i, t in enumerate(IOU_THRESHOLDS)}
    out = OrderedDict([("AP", float(np.mean(list(per_iou.values())))), ("AP50", per_iou[50]), ("AP75", per_iou[75])])
    for k, name in enumerate(ground_truth.class_names):
        out[f"AP50-{name}"] = float(aps[k, 0])
    return out


def evaluate_voc_results(ground_truth: VOCGroundTruth, results: List[dict], year: int) -> "OrderedDict[str, float]":
    """Score detections in COCO results form against a VOC dataset; returns the metrics (see the module's docstring).

    ``results``: ``{"image_id": file id, "category_id": 1 + class index, "bbox": [x, y, w, h]
    in the dataset dicts' pixel coordinates, "score"}`` (checked by
    :func:`~wrn_det.detection.evaluation.coco.read_coco_results`). ``year``: 2007 (11-point
    AP) or 2012 (area AP).
    """
    if year not in VOC_YEARS:
        raise WrnDetError(f"VOC evaluation: year {year!r}; expected 2007 (11-point AP) or 2012 (area AP)")
    xywh = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes, scores = devkit_detections(xyxy, np.array([r["score"] for r in results], dtype=np.float64))
    classes = np.array([r["category_id"] - 1 for r in results], dtype=np.int64)
    return _score(ground_truth, [r["image_id"] for r in results], classes, scores, boxes, year == 2007)


def voc_tables(metrics: Dict[str, float]) -> str:
    """Return the tables of a VOC evaluation: AP, AP50, AP75, then AP50 per class."""
    return summary_tables(metrics, METRICS, per_class_prefix="AP50-")


class VOCEvaluator:
    """Collect detections of a VOC dataset and compute VOC box AP (the metric of the dataset's year).

    The same face as :class:`~wrn_det.detection.evaluation.COCOEvaluator`: ``process(inputs,
    outputs)`` per batch, ``evaluate()`` gathers to rank 0, writes
    ``<output_dir>/coco_instances_results.json`` and returns ``{"bbox": metrics}`` there (an
    empty dict elsewhere). The ground truth (``dicts``, or the dataset's dicts from the
    catalog) is read once, when the evaluator is built.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, dicts: Optional[List[dict]] = None):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        self.year = meta.get("year")
        if self.year not in VOC_YEARS:
            raise WrnDetError(f"dataset {dataset_name!r} has year {self.year!r}; the VOC evaluation expects 2007 "
                              "(11-point AP) or 2012 (area AP) (register it with register_pascal_voc)")
        classes = meta.get("thing_classes")
        if dicts is None:
            dicts = DatasetCatalog.get(dataset_name)
            classes = MetadataCatalog.get(dataset_name).get("thing_classes")
        if not classes:
            raise WrnDetError(f"dataset {dataset_name!r} has no thing_classes; the VOC evaluation needs its class names")
        self.ground_truth = VOCGroundTruth(dicts, classes)
        self.reset()

    def reset(self) -> None:
        """Forget collected predictions."""
        self._results: List[dict] = []
        self._dets: List[tuple] = []

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        """Keep one batch's detections, in devkit form for the metric and in COCO results form for the file."""
        for x, out in zip(inputs, outputs):
            self._results.extend(coco_results(out, x["image_id"]))
            # the detector's own precision (float32), as detectron2's evaluator receives it
            boxes = out["boxes"].detach().cpu().float().numpy()
            scores = out["scores"].detach().cpu().float().numpy()
            boxes, scores = devkit_detections(boxes, scores)
            classes = out["classes"].detach().cpu().numpy().astype(np.int64)
            self._dets.append((x["image_id"], classes, scores, boxes))

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Return ``{"bbox": metrics}`` on rank 0 after writing the results file; ``{}`` on other ranks."""
        parts = comm.gather((self._results, self._dets), dst=0)
        if not comm.is_main_process():
            return {}
        results = [r for p in parts for r in p[0]]
        dets = [d for p in parts for d in p[1]]
        if self.output_dir:
            write_json(os.path.join(self.output_dir, "coco_instances_results.json"), results)
        image_ids = [iid for iid, c, _, _ in dets for _ in range(len(c))]
        classes = np.concatenate([c for _, c, _, _ in dets]) if dets else np.zeros(0, np.int64)
        scores = np.concatenate([s for _, _, s, _ in dets]) if dets else np.zeros(0)
        boxes = np.concatenate([b for _, _, _, b in dets]) if dets else np.zeros((0, 4))
        logger.info("evaluating %s with the VOC%d metric (%s AP)", self.dataset_name, self.year,
                    "11-point" if self.year == 2007 else "area")
        metrics = _score(self.ground_truth, image_ids, classes, scores, boxes, self.year == 2007)
        logger.info("%s (VOC%d metric, %d detections)\n%s", self.dataset_name, self.year, len(results),
                    voc_tables(metrics))
        return {"bbox": metrics}
