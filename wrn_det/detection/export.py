"""Take a trained detector out of Python: TorchScript and ONNX with the pre- and post-processing inside.

:class:`InferenceModel` wraps a builtin Faster R-CNN into one module from a uint8 RGB
image ``(3, H, W)`` of any size to ``boxes`` (float32 ``(N, 4)``, XYXY in the image's
pixels), ``scores`` (``(N,)``) and ``classes`` (int64 ``(N,)``, contiguous ids, best
first). Inside: the test-time resize (shortest side ``INPUT.MIN_SIZE_TEST``, longest at
most ``INPUT.MAX_SIZE_TEST``, bilinear with antialiasing), the channel order of
``INPUT.FORMAT``, pixel normalisation, padding to the backbone's stride, the backbone,
the RPN with its NMS, RoIAlign, the box head, per-class NMS, and the mapping of the
boxes back to the image. Every size is computed from the input's shape, so one
exported file takes any image size.

What stays outside: decoding the image file into an RGB array (and moving it to CHW),
batching several images (one image per call), and the class names and dataset category
ids, which travel with the file as metadata (``wrn_det.json`` in a TorchScript archive,
``metadata_props`` in ONNX) rather than as graph outputs.

Both formats are traced (``torch.jit.trace``; ONNX through PyTorch's TorchScript-based
exporter, opset 18, with torchvision's ONNX forms of NMS and RoIAlign); the wrapper keeps
every data-dependent step in tensor operations, so one trace holds for every input.

The resize: TorchScript keeps PyTorch's uint8 antialiased kernel, the one the
evaluation's mapper runs on the CPU, so a TorchScript model gives the evaluation's
detections. ONNX has no equal of that kernel (onnxruntime's uint8 ``Resize`` differs by a
grey level on about 1% of the pixels); the ONNX model resizes in float32 instead (ONNX
``Resize`` with ``antialias=1``, ``exclude_outside=1``, which onnxruntime computes as
PyTorch does to within 2e-3 grey levels) and therefore matches the same float-resizing
module in PyTorch, while it can differ from the evaluation's detections by a few
hundredths of a pixel where the image is resized (measured on the shapes detector; more
for a less stable network, docs/use_and_export.md). An image already at the test size is
not resized and gives the same detections in all three.

The check before a file is written compares detections as a user would
(:func:`match_detections`: by class and IoU, borderline ones allowed to differ), not
index by index: one detection at the score threshold or a near tie in NMS must not fail a
faithful export.
"""
import copy
import json
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops

from wrn_det.engine.fileio import atomic_write
from wrn_det.engine.errors import ConfigError, WrnDetError

__all__ = ["InferenceModel", "export_torchscript", "export_onnx", "FORMATS", "ONNX_OPSET", "metadata_json",
           "match_detections", "check_detections", "detection_limits", "check_images", "check_model_folder",
           "BOX_TOLERANCE", "SCORE_TOLERANCE", "MATCH_IOU"]

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18  # the first opset whose Resize antialiases


def _resized_size(h: torch.Tensor, w: torch.Tensor, short: int, max_size: Optional[int]):
    """Return the (height, width) of the test resize as int64 tensors, as torchvision's Resize([short], max_size)."""
    hf, wf = h.to(torch.float64), w.to(torch.float64)
    s, l = torch.minimum(hf, wf), torch.maximum(hf, wf)
    new_short = torch.full_like(s, float(short))
    new_long = torch.floor(short * l / s)
    if max_size is not None:
        over = new_long > max_size
        new_short = torch.where(over, torch.floor(max_size * new_short / new_long), new_short)
        new_long = torch.where(over, torch.full_like(new_long, float(max_size)), new_long)
    tall = wf <= hf
    new_h = torch.where(tall, new_long, new_short).to(torch.int64)
    new_w = torch.where(tall, new_short, new_long).to(torch.int64)
    return new_h, new_w


