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
    builtin or a detectron2-engine ``model_*.pth``, or a ``.safetensors``; ``device``: ``cpu``, ``cuda``, ...
    (default ``MODEL.DEVICE``: CUDA when present); ``opts``: ``KEY VALUE`` overrides.

    Calling it on one image returns ``{"boxes": float32 (N, 4) XYXY, "scores": (N,),
    "classes": int64 (N,) contiguous ids, "class_names": [N names], "category_ids": int64
    (N,) dataset ids, "height", "width"}`` on the CPU, best first. Attributes: ``cfg``,
    ``model``, ``thing_classes``, ``contiguous_id_to_thing_dataset_id``, ``weights``
    (what the checkpoint held).

    :meth:`from_pretrained` builds one from a Hub folder (a local folder or ``owner/name``),
    :meth:`save_pretrained` writes one.
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

    @classmethod
    def from_pretrained(cls, name_or_path, device: Optional[str] = None, opts: Sequence[str] = (),
                        revision: Optional[str] = None, cache_dir: Optional[str] = None, force_download: bool = False,
                        token=None, local_files_only: bool = False) -> "Predictor":
        """Return the predictor of a Hub folder: ``config.yaml`` and ``model.safetensors`` (written by
        :meth:`save_pretrained`, ``tools/export_model.py --format hub``).

        ``name_or_path``: a local folder, or ``owner/name`` on the Hugging Face Hub, downloaded
        once by ``huggingface_hub`` (``revision``, ``cache_dir``, ``force_download``, ``token``,
        ``local_files_only`` are its arguments). ``device`` and ``opts`` as for the constructor.
        Raises :class:`WrnDetError` in one line for a missing or broken folder.
        """
        from wrn_det.engine.hub import CONFIG_NAME, WEIGHTS_NAME, resolve_model_folder

        folder = resolve_model_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, token=token, local_files_only=local_files_only)
        return cls(os.path.join(folder, CONFIG_NAME), weights=os.path.join(folder, WEIGHTS_NAME), device=device,
                   opts=opts)

    def _file_fields(self) -> dict:
        """Return the header fields of this detector's ``.safetensors``: class names and ids, config, description."""
        from .weights import detector_file_fields

        metadata = {"thing_classes": list(self.thing_classes),
                    "contiguous_id_to_thing_dataset_id": dict(self.contiguous_id_to_thing_dataset_id),
                    "datasets": [str(d) for d in self.cfg.DATASETS.TRAIN]}
        return detector_file_fields(self.model, self.cfg, metadata)

    def save_weights(self, path: str) -> str:
        """Write this detector's weights, class names and config to the ``.safetensors`` file ``path``; returns it.

        The file is a ``MODEL.WEIGHTS`` (or ``weights=``) for the predictor, evaluation and training.
        """
        from wrn_det.engine.weights_file import save_safetensors

        return save_safetensors(path, self.model.state_dict(), **self._file_fields())

    def save_pretrained(self, folder: str, run_dir: Optional[str] = None, license: str = "unknown",
                        repo_id: Optional[str] = None) -> str:
        """Write this detector as a Hub folder (``config.yaml``, ``model.safetensors``, ``README.md``); returns it.

        The card names the network, the training datasets and the class names, holds the
        evaluation table of the run in ``run_dir`` (its ``metrics.json``) and the command that
        trained it (its ``log.txt``), the ``license`` and the paper's citation; ``repo_id`` is
        the Hub name its usage snippet shows. The folder is written atomically; it loads back
        with :meth:`from_pretrained` to the same detections.
        """
        from wrn_det.engine.hub import write_model_folder

        fields = self._file_fields()
        card = _model_card(self, run_dir, license, repo_id or f"<you>/{os.path.basename(os.path.abspath(folder))}")
        return write_model_folder(folder, self.model.state_dict(), fields.pop("config"), card, fields)

    def __repr__(self) -> str:
        return (f"Predictor({self.cfg.MODEL.WRN.NAME} {self.cfg.MODEL.BACKBONE.NAME}, {len(self.thing_classes)} classes, "
                f"weights {self.weights['path']} ({self.weights['engine']}), device {self.model.device})")


# Hub dataset ids of the COCO catalog names, for the card's ``datasets`` field
_HUB_DATASETS = {"coco": "detection-datasets/coco"}


def _model_card(predictor: "Predictor", run_dir: Optional[str], license: str, repo_id: str) -> str:
    """Return the model card (``README.md``) of ``predictor`` for :meth:`Predictor.save_pretrained`."""
    from huggingface_hub import EvalResult

    from wrn_det.engine.hub import evaluation_rows, model_card, run_command

    cfg = predictor.cfg
    fpn = "fpn" in cfg.MODEL.BACKBONE.NAME.lower()
    network = f"{cfg.MODEL.WRN.NAME}-{'FPN' if fpn else 'C4'}"
    train, test = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)
    hub_ids = sorted({_HUB_DATASETS[d.split("_")[0]] for d in train + test if d.split("_")[0] in _HUB_DATASETS})
    rows = evaluation_rows(run_dir, lambda k: k.startswith("bbox/") or "/bbox/" in k) if run_dir else []
    ap = next((v for k, v in rows if k.endswith("bbox/AP")), None)
    evaluated_on = ", ".join(test)
    results = [EvalResult(task_type="object-detection", dataset_type=hub_ids[0] if hub_ids else test[0],
                          dataset_name=evaluated_on, metric_type="mean_average_precision", metric_name="box AP",
                          metric_value=round(ap, 2))] if ap is not None and test else []
    names = predictor.thing_classes
    n_params = sum(p.numel() for p in predictor.model.parameters())
    return model_card(
        title=f"Faster R-CNN {network} on {', '.join(train)}",
        summary=f"A Faster R-CNN object detector with a `{cfg.MODEL.WRN.NAME}` Wide Residual Network backbone "
                f"({'FPN' if fpn else 'C4'}), trained with wrn-det's builtin engine.",
        facts=[("Network", f"`{cfg.MODEL.META_ARCHITECTURE}`, backbone `{cfg.MODEL.BACKBONE.NAME}` over "
                           f"`{cfg.MODEL.WRN.NAME}`, {n_params:,} parameters"),
               ("Dataset", f"trained on {', '.join(train)}; evaluated on {evaluated_on or 'nothing'}"),
               ("Classes", f"{len(names)}: " + ", ".join(names)),
               ("Input", f"{cfg.INPUT.FORMAT} images, shortest side resized to {cfg.INPUT.MIN_SIZE_TEST} "
                         f"(longest at most {cfg.INPUT.MAX_SIZE_TEST})")],
        pipeline_tag="object-detection",
        tags=["object-detection", "faster-rcnn", "wide-resnet", "wrn-det", "pytorch", "safetensors"],
        datasets=hub_ids, metrics=["mean_average_precision"], license=license, evaluation=rows,
        evaluated_on=f"{evaluated_on} (COCO box AP)", eval_results=results,
        command=run_command(run_dir) if run_dir else None,
        usage=f"from wrn_det import Predictor\n\npredictor = Predictor.from_pretrained(\"{repo_id}\")\n"
              "out = predictor(\"photo.jpg\")  # boxes, scores, classes, class_names")
