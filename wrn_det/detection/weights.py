"""``MODEL.WEIGHTS`` for the builtin detectors: a detector checkpoint, or a backbone (classification) file.

Both are matched by the project's one matcher (:func:`wrn_det.models.weights.match_state_dict`);
this module only decides what the file is matched against and formats the report.
"""
import logging
from typing import Optional, Tuple

from torch import nn

from wrn_det.engine.checkpoint import load_checkpoint
from wrn_det.engine.errors import WrnDetError
from wrn_det.models.convert import backbone_key_map
from wrn_det.models.weights import is_counter, match_state_dict, short_list, strip_wrappers

__all__ = ["load_detector_weights", "backbone_network"]

logger = logging.getLogger("wrn_det")

# where the classification network sits inside the builtin detectors (C4, FPN)
_NET_PREFIXES = ("backbone.net.", "backbone.bottom_up.net.")


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DistributedDataParallel (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def backbone_network(model: nn.Module) -> Tuple[str, Optional[nn.Module]]:
    """Return ``(state-dict prefix, network)`` of the classification network inside a detector, or ``("", None)``."""
    model = unwrap(model)
    own = model.state_dict()
    for prefix in _NET_PREFIXES:
        if any(k.startswith(prefix) for k in own):
            net = model
            for part in prefix.strip(".").split("."):
                net = getattr(net, part)
            return prefix, net
    return "", None


def load_detector_weights(model: nn.Module, path: str, key: str = "MODEL.WEIGHTS", strict: bool = True,
                          use_ema: bool = False) -> dict:
    """Load ``path`` into a builtin detector; returns the whole checkpoint dict.

    A detector checkpoint (keys of the detector) loads every tensor that fits. A backbone
    file (keys of the classification network: ``tools/convert_weights.py`` output, our
    classification checkpoints, torchvision / timm state dicts) must hold every stem and
    stage tensor of the network with its shape and no stage tensor the network lacks; its
    classifier is ignored. With ``strict`` (``MODEL.WRN.STRICT_WEIGHTS``) a gap is a
    :class:`WrnDetError`, else a warning. ``use_ema`` loads a training checkpoint's EMA
    weights (``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``). Raises :class:`WrnDetError` if
    the file is missing or unreadable or if none of its tensors fits the model.
    """
    model = unwrap(model)
    try:
        ckpt = load_checkpoint(path)
    except WrnDetError as e:
        raise WrnDetError(f"{key}: {e}") from None
    if use_ema:
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema"), dict):
            raise WrnDetError(f"{key}: {path} holds no EMA weights (a checkpoint of a run with MODEL_EMA.ENABLED); "
                              "set MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY False to evaluate its model weights")
        ckpt = dict(ckpt, model=ckpt["ema"])
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(hasattr(v, "shape") for v in state.values()):
        raise WrnDetError(f"{key}: {path} holds no state dict of tensors")
    state = strip_wrappers(state)
    own = model.state_dict()
    prefix, net = backbone_network(model)
    if net is not None and not any(k in own for k in state):
        required = [k for k in backbone_key_map(net) if not is_counter(k)]
        loadable, report = match_state_dict(state, net.state_dict(), required=required, source=path)
        if not report.ok:
            msg = (f"{key}: {path} does not fit the backbone {type(net).__name__} ({len(required)} stem/stage "
                   f"tensors): {report.problems()}{report.hint(None)}")
            if strict:
                raise WrnDetError(msg + "; set MODEL.WRN.STRICT_WEIGHTS False to load what fits")
            logger.warning(msg)
        loadable = {prefix + k: v for k, v in loadable.items()}
    else:
        loadable, report = match_state_dict(state, own, source=path)
        if report.wrong_shape:
            logger.warning("skipped %d tensors of a different shape: %s", len(report.wrong_shape),
                           short_list([w[0] for w in report.wrong_shape], 6))
        if report.unexpected:
            logger.warning("ignored %d tensors the model does not have: %s", len(report.unexpected),
                           short_list(report.unexpected, 6))
    if not loadable:
        raise WrnDetError(f"{key}: none of the {len(state)} tensors in {path} matches this model "
                          f"(e.g. {next(iter(state))!r}){report.hint(None)}")
    model.load_state_dict(loadable, strict=False)
    # tensors shared with a loaded one (the C4 head's res5 is the network's last stage) are loaded too
    loaded_ptrs = {own[k].data_ptr() for k in loadable}
    missing = [k for k in own if k not in loadable and own[k].data_ptr() not in loaded_ptrs]
    logger.info("loaded %d of %d tensors of the model from %s", len(loadable), len(own), path)
    if missing and "iteration" not in ckpt:
        logger.info("%d model tensors not in the file keep their initialisation: %s", len(missing),
                    short_list(missing, 6))
    return ckpt
