"""Proposal evaluation: average recall of RPN proposals, and the proposal file of a dataset.

The metric is the one detectron2 reports for ``box_proposals`` (from the original
Detectron's COCO proposal evaluation): for the top ``limit`` proposals of each image,
each ground-truth box is matched greedily to a distinct proposal (the best-covered box
first), and recall is the share of ground-truth boxes covered at IoU >= t; AR is the
mean recall over t = 0.50, 0.55, ..., 0.95. Crowd boxes are ignored; size ranges use
the annotation's ``area`` as COCO does (small < 32², medium 32²..96², large > 96²).
Keys: ``AR@100``, ``ARs@100``, ``ARm@100``, ``ARl@100`` and the same at 1000, in percent.
One difference: the ground-truth boxes of an image without any proposal count as missed,
where detectron2 leaves such an image out (and so reports a higher recall).
"""
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from wrn_det.data.catalog import resolve_json_file
from wrn_det.data.coco import read_coco_file
from wrn_det.data.det_loader import annotation_boxes
from wrn_det.data.proposals import save_proposal_file
from wrn_det.engine import comm

from .evaluator import format_table

__all__ = ["ProposalEvaluator", "average_recall", "AREAS", "LIMITS", "IOU_THRESHOLDS"]

logger = logging.getLogger("wrn_det")

# name suffix -> (min area, max area), inclusive, as detectron2's evaluate_box_proposals
AREAS = OrderedDict([("", (0.0, 1e5 ** 2)), ("s", (0.0, 32.0 ** 2)), ("m", (32.0 ** 2, 96.0 ** 2)),
                     ("l", (96.0 ** 2, 1e5 ** 2))])
LIMITS = (100, 1000)
IOU_THRESHOLDS = np.arange(0.5, 0.95 + 1e-5, 0.05)


def _matched_overlaps(iou: torch.Tensor) -> torch.Tensor:
    """Return, for a (proposals, gt) IoU matrix, the IoU each gt box gets in a greedy one-to-one matching.

    Repeatedly the gt box whose best remaining proposal covers it most is matched to that
    proposal; both leave the pool. Returns min(P, G) IoU values; unmatched gt boxes
    (when P < G) are simply absent and count as misses.
    """
    iou = iou.clone()
    out = []
    for _ in range(min(iou.shape)):
        best, prop = iou.max(dim=0)  # best remaining proposal of each gt box
        g = int(best.argmax())
        out.append(float(best[g]))
        iou[prop[g], :] = -1.0
        iou[:, g] = -1.0
    return torch.tensor(out)


def average_recall(gts: Dict, proposals: Dict, limit: int, area=(0.0, 1e5 ** 2),
                   thresholds: Sequence[float] = IOU_THRESHOLDS) -> Dict[str, object]:
    """Return ``{"ar": float, "recalls": array per threshold, "num_pos": int}`` of ``proposals`` against ``gts``.

    ``gts``: image id -> (boxes (G, 4) XYXY, areas (G,)) of the non-crowd boxes;
    ``proposals``: image id -> boxes (P, 4) XYXY sorted best first (the first ``limit``
    are used). A gt box in an image without proposals counts as missed. ``ar`` is NaN
    when no gt box falls in ``area``.
    """
    overlaps, num_pos = [], 0
    for img_id, (boxes, areas) in gts.items():
        inside = (areas >= area[0]) & (areas <= area[1])
        boxes = boxes[inside]
        num_pos += len(boxes)
        props = proposals.get(img_id)
        if len(boxes) == 0 or props is None or len(props) == 0:
            continue
        overlaps.append(_matched_overlaps(box_iou(props[:limit].double(), boxes.double())))
    overlaps = torch.cat(overlaps) if overlaps else torch.zeros(0)
    recalls = np.array([float((overlaps >= t).sum()) / max(num_pos, 1) for t in thresholds])
    ar = float(recalls.mean()) if num_pos else float("nan")
    return {"ar": ar, "recalls": recalls, "num_pos": num_pos}


def load_gt_boxes(json_file: str) -> Dict:
    """Return image id -> (XYXY boxes (G, 4), areas (G,)) of the non-crowd annotations of a COCO file.

    Every image of the file is present (with zero boxes if it has none). The file is read
    and checked by :func:`wrn_det.data.coco.read_coco_file` (empty boxes are left out). Areas
    are the annotations' ``area`` (the box area when a file lacks it).
    """
    images, _, anns, _ = read_coco_file(json_file)
    by_image = {i: [] for i in images}
    for a in anns:
        if not a.get("iscrowd", 0):
            by_image[a["image_id"]].append(a)
    out = {}
    for img_id, anns in by_image.items():
        boxes = annotation_boxes(anns, torch.float64)
        areas = torch.tensor([float(a["area"]) if isinstance(a.get("area"), (int, float)) else a["bbox"][2] * a["bbox"][3]
                              for a in anns], dtype=torch.float64)
        out[img_id] = (boxes, areas)
    return out


class ProposalEvaluator:
    """Collect the proposals of a dataset, write them to a proposal file and compute average recall.

    ``process(inputs, outputs)`` takes ProposalNetwork outputs; ``evaluate()`` gathers to
    rank 0, writes ``<output_dir>/box_proposals.pkl`` (detectron2's name and format) and
    returns ``{"box_proposals": {"AR@100", "ARs@100", ..., "AR@1000", ...}}`` on rank 0,
    an empty dict elsewhere. The ground-truth boxes are read and checked when the evaluator is
    built, and serve every later evaluation (``reset()`` between them; ``output_dir`` may change).
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.json_file = resolve_json_file(dataset_name)
        self.gt_boxes = load_gt_boxes(self.json_file)
        self.reset()

    def reset(self) -> None:
        """Forget collected proposals."""
        self._items: List[tuple] = []

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        """Keep each image's id, proposal boxes and objectness logits (on the CPU)."""
        for x, out in zip(inputs, outputs):
            self._items.append((x["image_id"], out["proposals"].detach().cpu().float().numpy(),
                                out["objectness_logits"].detach().cpu().float().numpy()))

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Return ``{"box_proposals": metrics}`` on rank 0 after writing the proposal file; ``{}`` elsewhere."""
        parts = comm.gather(self._items, dst=0)
        if not comm.is_main_process():
            return {}
        items = [it for p in parts for it in p]
        if self.output_dir:
            path = save_proposal_file(os.path.join(self.output_dir, "box_proposals.pkl"),
                                      [i for i, _, _ in items], [b for _, b, _ in items], [s for _, _, s in items])
            logger.info("wrote the proposals of %d images of %s to %s", len(items), self.dataset_name, path)
        props = {img_id: torch.from_numpy(b) for img_id, b, _ in items}
        metrics = OrderedDict()
        for limit in LIMITS:
            for suffix, area in AREAS.items():
                metrics[f"AR{suffix}@{limit}"] = average_recall(self.gt_boxes, props, limit, area)["ar"] * 100
        n = [len(b) for _, b, _ in items]
        logger.info("%s: proposal recall (%d images, %.1f proposals per image)\n%s", self.dataset_name, len(items),
                    float(np.mean(n)) if n else 0.0, format_table([list(metrics.values())], list(metrics)))
        return {"box_proposals": metrics}
