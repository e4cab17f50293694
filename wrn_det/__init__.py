"""wrn-det: Wide Residual Networks for classification pretraining and object detection.

``import wrn_det`` is light: it imports no detectron2 and builds nothing. The
subpackages are ``wrn_det.models`` (the WRN family and baselines), ``wrn_det.data``,
``wrn_det.classification``, ``wrn_det.detection`` (the builtin engine),
``wrn_det.engine`` (shared pieces) and ``wrn_det.d2`` (detectron2 integration,
importable only where detectron2 is installed).
"""

__version__ = "0.1.0"
