"""Run a trained detector on your own images: ``wrn_det.Predictor``.

    from wrn_det import Predictor
    predictor = Predictor("shapes_wrn_frcnn.yaml", weights="output/demo/model_final.pth")
    out = predictor("photo.jpg")            # or a PIL image, an HxWx3 uint8 RGB array, a uint8 CHW RGB tensor
    out["boxes"], out["scores"], out["classes"], out["class_names"]

The test-time resize is the evaluation's own: every image goes through
:meth:`wrn_det.data.det_loader.DetectionMapper.map_image`, the function the test
loader calls after reading a file, so one image gives the evaluation's detections.
Class names and dataset category ids come from the checkpoint
(:mod:`wrn_det.detection.weights`), so no dataset needs to be registered.
Checkpoints of the detectron2 engine load too (:mod:`wrn_det.detection.weights.d2_keys`).
"""
import logging
import os
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from wrn_det.data.decode import pil_to_tensor
from wrn_det.data.det_loader import DetectionMapper, read_image
from wrn_det.engine.config import CfgNode, load_config
from wrn_det.engine.errors import ConfigError, WrnDetError

from .config import get_det_cfg
from .evaluation.coco import coco_results
from .modeling import build_detector
from .weights import load_inference_weights

__all__ = ["Predictor", "load_predictor_config", "image_to_tensor", "coco_results"]

logger = logging.getLogger("wrn_det")


def load_predictor_config(config, opts: Sequence[str] = (), weights: Optional[str] = None,
                          device: Optional[str] = None):
    """Return the frozen detection config for inference.

    ``config``: a path, a file name under ``configs/`` or a CfgNode; ``opts``: ``KEY VALUE``
    overrides; ``weights`` and ``device`` (when given) set ``MODEL.WEIGHTS`` and ``MODEL.DEVICE``.
    """


    opts = list(opts or [])
    if weights is not None:
        opts += ["MODEL.WEIGHTS", str(weights)]
    if device is not None:
        opts += ["MODEL.DEVICE", str(device)]
    if isinstance(config, CfgNode) or hasattr(config, "merge_from_list"):
        base = config.clone()
        base.defrost()
        return load_config(base, None, opts)
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config must be a path, a name under configs/ or a CfgNode, got {type(config).__name__}")
    return load_config(get_det_cfg(), os.fspath(config), opts)


