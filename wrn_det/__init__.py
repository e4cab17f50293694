"""wrn-det: Wide Residual Networks for classification pretraining and object detection.

``import wrn_det`` is light: it imports no detectron2 and builds nothing. The
subpackages are ``wrn_det.models`` (the WRN family and baselines), ``wrn_det.data``,
``wrn_det.classification``, ``wrn_det.detection`` (the builtin engine),
``wrn_det.engine`` (shared pieces) and ``wrn_det.d2`` (detectron2 integration,
importable only where detectron2 is installed). ``wrn_det.Predictor`` (a trained
detector on your own images) is imported on first use.
"""

__version__ = "0.1.0"

# attribute -> module that defines it, imported when the attribute is first read
_LAZY = {"Predictor": "wrn_det.detection.predictor"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wrn_det' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
