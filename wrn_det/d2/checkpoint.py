"""``MODEL.WEIGHTS`` for detectron2 models with WRN backbones: load, then account for every backbone tensor.

:class:`WRNDetectionCheckpointer` is detectron2's ``DetectionCheckpointer`` plus:

* ``.pkl`` files are read through a restricted unpickler (numpy arrays and plain
  containers only), not with ``pickle.load``;
* a builtin-engine backbone checkpoint (``tools/convert_weights.py ... out.pth``) is
  re-keyed to the protocol names on the fly, so either converted file works here;
* after loading, the WRN tensors of the model (its :class:`WRNTrunk` and
  :class:`WRNHeadStage` modules) are checked: a backbone tensor that was not loaded, a
  checkpoint key that matches nothing (other than a stage this detector does not run),
  or a shape mismatch is an error unless ``strict`` is False, in which case it is
  logged. The outcome is kept in ``last_report``.
"""
import logging
from typing import List

from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.parallel import DistributedDataParallel

from wrn_det.engine.errors import WrnDetError
from wrn_det.models import build_model
from wrn_det.models.convert import (
    D2_AUTHOR,
    is_builtin_backbone_checkpoint,
    read_d2_pickle,
    to_protocol_keys,
)

from .backbone import WRNTrunk
from .roi_heads import WRNHeadStage

__all__ = ["WRNDetectionCheckpointer", "backbone_keys", "checkpoint_metadata"]

logger = logging.getLogger(__name__)


