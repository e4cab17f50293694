"""Trained classifiers in and out: ``MODEL.WEIGHTS`` of the classification trainer, and Hub folders.

    from wrn_det.models import from_pretrained
    model = from_pretrained("output/cifar10_wrn_28_10_hub")      # a folder, or "owner/name" on the Hub
    logits = model(images)                                        # eval mode; model.wrn_det_config: the run's config

:func:`load_classifier_weights` loads any weights file the one reader reads (``.pth``,
``.safetensors``; a checkpoint of ``tools/train_cls.py``, a state dict of torchvision or timm)
into a network through the one matcher. :func:`save_pretrained` writes a classifier as a
Hub folder (``config.yaml``, ``model.safetensors``, ``README.md``: :mod:`wrn_det.engine.hub`),
:func:`from_pretrained` builds it back.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import yaml
from torch import nn

from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.weights_file import read_weights_file, save_safetensors

from .convert import backbone_key_map
from .registry import build_model
from .weights import is_counter, match_state_dict

__all__ = ["load_classifier_weights", "from_pretrained", "save_pretrained", "classifier_file_fields",
           "save_classifier_safetensors", "HUB_DATASETS"]

logger = logging.getLogger("wrn_det.cls")

#: ``DATASETS.NAME`` -> the dataset's id on the Hugging Face Hub, for the card's ``datasets`` field.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "svhn": "ufldl-stanford/svhn",
                "mnist": "ylecun/mnist", "imagenet": "ILSVRC/imagenet-1k"}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "mnist": "MNIST", "imagenet": "ImageNet-1k"}


def load_classifier_weights(model: nn.Module, path: str, with_classifier: bool = True, key: str = "MODEL.WEIGHTS",
                            use_ema: bool = False) -> dict:
    """Load ``path`` (a checkpoint of the classification trainer, a state dict, a ``.safetensors``) into ``model``;
    returns the file's dict.

    Read once by the one reader, matched by the project's matcher (``module.`` and
    ``_orig_mod.`` prefixes removed). Every tensor of the network's stem and stages must be in
    the file with its shape and kind of number, and the file may hold no tensor the network
    lacks; so must the classifier's with ``with_classifier`` (evaluation). Without it
    (fine-tuning on another set of classes) a classifier of another shape is left at its
    initialisation, with a warning. ``use_ema`` loads the file's EMA weights. Anything else
    raises :class:`WrnDetError` naming ``key``, the file and the tensors.
    """
    try:
        wf = read_weights_file(path)
        state = wf.ema if use_ema else wf.model
    except WrnDetError as e:
        raise WrnDetError(f"{key}: {e}") from None
    if state is None:
        what = "no EMA weights" if use_ema else "no state dict"
        raise WrnDetError(f"{key}: {path} holds {what} (expected a dict of tensors or {{'model': ...}})")
    own = model.state_dict()
    required = None if with_classifier else [k for k in backbone_key_map(model) if not is_counter(k)]
    loadable, report = match_state_dict(state, own, required=required, source=path)
    if not report.ok:
        raise WrnDetError(f"{key}: {path} does not fit {type(model).__name__} ({report.total} tensors): "
                          f"{report.problems()}{report.hint()}")
    if report.skipped:
        logger.warning("weights %s: the classifier (%s) has another shape and keeps its initialisation",
                       path, ", ".join(report.skipped))
    model.load_state_dict(loadable, strict=False)
    return wf.contents if isinstance(wf.contents, dict) else {}


def _config_dict(text: str, where: str) -> dict:
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise WrnDetError(f"{where}: not valid YAML ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("MODEL"), dict) or not cfg["MODEL"].get("NAME"):
        raise WrnDetError(f"{where}: not a classification config (expected MODEL.NAME, as tools/train_cls.py "
                          "writes config.yaml)")
    return cfg


def from_pretrained(name_or_path, device: Optional[str] = None, revision: Optional[str] = None,
                    cache_dir: Optional[str] = None, force_download: bool = False, token=None,
                    local_files_only: bool = False) -> nn.Module:
    """Return the classifier stored in a Hub folder (``config.yaml`` + ``model.safetensors``), in eval mode.

    ``name_or_path``: a local folder, or ``owner/name`` on the Hugging Face Hub (downloaded once
    with ``huggingface_hub``; ``revision``, ``cache_dir``, ``force_download``, ``token``,
    ``local_files_only`` are its arguments). The network is ``build_model(MODEL.NAME,
    MODEL.NUM_CLASSES)`` of the folder's config, its weights loaded strictly; the model's
    ``wrn_det_config`` attribute holds the config as a dict. ``device``: where to put it (default CPU).
    Raises :class:`WrnDetError` in one line for a missing or broken folder.
    """
    from wrn_det.engine.hub import CONFIG_NAME, WEIGHTS_NAME, resolve_model_folder

    folder = resolve_model_folder(name_or_path, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                  token=token, local_files_only=local_files_only)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    with open(cfg_path, encoding="utf-8") as f:
        cfg = _config_dict(f.read(), cfg_path)
    name, num_classes = cfg["MODEL"]["NAME"], cfg["MODEL"].get("NUM_CLASSES") or None
    try:
        model = build_model(name, num_classes=num_classes)
    except (ValueError, TypeError) as e:
        raise WrnDetError(f"{cfg_path}: MODEL.NAME {name!r}: {e}") from None
    load_classifier_weights(model, os.path.join(folder, WEIGHTS_NAME), key=f"model folder {folder}")
    model.wrn_det_config = cfg
    return model.to(device or "cpu").eval()


def save_pretrained(model: nn.Module, folder: str, cfg, run_dir: Optional[str] = None, license: str = "unknown",
                    repo_id: Optional[str] = None) -> str:
    """Write ``model`` (a trained classifier) and its training config ``cfg`` as a Hub folder; returns ``folder``.

    The card names the network, the dataset (``DATASETS.NAME``) and its classes, the
    evaluation table of the run in ``run_dir`` (its ``metrics.json``), the command that trained
    it (its ``log.txt``), the ``license`` and the paper. ``repo_id``: the Hub name the usage
    snippet shows (default ``<you>/<folder name>``). The folder is written atomically.
    """
    from huggingface_hub import EvalResult

    from wrn_det.engine.hub import evaluation_rows, model_card, run_command, write_model_folder

    dataset = str(cfg.DATASETS.NAME).lower()
    pretty = _PRETTY.get(dataset, dataset)
    num_classes = int(getattr(model, "num_classes", 0) or cfg.MODEL.NUM_CLASSES)
    rows = evaluation_rows(run_dir, lambda k: k.startswith(("test_", "ema_test_"))) if run_dir else []
    top1 = dict(rows).get("test_top1_err")
    results = [EvalResult(task_type="image-classification", dataset_type=HUB_DATASETS.get(dataset, dataset),
                          dataset_name=pretty, dataset_split="test", metric_type="accuracy",
                          metric_name="top-1 accuracy (%)", metric_value=round(100.0 - top1, 2))] if top1 is not None else []
    repo = repo_id or f"<you>/{os.path.basename(os.path.abspath(folder))}"
    card = model_card(
        title=f"{cfg.MODEL.NAME} on {pretty}",
        summary=f"A `{cfg.MODEL.NAME}` classifier (Wide Residual Networks family) trained on {pretty} with "
                "wrn-det's `tools/train_cls.py`.",
        facts=[("Network", f"`{cfg.MODEL.NAME}` (`wrn_det.models.build_model`), "
                           f"{sum(p.numel() for p in model.parameters()):,} parameters"),
               ("Dataset", f"{pretty} (`DATASETS.NAME {cfg.DATASETS.NAME}`)"),
               ("Classes", f"{num_classes} (the dataset's class ids 0..{num_classes - 1})"),
               ("Input", f"`INPUT.PREPROCESS {cfg.INPUT.PREPROCESS}`, pixel mean {list(cfg.INPUT.PIXEL_MEAN)} and "
                         f"std {list(cfg.INPUT.PIXEL_STD)} on the 0-255 scale")],
        pipeline_tag="image-classification", tags=["image-classification", "wide-resnet", "wrn-det", "pytorch",
                                                    "safetensors"],
        datasets=[HUB_DATASETS[dataset]] if dataset in HUB_DATASETS else [], metrics=["accuracy"], license=license,
        evaluation=rows, evaluated_on=f"the {pretty} test set (errors in %)", eval_results=results,
        command=run_command(run_dir) if run_dir else None,
        usage=f"from wrn_det.models import from_pretrained\n\nmodel = from_pretrained(\"{repo}\")  # eval mode\n"
              "logits = model(images)  # images normalised as `config.yaml` INPUT says")
    fields = classifier_file_fields(model, cfg)
    return write_model_folder(folder, model.state_dict(), fields.pop("config"), card, fields)


def classifier_file_fields(model: nn.Module, cfg) -> dict:
    """Return the header fields of a classifier's ``.safetensors``: ``config`` (``cfg`` as YAML, ``MODEL.WEIGHTS``
    cleared and ``MODEL.NUM_CLASSES`` the network's: the file is the weights) and ``wrn_det`` (its description)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.NUM_CLASSES = int(getattr(model, "num_classes", 0) or cfg.MODEL.NUM_CLASSES)
    desc = {"format": "classifier", "version": 1, "model_name": str(cfg.MODEL.NAME),
            "num_classes": cfg.MODEL.NUM_CLASSES, "dataset": str(cfg.DATASETS.NAME)}
    return {"config": cfg.dump(), "wrn_det": desc}


def save_classifier_safetensors(path: str, model: nn.Module, cfg) -> str:
    """Write a classifier's weights, config and description to the safetensors file ``path``; returns ``path``."""
    return save_safetensors(path, model.state_dict(), **classifier_file_fields(model, cfg))

