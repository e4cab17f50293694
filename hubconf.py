"""torch.hub entry points of wrn-det: one per network of ``wrn_det.models``, and ``predictor``.

    import torch
    model = torch.hub.load("<owner>/wrn-det", "wrn_28_10", num_classes=10, dropout=0.3)
    backbone = torch.hub.load("<owner>/wrn-det", "wide_resnet34_2")
    model = torch.hub.load("<owner>/wrn-det", "wrn_28_10", weights="model_best.pth")     # or a .safetensors
    predictor = torch.hub.load("<owner>/wrn-det", "predictor", "hub/shapes_wrn")          # a Hub folder or owner/name
    torch.hub.list("<owner>/wrn-det"), torch.hub.help("<owner>/wrn-det", "wrn_28_10")

Each network entry is ``wrn_det.models.build_model(name, **kwargs)``; ``weights=PATH`` loads a
weights file (a checkpoint of ``tools/train_cls.py``, a ``.safetensors``, a torchvision or
timm state dict) strictly into it. ``predictor(folder_or_config, weights=None)`` is
``wrn_det.Predictor``: from a Hub folder (``tools/export_model.py --format hub``) or ``owner/name``
on the Hugging Face Hub when ``weights`` is None, else from a config and a checkpoint.
"""
import os

# the networks need these; the predictor also needs fvcore, opencv-python-headless and pycocotools
# (``pip install -e .`` of the repository), imported when it is called
dependencies = ["torch", "torchvision", "numpy", "yaml"]

from wrn_det.models.registry import CANONICAL_MODELS  # noqa: E402  (light: no network is built here)


def _network_entry(name: str):
    def entry(pretrained: bool = False, weights=None, **kwargs):
        from wrn_det.models import build_model, load_classifier_weights

        if pretrained:
            raise ValueError(f"wrn-det publishes no weights of its own for {name}; pass weights=PATH (a checkpoint "
                             "of tools/train_cls.py or a .safetensors)")
        model = build_model(name, **kwargs)
        if weights:
            load_classifier_weights(model, os.fspath(weights), key="weights")
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"Return wrn_det.models.build_model({name!r}, **kwargs): num_classes, dropout (CIFAR WRNs), "
                     "memory_efficient, norm_layer, ...; weights=PATH loads a weights file strictly.")
    return entry


for _name in CANONICAL_MODELS:
    globals()[_name] = _network_entry(_name)
del _name


def predictor(folder_or_config, weights=None, device=None, opts=()):
    """Return a ``wrn_det.Predictor``: ``Predictor.from_pretrained(folder_or_config)`` (a Hub folder, or owner/name on
    the Hugging Face Hub) when ``weights`` is None, else ``Predictor(folder_or_config, weights)`` (a config: a path,
    a name under configs/, a run's config.yaml; a checkpoint of either engine or a .safetensors)."""
    from wrn_det import Predictor

    if weights is None:
        return Predictor.from_pretrained(folder_or_config, device=device, opts=opts)
    return Predictor(folder_or_config, weights=weights, device=device, opts=opts)
