"""wrn-det: Wide Residual Networks for classification pretraining and object detection.

``import wrn_det`` is light: it imports no detectron2, no torch and builds nothing. The
subpackages are ``wrn_det.models`` (the WRN family and baselines), ``wrn_det.data``,
``wrn_det.classification``, ``wrn_det.detection`` (the builtin engine),
``wrn_det.engine`` (shared pieces) and ``wrn_det.d2`` (detectron2 integration,
importable only where detectron2 is installed). ``wrn_det.Predictor`` (a trained
detector on your own images) is imported on first use.

With timm installed, the networks of ``wrn_det.models`` are registered in timm's registry
as soon as timm is imported, before or after ``wrn_det``
(:mod:`wrn_det.models.timm_models`): ``import timm, wrn_det; timm.create_model("wrn_28_10")``.
Until timm is imported this costs nothing but a finder on ``sys.meta_path``.
"""
import sys

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


# ------------------------------------------------------------------------------ timm's registry


def _register_in_timm() -> None:
    """Register the networks in timm's registry; a failure is a warning, never a broken ``import timm``."""
    try:
        from wrn_det.models.timm_models import register

        register()
    except Exception as e:  # noqa: BLE001 - whatever an unexpected timm version raises
        import warnings

        warnings.warn(f"wrn_det could not register its networks in timm's registry: {type(e).__name__}: {e}")


class _RegisterAfterLoading:
    """timm's own loader, plus the registration once timm's package has run (a loader in importlib's protocol;
    importlib.abc is not imported, to keep ``import wrn_det`` light)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register_in_timm()

    def __getattr__(self, name):  # resource readers and the like: timm's loader answers
        return getattr(self.loader, name)


class _TimmFinder:
    """Finds nothing itself: when ``timm`` is first imported, wraps the loader the other finders give it (a meta path
    finder in importlib's protocol)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        import importlib.util

        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once: the finders below find the real timm
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoading(spec.loader)
        return spec


if sys.modules.get("timm") is not None:  # imported already (None: blocked, as if not installed)
    _register_in_timm()
elif not any(isinstance(f, _TimmFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _TimmFinder())
