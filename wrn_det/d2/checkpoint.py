"""``MODEL.WEIGHTS`` for detectron2 models with WRN backbones: load, then account for every backbone tensor.

:class:`WRNDetectionCheckpointer` is detectron2's ``DetectionCheckpointer`` plus:

* ``.pkl`` and ``.safetensors`` files are read by the project's one reader
  (:func:`wrn_det.engine.weights_file.read_weights_file`): pickles through a restricted
  unpickler (numpy arrays and plain containers only), not with ``pickle.load``; safetensors,
  which hold no code, with their class names and config;
* a builtin-engine backbone checkpoint (``tools/convert_weights.py ... out.pth``, or its
  ``.safetensors``) is re-keyed to the protocol names on the fly, so any converted file works here;
* after loading, the WRN tensors of the model (its :class:`WRNTrunk` and
  :class:`WRNHeadStage` modules) are checked: a backbone tensor that was not loaded, a
  checkpoint key that matches nothing (other than a stage this detector does not run),
  or a shape mismatch is an error unless ``strict`` is False, in which case it is
  logged. The outcome is kept in ``last_report``.
"""
import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from torch.nn.parallel import DistributedDataParallel

from wrn_det.detection.weights import checkpoint_metadata as builtin_checkpoint_metadata
from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.weights_file import DETECTRON2_PICKLE, SAFETENSORS, read_weights_file, weights_format
from wrn_det.models import build_model
from wrn_det.models.convert import D2_AUTHOR, is_builtin_backbone_checkpoint, to_protocol_keys

from wrn_det.models.weights import match_state_dict, short_list

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
    """Return the training set's class metadata from detectron2's catalog, as the builtin trainer stores it.

    See :func:`wrn_det.detection.weights.checkpoint_metadata`; a predictor then needs no
    registered dataset to name the classes.
    """
    return builtin_checkpoint_metadata(cfg, MetadataCatalog)


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
        fmt = weights_format(filename)
        if fmt == DETECTRON2_PICKLE:
            data = read_weights_file(filename).contents
            if "model" not in data or "__author__" not in data:
                raise WrnDetError(f"{filename}: not a detectron2 weights pickle (expected the keys 'model' and "
                                  f"'__author__', got {sorted(data)[:6]})")
            return data
        if fmt == SAFETENSORS:
            wf = read_weights_file(filename)
            if wf.model is None:
                raise WrnDetError(f"{filename}: holds no tensors")
            loaded = dict(wf.contents, model=wf.model)  # checked tensors; the class names and config ride along
        else:
            loaded = super()._load_file(filename)
        if is_builtin_backbone_checkpoint(loaded):
            meta = loaded["wrn_det"]
            net = build_model(meta["model_name"])
            # detectron2 then matches the protocol keys by suffix, as for a converted .pkl
            return {"model": to_protocol_keys(loaded["model"], net), "__author__": D2_AUTHOR,
                    "matching_heuristics": True, "wrn_det": meta}
        return loaded

    def _load_model(self, checkpoint):
        wrn = backbone_keys(self.model)
        if not wrn:
            return super()._load_model(checkpoint)
        converted = checkpoint.get("__author__") == D2_AUTHOR
        unused, all_stages = set(), {"stem"}
        for module in wrn.values():
            if isinstance(module, WRNTrunk):
                unused.update(s for s in module.network_stages if s not in module.stages)
                all_stages.update(module.network_stages)
        unused -= {m.stage_name for m in wrn.values() if isinstance(m, WRNHeadStage)}
        prefixes = tuple(p for p, _ in _wrn_modules(self.model) if p)
        file_state = dict(checkpoint["model"])  # detectron2 pops and re-keys it while loading
        skipped_stages = sorted(k for k in file_state if k.split(".", 1)[0] in unused)

        def not_ours(key: str) -> bool:
            # stages this detector does not run, and keys of other heads (detectron2's own business)
            if key.split(".", 1)[0] in unused:
                return True
            return not (converted or key.split(".", 1)[0] in all_stages or key.startswith(prefixes))

        own = self.model.state_dict()
        _, report = match_state_dict(file_state, {k: own[k] for k in wrn}, source=self._source, ignore=not_ours,
                                     suffix=True)
        incompatible = super()._load_model(checkpoint)
        self.last_report = {"loaded": len(report.matched), "total": len(wrn),
                            "missing": sorted(set(report.missing) | {k for k, *_ in report.wrong_shape}),
                            "unexpected": sorted(report.unexpected), "unused_stages": skipped_stages,
                            "wrong_shape": sorted(k for k, *_ in report.wrong_shape)}
        src = self._source
        if skipped_stages:
            logger.info("%s: %d tensors of stages this detector does not run were not loaded (%s)",
                        src, len(skipped_stages), short_list(skipped_stages, sort=True))
        if not report.ok:
            wrong = sorted(k for k, *_ in report.wrong_shape)
            not_loaded = sorted(set(report.missing) | set(wrong))
            problems = []
            if not_loaded:
                mismatch = f" (shape mismatch: {short_list(wrong)})" if wrong else ""
                problems.append(f"{len(not_loaded)} of the {len(wrn)} backbone tensors were not loaded "
                                f"({short_list(not_loaded)}){mismatch}")
            if report.unexpected:
                problems.append(f"{len(report.unexpected)} keys of the file match nothing in the model "
                                f"({short_list(report.unexpected, sort=True)})")
            msg = f"MODEL.WEIGHTS {src}: " + "; ".join(problems) + report.hint()
            if self.strict:
                raise WrnDetError(msg + "; set MODEL.WRN.STRICT_WEIGHTS False to load it anyway")
            logger.warning("%s (MODEL.WRN.STRICT_WEIGHTS is False: continuing)", msg)
        else:
            logger.info("%s: loaded all %d backbone tensors", src, len(wrn))
        return incompatible
