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
hundredths of a pixel where the image is resized (measured on the shapes detector).
An image already at the test size is not resized and gives the same detections in all
three.
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
           "compare_detections", "check_images", "BOX_TOLERANCE", "SCORE_TOLERANCE"]

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
        self.eval()  # exporters put a module back into the mode it had; this one only infers

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


def compare_detections(a, b) -> dict:
    """Return how two ``(boxes, scores, classes)`` results differ: ``{"count": (n_a, n_b), "max_box",
    "max_score", "same_classes"}`` (differences are inf when the counts differ)."""
    import numpy as np

    a = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x) for x in a]
    b = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x) for x in b]
    out = {"count": (len(a[1]), len(b[1]))}
    if len(a[1]) != len(b[1]):
        return {**out, "max_box": float("inf"), "max_score": float("inf"), "same_classes": False}
    if not len(a[1]):
        return {**out, "max_box": 0.0, "max_score": 0.0, "same_classes": True}
    return {**out, "max_box": float(np.abs(a[0].astype(np.float64) - b[0]).max()),
            "max_score": float(np.abs(a[1].astype(np.float64) - b[1]).max()),
            "same_classes": bool((a[2] == b[2]).all())}


# an exported model counts as faithful when it gives the eager module's detections within these
BOX_TOLERANCE, SCORE_TOLERANCE = 1e-3, 1e-4


def check_images(wrapper: InferenceModel, images=None) -> list:
    """Return the images an export is checked on: ``images``, or two random ones of different sizes and shapes."""
    if images:
        return list(images)
    device = wrapper.model.pixel_mean.device
    g = torch.Generator().manual_seed(1)
    short = max(wrapper.min_size, 32)
    return [torch.randint(0, 256, size, dtype=torch.uint8, generator=g).to(device)
            for size in ((3, short + 7, short * 4 // 3 + 5), (3, short * 3 // 2 + 3, short - 5))]


def _check(name: str, run, wrapper: InferenceModel, images) -> dict:
    """Raise :class:`WrnDetError` unless ``run(image)`` gives ``wrapper``'s detections on every image; returns the worst."""
    worst = {"images": len(images), "max_box": 0.0, "max_score": 0.0}
    with torch.no_grad():
        for im in images:
            c = compare_detections(wrapper(im), run(im))
            if not (c["same_classes"] and c["max_box"] <= BOX_TOLERANCE and c["max_score"] <= SCORE_TOLERANCE):
                raise WrnDetError(f"the {name} export disagrees with the PyTorch model on a {tuple(im.shape)} image "
                                  f"({c['count'][1]} vs {c['count'][0]} detections, boxes off by {c['max_box']:.3g} px, "
                                  f"scores by {c['max_score']:.3g}); nothing was written")
            worst["max_box"] = max(worst["max_box"], c["max_box"])
            worst["max_score"] = max(worst["max_score"], c["max_score"])
    return worst


def export_torchscript(wrapper: InferenceModel, path: str, metadata: str, images=None) -> dict:
    """Trace ``wrapper`` into a TorchScript archive at ``path``, checked on ``images``; returns a report.

    The trace is checked against ``wrapper`` on the images (see :func:`check_images`)
    before the file is renamed into place, so a wrong trace leaves nothing behind.
    ``metadata`` is stored as the extra file ``wrn_det.json``
    (``torch.jit.load(path, _extra_files={"wrn_det.json": ""})`` reads it back).
    Returns ``{"path", "check": {"images", "max_box", "max_score"}}``.
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
    Returns ``{"path", "check": {...} or None when onnxruntime is missing}``.
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