class InferenceModel(nn.Module):
    """One image in, detections out: a builtin ``GeneralizedRCNN`` with its test-time processing (see the module docstring).

    ``forward(image)`` takes a uint8 RGB ``(3, H, W)`` tensor and returns ``(boxes, scores, classes)``.
    """

    def __init__(self, model: nn.Module, cfg, float_resize: bool = False):
        super().__init__()
        self.float_resize = bool(float_resize)
        if getattr(model, "rpn", None) is None or not hasattr(model, "roi_heads"):
            raise ConfigError("export needs a Faster R-CNN (MODEL.META_ARCHITECTURE GeneralizedRCNN with an RPN)")
        # a frozen copy: traced outputs need no gradients, and the caller's model stays as it was
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.min_size = int(cfg.INPUT.MIN_SIZE_TEST)
        max_size = int(cfg.INPUT.MAX_SIZE_TEST)
        # as DetectionMapper: no resize for MIN_SIZE_TEST 0, no cap unless it exceeds the short side
        self.max_size = max_size if max_size > self.min_size else None
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.size_divisibility = max(int(model.size_divisibility), 1)
        self.limits = detection_limits(cfg)  # the cuts its detections are compared at (check_detections)
        self.eval()  # exporters put a module back into the mode it had; this one only infers

    def resized_size(self, image: torch.Tensor) -> Tuple[int, int]:
        """Return the ``(height, width)`` the test-time resize gives a ``(3, H, W)`` image."""
        if self.min_size <= 0:
            return int(image.shape[1]), int(image.shape[2])
        h, w = _resized_size(torch.tensor(image.shape[1]), torch.tensor(image.shape[2]), self.min_size, self.max_size)
        return int(h), int(w)

    def _resize(self, image: torch.Tensor, new_h: torch.Tensor, new_w: torch.Tensor) -> torch.Tensor:
        x = image[None]
        if self.float_resize:  # what ONNX Resize computes alike (see the module docstring)
            return F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
        if x.device.type == "cpu":  # PyTorch's uint8 kernel, which the evaluation's mapper uses on the CPU
            return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
        # other devices resize uint8 in float and round, as torchvision does there
        y = F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        return y[0].round().clamp(0, 255).to(torch.uint8)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(boxes, scores, classes)`` of a uint8 RGB ``(3, H, W)`` image (see the module docstring)."""
        model = self.model
        shape = torch._shape_as_tensor(image)
        h, w = shape[1], shape[2]
        if self.min_size > 0:
            new_h, new_w = _resized_size(h, w, self.min_size, self.max_size)
            image = self._resize(image, new_h, new_w)
        else:
            new_h, new_w = h, w
        if self.bgr:
            image = image.flip(0)
        x = (image.float() - model.pixel_mean) / model.pixel_std
        d = self.size_divisibility
        x = F.pad(x, (0, (d - new_w % d) % d, 0, (d - new_h % d) % d))[None]
        sizes = [(new_h, new_w)]
        features = model.backbone(x)
        rpn_features = {f: features[f] for f in model.rpn.in_features}
        proposals, _ = model.rpn(ImageList(x, sizes), rpn_features)
        heads = model.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        boxes, scores, labels = self._postprocess(class_logits, box_regression, proposals[0], new_h, new_w)
        scale = torch.stack([w / new_w, h / new_h, w / new_w, h / new_h]).to(boxes.dtype)
        boxes = boxes * scale
        limit = torch.stack([w, h, w, h]).to(boxes.dtype)
        boxes = boxes.clamp(min=0).minimum(limit)  # clipped to the image, as the detector's rescale
        return boxes, scores, labels - 1

    def _postprocess(self, class_logits, box_regression, proposals, new_h, new_w):
        """The RoI heads' inference (detectron2's) for one image, without data-dependent branches."""
        heads = self.model.roi_heads
        num_classes = class_logits.shape[-1]
        boxes = heads.box_coder.decode(box_regression, [proposals]).reshape(-1, num_classes, 4)
        scores = F.softmax(class_logits, -1)
        hf, wf = new_h.to(boxes.dtype), new_w.to(boxes.dtype)
        x = boxes[..., 0::2].clamp(min=0).minimum(wf)
        y = boxes[..., 1::2].clamp(min=0).minimum(hf)
        boxes = torch.stack([x, y], dim=-1).reshape(boxes.shape)
        labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = torch.where(scores > heads.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # batched NMS by offsetting each class's boxes, as torchvision's coordinate trick (empty-safe max)
        top = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
        keep = box_ops.nms(boxes + (labels.to(boxes) * (top + 1))[:, None], scores, heads.nms_thresh)
        keep = keep[: heads.detections_per_img]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = torch.where(((boxes[:, 2:] - boxes[:, :2]) > 0).all(dim=1))[0]  # the detector drops empty boxes
        return boxes[keep], scores[keep], labels[keep]


def metadata_json(cfg, weights: Dict) -> str:
    """Return the JSON stored with an exported model: classes, category ids, input and output conventions."""
    return json.dumps({
        "format": "wrn_det exported detector", "version": 1,
        "thing_classes": list(weights["thing_classes"]),
        "contiguous_id_to_thing_dataset_id": {str(k): int(v) for k, v in weights["contiguous_id_to_thing_dataset_id"].items()},
        "input": "image: uint8 (3, H, W), RGB, any size",
        "outputs": "boxes: float32 (N, 4) XYXY in input pixels; scores: float32 (N,); classes: int64 (N,) contiguous ids",
        "config": {"MIN_SIZE_TEST": int(cfg.INPUT.MIN_SIZE_TEST), "MAX_SIZE_TEST": int(cfg.INPUT.MAX_SIZE_TEST),
                   "FORMAT": cfg.INPUT.FORMAT, "SCORE_THRESH_TEST": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
                   "NMS_THRESH_TEST": float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
                   "DETECTIONS_PER_IMAGE": int(cfg.TEST.DETECTIONS_PER_IMAGE)},
        "weights": str(weights["path"]),
    })


def _trace(wrapper: InferenceModel, sample: torch.Tensor):
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about every Python int taken from a tensor; the wrapper keeps sizes in tensors
        warnings.simplefilter("ignore")
        return torch.jit.trace(wrapper, (sample,), check_trace=False)


# an exported model counts as faithful when every detection clear of the cuts (score threshold, the
# per-image limit, NMS ties) is found in the PyTorch module's detections within these (px, score):
# float32 kernels that sum in another order differ by about 2e-3 px and 1e-4 in score on a
# WRN-34-2-FPN at 800 x 1067 (docs/use_and_export.md); a wrong resize or box mapping differs by far more
BOX_TOLERANCE, SCORE_TOLERANCE = 1e-2, 1e-3
#: Detections of one class are paired when their boxes overlap at least this much (COCO's matching IoU).
MATCH_IOU = 0.5


def _as_arrays(dets):
    """Return (boxes float64 (N, 4), scores float64 (N,), classes int64 (N,)) of a result tuple or a Predictor dict."""
    import numpy as np

    if isinstance(dets, dict):
        dets = (dets["boxes"], dets["scores"], dets["classes"])
    out = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x) for x in dets]
    return (out[0].astype(np.float64).reshape(-1, 4), out[1].astype(np.float64).reshape(-1),
            out[2].astype(np.int64).reshape(-1))


def _iou(a, b):
    """Return the IoU matrix of XYXY boxes ``a`` (N, 4) and ``b`` (M, 4) (numpy, float64)."""
    import numpy as np

    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def detection_limits(cfg) -> dict:
    """Return the cuts of a config's detections that :func:`match_detections` needs: ``score_thresh``
    (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``), ``nms_thresh`` (``NMS_THRESH_TEST``) and ``detections_per_image``
    (``TEST.DETECTIONS_PER_IMAGE``). A dict of these keys is returned as it is."""
    if "score_thresh" in cfg:
        return {k: cfg[k] for k in ("score_thresh", "nms_thresh", "detections_per_image")}
    return {"score_thresh": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
            "nms_thresh": float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST),
            "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE)}


def match_detections(ref, got, cfg=None, *, box_tol: float = BOX_TOLERANCE, score_tol: float = SCORE_TOLERANCE,
                     score_thresh: Optional[float] = None, nms_thresh: Optional[float] = None,
                     detections_per_image: Optional[int] = None, match_iou: float = MATCH_IOU) -> dict:
    """Compare two detectors' detections of one image as a user would: by class and IoU; returns the verdict.

    ``ref`` and ``got`` are ``(boxes, scores, classes)`` (tensors or arrays; an exported model's
    outputs) or ``wrn_det.Predictor`` result dicts. The cuts come from ``cfg`` (a config or the
    dict of :func:`detection_limits`) or the keyword arguments.

    Detections of the same class are paired greedily, highest IoU first (at least ``match_iou``);
    a pair agrees when its boxes are within ``box_tol`` px and its scores within ``score_tol``.
    A detection without an agreeing partner is *borderline* when a difference within the
    tolerances may decide whether it is kept: its score is within ``score_tol`` of the score
    threshold, or of the lowest score of a list cut at ``detections_per_image``; it overlaps a
    detection of its class at the NMS threshold (within the IoU change ``box_tol`` can make) or
    above it with a score within ``score_tol`` (a tie NMS may break either way); its pair partner
    disagrees (another box of its class in its place: a near tie in NMS or among the RPN's
    proposals, which the outputs do not show, decided otherwise); or it overlaps, above the NMS
    threshold, a borderline detection of its class scoring as high (kept or suppressed with it).
    A box moved with its score unchanged looks like a tie with itself, so ties explain detections
    only while they are fewer than the detections that agree. Any other detection without an
    agreeing partner is *unexplained*.

    Returns ``{"ok": no unexplained detection, "count": (n_ref, n_got), "matched": agreeing pairs,
    "max_box", "mean_box", "max_score": differences over the agreeing pairs (0 without), "box_diffs",
    "score_diffs": each agreeing pair's, "pairs": (IoU, box and score difference) of every pair, agreeing or not,
    "borderline": [...], "unexplained": [...]}``; each listed detection is ``{"side": "ref" or
    "got", "index", "class", "score", "box", "why"}`` (``why`` in words).
    """
    import numpy as np

    if cfg is not None:
        limits = detection_limits(cfg)
        score_thresh = limits["score_thresh"] if score_thresh is None else score_thresh
        nms_thresh = limits["nms_thresh"] if nms_thresh is None else nms_thresh
        detections_per_image = limits["detections_per_image"] if detections_per_image is None else detections_per_image
    sides = {"ref": _as_arrays(ref), "got": _as_arrays(got)}
    (rb, rs, rc), (gb, gs, gc) = sides["ref"], sides["got"]
    # pairs of one class, highest IoU first
    candidates = []
    for c in np.intersect1d(rc, gc):
        ri, gi = np.flatnonzero(rc == c), np.flatnonzero(gc == c)
        iou = _iou(rb[ri], gb[gi])
        for a, b in zip(*np.nonzero(iou >= match_iou)):
            candidates.append((-iou[a, b], int(ri[a]), int(gi[b])))
    candidates.sort()
    partner = {"ref": {}, "got": {}}
    for _, i, j in candidates:
        if i not in partner["ref"] and j not in partner["got"]:
            partner["ref"][i], partner["got"][j] = j, i
    agree, box_d, score_d, note, pairs = set(), [], [], {}, []
    for i, j in partner["ref"].items():
        db, ds = float(np.abs(rb[i] - gb[j]).max()), abs(float(rs[i] - gs[j]))
        pairs.append((float(_iou(rb[i:i + 1], gb[j:j + 1])[0, 0]), db, ds))
        if db <= box_tol and ds <= score_tol:
            agree.add(i)
            box_d.append(db)
            score_d.append(ds)
        else:
            note[("ref", i)] = note[("got", j)] = f"paired at IoU {float(_iou(rb[i:i + 1], gb[j:j + 1])[0, 0]):.3f} " \
                                                  f"with boxes off by {db:.3g} px, scores by {ds:.3g}"
    lone = [(side, k) for side, arrays in sides.items() for k in range(len(arrays[1]))
            if not (k in agree if side == "ref" else partner["got"].get(k) in agree)]

    def sides_of(c):
        return [(side, k) for side, (_, _, cls) in sides.items() for k in np.flatnonzero(cls == c)]

    def iou_tol(b1, b2):
        # the IoU change that moving every coordinate by box_tol can make, for boxes of these sides
        side_len = max(min(b1[2] - b1[0], b1[3] - b1[1], b2[2] - b2[0], b2[3] - b2[1]), 1e-6)
        return min(1.0, 4 * box_tol / side_len) + 1e-9

    # the cuts: a score at the threshold or at the end of a full list
    why = {}
    for side, k in lone:
        s = float(sides[side][1][k])
        if score_thresh is not None and s <= score_thresh + score_tol:
            why[(side, k)] = f"score {s:.4g} at the threshold {score_thresh:g}"
        elif detections_per_image:
            for _, sc, _ in sides.values():
                if len(sc) >= detections_per_image and s <= float(sc.min()) + score_tol:
                    why[(side, k)] = (f"score {s:.4g} at the last of the {detections_per_image} detections kept "
                                      f"({float(sc.min()):.4g})")
                    break
    # ties: NMS decided otherwise (this stage's, or the RPN's, whose proposals the outputs do not show)
    ties = {}
    if nms_thresh is not None:
        for side, k in lone:
            if (side, k) in why:
                continue
            boxes, scores, classes = sides[side]
            s = float(scores[k])
            for other, m in sides_of(classes[k]):
                if (other, m) == (side, k):
                    continue
                ob, os_ = sides[other][0][m], float(sides[other][1][m])
                iou = float(_iou(boxes[k:k + 1], ob[None])[0, 0])
                if os_ >= s - score_tol and abs(iou - nms_thresh) <= iou_tol(boxes[k], ob):
                    ties[(side, k)] = f"IoU {iou:.3f} at the NMS threshold with a detection of its class scoring {os_:.4g}"
                    break
                if iou > nms_thresh and abs(os_ - s) <= score_tol:
                    ties[(side, k)] = f"an NMS tie: IoU {iou:.3f} with a detection of its class scoring {os_:.4g}"
                    break

        def knock_on():
            # a box that a borderline one of its class, scoring as high, suppresses or not
            changed = True
            while changed:
                changed = False
                for side, k in lone:
                    if (side, k) in why or (side, k) in ties:
                        continue
                    boxes, scores, classes = sides[side]
                    for other, m in sides_of(classes[k]):
                        if ((other, m) not in why and (other, m) not in ties) or \
                                float(sides[other][1][m]) < float(scores[k]) - score_tol:
                            continue
                        ob = sides[other][0][m]
                        iou = float(_iou(boxes[k:k + 1], ob[None])[0, 0])
                        if iou > nms_thresh - iou_tol(boxes[k], ob):
                            ties[(side, k)] = f"overlaps (IoU {iou:.3f}) a borderline detection of its class scoring as high"
                            changed = True
                            break

        knock_on()
        for key in lone:  # paired with a box of its class that disagrees: NMS kept the other one
            if key in note and key not in why and key not in ties:
                ties[key] = ("another box of its class in its place (" + note[key][len("paired "):] +
                             "): a near tie in NMS or among the RPN's proposals")
        knock_on()
    # a box moved with its score kept looks like a tie with itself: ties are the exception, never the rule
    if len(ties) <= len(agree):
        why.update(ties)
    else:
        for key in ties:
            note[key] = note.get(key, "no detection of its class agrees with it") + \
                (f" (ties would explain {len(ties)} detections, more than the {len(agree)} that agree: not ties)")

    def entry(side, k, reason):
        boxes, scores, classes = sides[side]
        return {"side": side, "index": int(k), "class": int(classes[k]), "score": float(scores[k]),
                "box": [round(float(v), 2) for v in boxes[k]], "why": reason}

    borderline = [entry(side, k, why[(side, k)]) for side, k in lone if (side, k) in why]
    unexplained = [entry(side, k, note.get((side, k), "no detection of its class at IoU >= "
                                                         f"{match_iou:g} in the other list"))
                   for side, k in lone if (side, k) not in why]
    return {"ok": not unexplained, "count": (len(rs), len(gs)), "matched": len(agree),
            "max_box": max(box_d, default=0.0), "mean_box": float(np.mean(box_d)) if box_d else 0.0,
            "max_score": max(score_d, default=0.0), "box_diffs": box_d, "score_diffs": score_d, "pairs": pairs,
            "borderline": borderline, "unexplained": unexplained}


def check_images(wrapper: InferenceModel, images=None) -> list:
    """Return the images an export is checked on: ``images``, or two random ones of different sizes and shapes."""
    return list(images) if images else _random_images(wrapper.min_size, wrapper.model.pixel_mean.device)


def _random_images(min_size: int, device) -> list:
    """Return two random uint8 images about the test size ``min_size``, one wide and one tall, on ``device``."""
    g = torch.Generator().manual_seed(1)
    short = max(int(min_size), 32)
    return [torch.randint(0, 256, size, dtype=torch.uint8, generator=g).to(device)
            for size in ((3, short + 7, short * 4 // 3 + 5), (3, short * 3 // 2 + 3, short - 5))]


def _describe(d: dict) -> str:
    side = "PyTorch" if d["side"] == "ref" else "export"
    return f"{side}'s class {d['class']} score {d['score']:.4g} at {d['box']}: {d['why']}"


def check_detections(name: str, run, reference, images, cfg, box_tol: float = BOX_TOLERANCE,
                     score_tol: float = SCORE_TOLERANCE) -> dict:
    """Raise :class:`WrnDetError` unless ``run(image)`` gives ``reference(image)``'s detections on every image; returns
    the summary.

    Both give ``(boxes, scores, classes)`` or Predictor dicts; they are compared by
    :func:`match_detections` with the cuts of ``cfg`` (a config, or :func:`detection_limits`'s dict) and these
    tolerances: every detection
    clear of the cuts must agree. ``name`` (``"ONNX"``, ``"TorchScript"``, ``"hub folder"``) names
    the candidate in the error, which lists the unexplained detections. Returns ``{"images",
    "detections" (of the reference), "matched", "max_box", "max_score" (over the agreeing pairs),
    "borderline": [(image index, detection), ...], "box_tol", "score_tol"}``.
    """
    summary = {"images": len(images), "detections": 0, "matched": 0, "max_box": 0.0, "max_score": 0.0,
               "borderline": [], "box_tol": box_tol, "score_tol": score_tol}
    with torch.no_grad():
        for n, im in enumerate(images):
            m = match_detections(reference(im), run(im), cfg, box_tol=box_tol, score_tol=score_tol)
            if not m["ok"]:
                bad = m["unexplained"]
                shown = "; ".join(_describe(d) for d in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
                n_ref = sum(d["side"] == "ref" for d in bad)
                raise WrnDetError(
                    f"the {name} export disagrees with the PyTorch model on a {tuple(im.shape)} image: {n_ref} of "
                    f"PyTorch's {m['count'][0]} detections and {len(bad) - n_ref} of the export's {m['count'][1]} have "
                    f"no counterpart within {box_tol:g} px and {score_tol:g} in score and are clear of the score "
                    f"threshold, the per-image limit and NMS ties: {shown}; nothing was written")
            summary["detections"] += m["count"][0]
            summary["matched"] += m["matched"]
            summary["max_box"] = max(summary["max_box"], m["max_box"])
            summary["max_score"] = max(summary["max_score"], m["max_score"])
            summary["borderline"] += [(n, d) for d in m["borderline"]]
    return summary


def _check(name: str, run, wrapper: InferenceModel, images) -> dict:
    """:func:`check_detections` of an export ``run`` against the module it was exported from."""
    return check_detections(name, run, wrapper, images, wrapper.limits)


def export_torchscript(wrapper: InferenceModel, path: str, metadata: str, images=None) -> dict:
    """Trace ``wrapper`` into a TorchScript archive at ``path``, checked on ``images``; returns a report.

    The trace is checked against ``wrapper`` on the images (see :func:`check_images`)
    before the file is renamed into place, so a wrong trace leaves nothing behind.
    ``metadata`` is stored as the extra file ``wrn_det.json``
    (``torch.jit.load(path, _extra_files={"wrn_det.json": ""})`` reads it back).
    Returns ``{"path", "check": the summary of :func:`check_detections`}``.
    """
    import warnings

    images = check_images(wrapper, images)
    report = {}

    def write(tmp):
        traced = _trace(wrapper, images[0])
        traced.save(tmp, _extra_files={"wrn_det.json": metadata})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            loaded = torch.jit.load(tmp, map_location=images[0].device)
        report["check"] = _check("TorchScript", loaded, wrapper, images)

    atomic_write(path, write, suffix=".pt")
    return {"path": path, **report}


def check_model_folder(predictor, folder: str, images=None) -> dict:
    """Raise :class:`WrnDetError` unless the Hub folder ``folder``, read back by ``Predictor.from_pretrained``,
    gives ``predictor``'s detections on ``images``; returns :func:`check_detections`'s summary.

    ``predictor`` is the :class:`wrn_det.Predictor` the folder was written from; ``images``
    are uint8 RGB ``(3, H, W)`` tensors, by default two random ones about the test size.
    What it catches: a config that does not rebuild the same model, weights that do not
    load back the same, on another device or in another kind of number.
    """
    from .predictor import Predictor

    device = predictor.model.device
    images = list(images) if images else _random_images(int(predictor.cfg.INPUT.MIN_SIZE_TEST), device)
    loaded = Predictor.from_pretrained(folder, device=str(device))
    return check_detections("hub folder", loaded, predictor, images, predictor.cfg)


def _antialias_resize_symbolic(g, input, output_size, align_corners, scale_factors):
    """ONNX for aten::_upsample_bilinear2d_aa: Resize with antialiasing (opset 18), to the sizes given."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    leading = sh._slice_helper(g, g.op("Shape", input), axes=[0], ends=[2], starts=[0])
    sizes = g.op("Concat", leading, g.op("Cast", output_size, to_i=7), axis_i=0)  # 7: INT64
    return g.op("Resize", input, sh._optional_input_placeholder_tensor(g), sh._optional_input_placeholder_tensor(g),
                sizes, mode_s="linear", antialias_i=1, exclude_outside_i=1,
                coordinate_transformation_mode_s="half_pixel")


def export_onnx(wrapper: InferenceModel, path: str, metadata: str, images=None) -> dict:
    """Export ``wrapper`` to ONNX at ``path`` with a dynamic image size, checked by onnxruntime; returns a report.

    ``wrapper`` should resize in float (``InferenceModel(..., float_resize=True)``), the
    resize ONNX has. The class metadata goes into ``metadata_props`` (key ``wrn_det``).
    With onnxruntime installed the file is run on ``images`` (see :func:`check_images`)
    and compared with ``wrapper`` before it is renamed into place. Needs the ``onnx``
    package (``pip install -e '.[export]'``); raises :class:`WrnDetError` without it.
    Returns ``{"path", "check": the summary of :func:`check_detections`, or None when onnxruntime is missing}``.
    """
    import warnings

    try:
        import onnx
    except ImportError:
        raise WrnDetError("ONNX export needs the onnx package: pip install -e '.[export]' (onnx, onnxruntime)") from None
    import torchvision.ops._register_onnx_ops as tv_onnx

    tv_onnx._register_custom_op()  # torchvision's ONNX forms of nms and roi_align
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", _antialias_resize_symbolic, ONNX_OPSET)
    images = check_images(wrapper, images)
    report = {"check": None}

    def write(tmp):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (images[0],), tmp, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=["boxes", "scores", "classes"],
                              dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                            "scores": {0: "detections"}, "classes": {0: "detections"}})
        model = onnx.load(tmp)
        entry = model.metadata_props.add()
        entry.key, entry.value = "wrn_det", metadata
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        try:
            import onnxruntime
        except ImportError:
            return
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        report["check"] = _check("ONNX", lambda im: session.run(None, {"image": im.cpu().numpy()}), wrapper, images)

    atomic_write(path, write, suffix=".onnx")
    return {"path": path, **report}