def image_to_tensor(image, fmt: str = "RGB") -> torch.Tensor:
    """Return ``image`` as an upright uint8 (3, H, W) tensor in channel order ``fmt`` (RGB or BGR).

    ``image``: a file path (read as the evaluation reads files: its EXIF orientation applied,
    every mode turned into 8-bit RGB), a PIL image (its EXIF orientation and mode likewise),
    an HxWx3 uint8 numpy array (RGB) or a uint8 (3, H, W) tensor (RGB); arrays and tensors
    are taken as given, as detectron2's predictor takes them. Raises :class:`WrnDetError`
    with one line for anything else, naming the file when a path was given.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image), fmt)
    if type(image).__module__.startswith("PIL."):
        try:
            image = pil_to_tensor(image, "RGB")
        except WrnDetError:
            raise
        except Exception as e:  # noqa: BLE001 - a PIL image whose data cannot be loaded (a file cut short, say)
            name = getattr(image, "filename", "")
            what = f"image file {name}" if name else "the PIL image"
            raise WrnDetError(f"{what} cannot be read: {' '.join(str(e).split()) or type(e).__name__}") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise WrnDetError(f"a numpy image must be HxWx3 uint8 RGB, got shape {image.shape} and dtype {image.dtype}")
        image = np.ascontiguousarray(image) if image.flags.writeable else image.copy()  # torch wants writable memory
        image = torch.from_numpy(image).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise WrnDetError(f"a tensor image must be uint8 (3, H, W) RGB, got shape {tuple(image.shape)} "
                              f"and dtype {image.dtype}")
        image = image.cpu()
    else:
        raise WrnDetError(f"cannot read an image from a {type(image).__name__}; give a file path, a PIL image, "
                          "an HxWx3 uint8 RGB array or a uint8 (3, H, W) RGB tensor")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise WrnDetError(f"the image is empty (shape {tuple(image.shape)})")
    if fmt == "BGR":
        image = image.flip(0)
    return image.contiguous()


class Predictor:
    """A trained detector that takes images and returns detections in original-image pixels.

    ``config``: a path, a file name under ``configs/`` or a config node (the one the model
    was trained with); ``weights``: the checkpoint (default ``MODEL.WEIGHTS``), a
    builtin or a detectron2-engine ``model_*.pth``; ``device``: ``cpu``, ``cuda``, ...
    (default ``MODEL.DEVICE``: CUDA when present); ``opts``: ``KEY VALUE`` overrides.

    Calling it on one image returns ``{"boxes": float32 (N, 4) XYXY, "scores": (N,),
    "classes": int64 (N,) contiguous ids, "class_names": [N names], "category_ids": int64
    (N,) dataset ids, "height", "width"}`` on the CPU, best first. Attributes: ``cfg``,
    ``model``, ``thing_classes``, ``contiguous_id_to_thing_dataset_id``, ``weights``
    (what the checkpoint held).
    """

    def __init__(self, config, weights: Optional[str] = None, device: Optional[str] = None, opts: Sequence[str] = ()):


        self.cfg = load_predictor_config(config, opts, weights, device)
        if self.cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or self.cfg.MODEL.LOAD_PROPOSALS:
            raise ConfigError(f"the Predictor runs Faster R-CNN detectors (MODEL.META_ARCHITECTURE GeneralizedRCNN with "
                              f"an RPN); this config has {self.cfg.MODEL.META_ARCHITECTURE} with MODEL.LOAD_PROPOSALS "
                              f"{self.cfg.MODEL.LOAD_PROPOSALS}")
        self.model = build_detector(self.cfg).eval()
        self.weights = load_inference_weights(self.model, self.cfg.MODEL.WEIGHTS, self.cfg)
        self.thing_classes: List[str] = list(self.weights["thing_classes"])
        self.contiguous_id_to_thing_dataset_id = dict(self.weights["contiguous_id_to_thing_dataset_id"])
        self.mapper = DetectionMapper(self.cfg, is_train=False)
        self.input_format = self.cfg.INPUT.FORMAT

    def _inputs(self, images: Iterable) -> List[dict]:
        inputs = []
        for i, image in enumerate(images):
            tensor = image_to_tensor(image, self.input_format)
            h, w = int(tensor.shape[1]), int(tensor.shape[2])
            name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else ""
            inputs.append(self.mapper.map_image(tensor, {"height": h, "width": w, "image_id": i, "file_name": name}))
        return inputs

    def _outputs(self, inputs: List[dict], outputs: List[dict]) -> List[dict]:
        id_map = self.contiguous_id_to_thing_dataset_id
        results = []
        for x, out in zip(inputs, outputs):
            classes = out["classes"].detach().cpu().to(torch.int64)
            results.append({
                "boxes": out["boxes"].detach().cpu().float(), "scores": out["scores"].detach().cpu().float(),
                "classes": classes, "class_names": [self.thing_classes[c] for c in classes.tolist()],
                "category_ids": torch.tensor([id_map[c] for c in classes.tolist()], dtype=torch.int64),
                "height": x["height"], "width": x["width"],
            })
        return results

    @torch.no_grad()
    def __call__(self, image) -> dict:
        """Return the detections of one image (see the class docstring)."""
        return self.predict_batch([image])[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence) -> List[dict]:
        """Return the detections of every image, in one forward pass of the model.

        Images of different sizes are zero-padded to a common size in the batch (as in
        training), which can move detections near the padded borders slightly, and a batch
        runs other kernels than one image (equal up to float rounding); one image per call
        gives exactly the evaluation's detections.
        """
        images = list(images)
        if not images:
            return []
        inputs = self._inputs(images)
        return self._outputs(inputs, self.model(inputs))

    def __repr__(self) -> str:
        return (f"Predictor({self.cfg.MODEL.WRN.NAME} {self.cfg.MODEL.BACKBONE.NAME}, {len(self.thing_classes)} classes, "
                f"weights {self.weights['path']} ({self.weights['engine']}), device {self.model.device})")
