"""The networks of :mod:`wrn_det.models` in timm's registry.

``import wrn_det`` registers them when timm is imported, before or after it (see
``wrn_det/__init__.py``); this module itself is imported only then. Every canonical name
(:data:`~wrn_det.models.registry.CANONICAL_MODELS`) that timm does not already use is
registered with timm's own ``register_model``: the CIFAR WRNs ``wrn_{depth}_{k}``,
``wide_resnet18_2``, ``wide_resnet34_2``, ``wide_resnet152_2``, ``preact_resnet164``,
``preact_resnet1001``, ``nin``, ``vgg_cifar``. timm's ``wide_resnet50_2`` and
``wide_resnet101_2`` stay timm's (their weights load into ours as they are).

    import timm, wrn_det
    model = timm.create_model("wrn_28_10", num_classes=100, drop_rate=0.3)   # the paper's dropout
    backbone = timm.create_model("wide_resnet34_2", features_only=True, out_indices=(1, 2, 3, 4))
    backbone.feature_info.channels(), backbone.feature_info.reduction()     # [128, 256, 512, 1024], [4, 8, 16, 32]
    model = timm.create_model("wrn_28_10", pretrained=True,
                              pretrained_cfg_overlay=dict(file="output/cifar10_wrn_28_10/model_best.pth"))

Models are built by timm's ``build_model_with_cfg``: ``drop_rate`` is the dropout of the
CIFAR WRNs' blocks (the other networks have none: only 0 is accepted), ``in_chans`` must be
3; other keywords go to :func:`~wrn_det.models.build_model`. ``features_only`` wraps the
network in timm's feature extractor over its ``feature_info`` (the stem, then every stage).
``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=PATH)`` reads PATH with timm's
reader (a checkpoint of ``tools/train_cls.py``, a backbone file of
``tools/convert_weights.py``, a ``.safetensors``; ``num_classes=N`` in the overlay when the
file's classifier has N classes) and checks it with the project's one matcher: every stem and
stage tensor must be there with its shape; a classifier the file lacks keeps its
initialisation. Each name has a ``pretrained_cfg`` with the input size, mean, std,
interpolation and crop of its recipe (the CIFAR recipe of ``Base-CIFAR.yaml`` for the CIFAR
networks, the ImageNet recipe of ``imagenet_wide_resnet50_2.yaml`` for the wide ResNets),
and no weights of its own.
"""
import logging
import sys
from collections import OrderedDict
from typing import Dict, List

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from wrn_det.data.classification import CIFAR_MEAN, CIFAR_STD
from wrn_det.engine.errors import WrnDetError

from .convert import backbone_key_map
from .registry import CANONICAL_MODELS, build_model, model_class
from .weights import is_counter, match_state_dict
from .wrn_cifar import WideResNetCIFAR

__all__ = ["register", "default_cfgs"]

logger = logging.getLogger("wrn_det")

_PAPER = dict(paper_name="Wide Residual Networks", paper_ids="arXiv:1605.07146",
              origin_url="https://arxiv.org/abs/1605.07146")


def _cfg(name: str) -> dict:
    """Return the pretrained cfg of ``name``: its recipe's input, normalisation and classifier; no weights."""
    cls, num_classes = model_class(name)
    if cls.family == "imagenet":
        # imagenet_wide_resnet50_2.yaml: Resize(256) (bilinear) + CenterCrop(224), torchvision's mean and std
        data = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear",
                    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="conv1")
    else:
        # Base-CIFAR.yaml: 32x32 images as they are, INPUT.PIXEL_MEAN / PIXEL_STD on the 0-1 scale
        data = dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
                    mean=tuple(round(v / 255.0, 6) for v in CIFAR_MEAN),
                    std=tuple(round(v / 255.0, 6) for v in CIFAR_STD),
                    first_conv="stem" if cls.__name__ in ("WideResNetCIFAR", "PreActResNet") else "stem.conv")
    return dict(num_classes=num_classes, classifier="fc", pool_size=None, **data, **_PAPER)


#: The pretrained cfgs timm's ``register_model`` reads from this module, one per canonical name.
default_cfgs = generate_default_cfgs({name: _cfg(name) for name in CANONICAL_MODELS})


def _network(name: str):
    """Return the model class timm's builder calls: ``kwargs`` -> our network ``name``."""
    def make(drop_rate: float = 0.0, in_chans: int = 3, global_pool: str = "avg", **kwargs):
        if in_chans != 3:
            raise ValueError(f"{name} takes 3-channel images, got in_chans={in_chans}")
        if global_pool != "avg":
            raise ValueError(f"{name} pools by averaging (global_pool='avg'), got {global_pool!r}")
        if drop_rate:
            if model_class(name)[0] is not WideResNetCIFAR:
                raise ValueError(f"{name} has no dropout; drop_rate must be 0 (the CIFAR WRNs take it as the "
                                 "dropout between the convolutions of each block)")
            kwargs["dropout"] = float(drop_rate)
        return build_model(name, **kwargs)

    make.__name__ = make.__qualname__ = f"build_{name}"
    return make


def _fit_checkpoint(state_dict: Dict, model) -> "OrderedDict":
    """timm's ``pretrained_filter_fn``: the file's tensors checked by the one matcher, the model's own where the file
    has none (a classifier of a backbone file); raises :class:`WrnDetError` naming the file for anything else."""
    src = (getattr(model, "pretrained_cfg", None) or {}).get("file") or "the pretrained weights"
    own = model.state_dict()
    required = [k for k in backbone_key_map(model) if not is_counter(k)]
    loadable, report = match_state_dict(state_dict, own, required=required, source=src)
    if not report.ok:
        raise WrnDetError(f"pretrained file {src} does not fit {type(model).__name__} ({report.total} backbone "
                          f"tensors): {report.problems()}{report.hint()}")
    kept = [k for k in own if k not in loadable and not is_counter(k)]
    if kept:
        logger.warning("pretrained file %s: %s keep their initialisation (not in the file, or of another shape)",
                       src, ", ".join(kept))
    out = OrderedDict(own)
    out.update(loadable)
    return out


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs):
        # features_only without out_indices: every map of feature_info (timm's default is 5 of them). The
        # builder reads feature_cfg after building the network, which knows how many maps it has.
        feature_cfg = {"out_indices": (0, 1, 2, 3, 4)}
        every_map = bool(kwargs.get("features_only")) and "out_indices" not in kwargs
        build = _network(name)

        def make(**kw):
            model = build(**kw)
            if every_map:
                feature_cfg["out_indices"] = tuple(range(len(model.feature_info)))
            return model

        return build_model_with_cfg(make, name, pretrained, feature_cfg=feature_cfg,
                                    pretrained_filter_fn=_fit_checkpoint, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f"Return wrn_det's ``{name}`` built by timm (``timm.create_model({name!r}, ...)``); "
                      "see :mod:`wrn_det.models.timm_models`.")
    return create


def register() -> List[str]:
    """Register in timm every canonical network whose name timm does not use; returns the names registered now.

    Calling it again registers nothing more.
    """
    import timm

    module = sys.modules[__name__]
    names = []
    for name in CANONICAL_MODELS:
        if timm.is_model(name):
            continue  # timm's own (wide_resnet50_2, wide_resnet101_2), or registered by an earlier call
        fn = _entrypoint(name)
        setattr(module, name, fn)  # register_model finds the module (and its default_cfgs) through fn.__module__
        register_model(fn)
        names.append(name)
    return names