def _wrn_modules(model):
    """Return ``[(state-dict prefix, module)]`` of the WRN modules of ``model``."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return [(f"{name}." if name else "", m) for name, m in model.named_modules()
            if isinstance(m, (WRNTrunk, WRNHeadStage))]


def backbone_keys(model) -> "dict[str, WRNTrunk | WRNHeadStage]":
    """Return ``model state-dict key -> owning WRN module`` for every WRN tensor of ``model``.

    ``num_batches_tracked`` counters are left out (they carry no weights and detectron2's
    checkpoints often lack them).
    """
    return {prefix + k: module for prefix, module in _wrn_modules(model)
            for k in module.state_dict() if not k.endswith("num_batches_tracked")}


def checkpoint_metadata(cfg) -> dict:
    """Return the class metadata of the training set, as the builtin trainer stores it in its checkpoints.

    ``{"thing_classes", "contiguous_id_to_thing_dataset_id", "datasets"}`` from detectron2's
    metadata of the first dataset of ``DATASETS.TRAIN`` that has been loaded; ``{}`` when
    none has. A predictor then needs no registered dataset to name the classes
    (:mod:`wrn_det.detection.detector_weights`).
    """
    from detectron2.data import MetadataCatalog

    for name in cfg.DATASETS.TRAIN:
        meta = MetadataCatalog.get(name)
        names = meta.get("thing_classes")
        if names:
            to_contiguous = meta.get("thing_dataset_id_to_contiguous_id") or {i + 1: i for i in range(len(names))}
            return {"thing_classes": [str(n) for n in names],
                    "contiguous_id_to_thing_dataset_id": {int(v): int(k) for k, v in to_contiguous.items()},
                    "datasets": [str(n) for n in cfg.DATASETS.TRAIN]}
    return {}


def _unused_stage_key(key: str, stages: List[str]) -> bool:
    return key.split(".", 1)[0] in stages


def _short(keys, n=3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


class WRNDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer that checks the WRN backbone tensors after every load.

    ``strict`` (``MODEL.WRN.STRICT_WEIGHTS``): raise :class:`WrnDetError` when a backbone
    tensor is not loaded or the file has keys the model does not use; when False, the
    same facts are logged as a warning. ``last_report`` holds ``loaded``, ``missing``,
    ``unexpected``, ``unused_stages`` and ``wrong_shape`` of the last load.
    """

    def __init__(self, model, save_dir: str = "", *, strict: bool = True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = bool(strict)
        self.last_report = None
        self._source = ""
        self.extra_state = {}  # saved with every checkpoint (the training set's classes: see checkpoint_metadata)

    def save(self, name: str, **kwargs) -> None:
        """Save ``<save_dir>/<name>.pth`` as detectron2 does, with ``extra_state`` added; returns None."""
        super().save(name, **{**self.extra_state, **kwargs})

    def load(self, path, *args, **kwargs):
        """Load ``path`` as detectron2 does; returns the checkpoint's extra data."""
        self._source = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = read_d2_pickle(filename)
            if "model" not in data or "__author__" not in data:
                raise WrnDetError(f"{filename}: not a detectron2 weights pickle (expected the keys 'model' and "
                                  f"'__author__', got {sorted(data)[:6]})")
            return data
        loaded = super()._load_file(filename)
        if is_builtin_backbone_checkpoint(loaded):
            meta = loaded["wrn_det"]
            net = build_model(meta["model_name"])
            # detectron2 then matches the protocol keys by suffix, as for a converted .pkl
            return {"model": to_protocol_keys(loaded["model"], net), "__author__": D2_AUTHOR,
                    "matching_heuristics": True, "wrn_det": meta}
        return loaded

    def _load_model(self, checkpoint):
        converted = checkpoint.get("__author__") == D2_AUTHOR
        incompatible = super()._load_model(checkpoint)
        wrn = backbone_keys(self.model)
        if not wrn:
            return incompatible
        stages, all_stages = set(), {"stem"}
        for module in wrn.values():
            if isinstance(module, WRNTrunk):
                stages.update(s for s in module.network_stages if s not in module.stages)
                all_stages.update(module.network_stages)
        prefixes = tuple(p for p, _ in _wrn_modules(self.model) if p)
        used_by_head = {m.stage_name for m in wrn.values() if isinstance(m, WRNHeadStage)}
        stages -= used_by_head
        missing = set(k for k in incompatible.missing_keys if k in wrn)
        wrong_shape = {k for k, *_ in incompatible.incorrect_shapes if k in wrn}
        unused = [k for k in incompatible.unexpected_keys if _unused_stage_key(k, sorted(stages))]
        unexpected = []
        for k in incompatible.unexpected_keys:
            if k in unused:
                continue
            # detectron2's suffix matching leaves a key of the right name but the wrong shape unmatched
            same_name = [m for m in wrn if m == k or m.endswith("." + k)]
            if same_name:
                wrong_shape.update(same_name)
            elif converted or k.split(".", 1)[0] in all_stages or k.startswith(prefixes):
                unexpected.append(k)  # a backbone key (other keys, e.g. of another head, only get detectron2's warning)
        missing |= wrong_shape
        self.last_report = {"loaded": len(wrn) - len(missing), "total": len(wrn), "missing": sorted(missing),
                            "unexpected": sorted(unexpected), "unused_stages": sorted(unused),
                            "wrong_shape": sorted(wrong_shape)}
        src = self._source
        if unused:
            logger.info("%s: %d tensors of stages this detector does not run were not loaded (%s)",
                        src, len(unused), _short(unused))
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the {len(wrn)} backbone tensors were not loaded "
                            f"({_short(missing)}){' (shape mismatch: ' + _short(wrong_shape) + ')' if wrong_shape else ''}")
        if unexpected:
            problems.append(f"{len(unexpected)} keys of the file match nothing in the model ({_short(unexpected)})")
        if problems:
            msg = f"MODEL.WEIGHTS {src}: " + "; ".join(problems)
            if self.strict:
                raise WrnDetError(msg + "; set MODEL.WRN.STRICT_WEIGHTS False to load it anyway")
            logger.warning("%s (MODEL.WRN.STRICT_WEIGHTS is False: continuing)", msg)
        else:
            logger.info("%s: loaded all %d backbone tensors", src, len(wrn))
        return incompatible
