"""Drawing boxes on images: detections, ground truth, and the mistakes between them.

Boxes and labels are drawn with torchvision's ``draw_bounding_boxes``; labels sit on a
filled background in the box's colour, in a TrueType font (DejaVu Sans, which ships
with matplotlib) sized to the picture, and small images are enlarged first so that the
labels stay readable. Pictures are written as PNG through the project's atomic writer.
:func:`read_coco_results`, the checked reader of a COCO results file, is named here for the drawing tools
(it lives with the COCO evaluation).
"""
import math
import os
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from wrn_det.engine.fileio import atomic_write

from .evaluation.coco import read_coco_results  # noqa: F401  (the drawing tools' reader of results files)

__all__ = ["class_colour", "ERROR_COLOUR", "draw_boxes", "detection_labels", "side_by_side", "save_png", "caption",
           "enlarge_factor", "read_coco_results", "match_detections", "MIN_SIDE"]

MIN_SIDE = 512          # pictures are enlarged by an integer factor until their longer side reaches this
ERROR_COLOUR = (230, 25, 25)   # false positives and missed objects
# distinct colours for the classes (matplotlib's tab10 without its red, then tab20's lighter shades)
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194),
            (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
            (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]


def class_colour(k: int) -> Tuple[int, int, int]:
    """Return the RGB colour of contiguous class id ``k`` (the same in every picture)."""
    return _PALETTE[int(k) % len(_PALETTE)]


def _font_path() -> Optional[str]:
    try:
        from matplotlib import font_manager

        path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
        return path if path and os.path.isfile(path) else None
    except Exception:  # matplotlib missing or its font cache unreadable: PIL's small default font
        return None


def detection_labels(class_names: Sequence[str], scores: Optional[Iterable[float]] = None,
                     prefix: Optional[Sequence[str]] = None) -> List[str]:
    """Return box labels ``"<prefix> <name> <score>%"`` (score and prefix when given)."""
    scores = list(scores) if scores is not None else [None] * len(class_names)
    prefix = list(prefix) if prefix is not None else [""] * len(class_names)
    return [" ".join(p for p in (pre, name, f"{100 * s:.0f}%" if s is not None else "") if p)
            for pre, name, s in zip(prefix, class_names, scores)]


def _text_colour(rgb) -> Tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def enlarge_factor(height: int, width: int, min_side: int = MIN_SIDE) -> int:
    """Return the integer factor that brings the longer side of an image to at least ``min_side`` (1 for large images)."""
    return max(1, int(math.ceil(min_side / max(height, width, 1))))


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: Sequence[str], colours: Sequence[Tuple[int, int, int]],
               min_side: int = MIN_SIDE) -> torch.Tensor:
    """Return a uint8 (3, H', W') picture of ``image`` (uint8 RGB (3, H, W)) with the boxes and labels drawn.

    ``boxes``: (N, 4) XYXY in the image's pixels (clipped to it). The picture is the image
    enlarged by :func:`enlarge_factor`, so that labels are readable on small images.
    """
    from torchvision.transforms.v2 import functional as TF
    from torchvision.utils import draw_bounding_boxes

    h, w = int(image.shape[1]), int(image.shape[2])
    f = enlarge_factor(h, w, min_side)
    picture = TF.resize(image, [h * f, w * f], antialias=True) if f > 1 else image.clone()
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * f
    if boxes.shape[0] == 0:
        return picture
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w * f - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h * f - 1)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    side = max(h, w) * f
    font = _font_path()
    colours = [tuple(int(v) for v in c) for c in colours]
    return draw_bounding_boxes(picture, boxes, labels=list(labels), colors=colours, width=max(2, round(side / 300)),
                               font=font, font_size=max(11, round(side / 40)) if font else None, fill_labels=True,
                               label_colors=[_text_colour(c) for c in colours], label_background_colors=colours)


def caption(picture: torch.Tensor, text: str) -> torch.Tensor:
    """Return ``picture`` with a white strip on top holding ``text``."""
    from PIL import Image, ImageDraw, ImageFont

    w = int(picture.shape[2])
    size = max(12, round(w / 30))
    font_path = _font_path()
    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default()
    strip = Image.new("RGB", (w, size + 10), (255, 255, 255))
    ImageDraw.Draw(strip).text((6, 4), text, fill=(0, 0, 0), font=font)
    import numpy as np

    top = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)
    return torch.cat([top, picture], dim=1)


def side_by_side(pictures: Sequence[torch.Tensor], gap: int = 8) -> torch.Tensor:
    """Return the pictures placed left to right on white, separated by ``gap`` pixels."""
    h = max(int(p.shape[1]) for p in pictures)
    w = sum(int(p.shape[2]) for p in pictures) + gap * (len(pictures) - 1)
    out = torch.full((3, h, w), 255, dtype=torch.uint8)
    x = 0
    for p in pictures:
        out[:, : p.shape[1], x: x + p.shape[2]] = p
        x += int(p.shape[2]) + gap
    return out


def save_png(picture: torch.Tensor, path: str) -> str:
    """Write a uint8 (3, H, W) RGB picture to ``path`` as PNG, atomically; returns ``path``."""
    from PIL import Image

    array = picture.permute(1, 2, 0).contiguous().numpy()
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), suffix=".png")


def match_detections(json_file: str, results: List[dict], threshold: float, iou: float = 0.5):
    """Return ``(gt, dt)``: faster-coco-eval COCO objects of the annotations and of the detections scoring at least
    ``threshold``, matched as COCO does within each class at ``iou``.

    Afterwards a detection that matches no object carries ``"fp": True``, an object that
    no detection matches ``"fn": True`` (a missed object). ``dt`` is None without detections.
    """
    import contextlib
    import io

    from faster_coco_eval import COCO
    from faster_coco_eval.extra import PreviewResults

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        kept = [dict(r) for r in results if r["score"] >= threshold]
        if not kept:  # nothing detected: every object is missed
            for a in gt.anns.values():
                a["fn"] = True
            return gt, None
        preview = PreviewResults(gt, gt.loadRes(kept), iouType="bbox", iou_tresh=iou, min_score=threshold, useCats=True)
    return preview.cocoGt, preview.cocoDt


