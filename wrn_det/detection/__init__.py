"""The builtin detection engine: WRN backbones (C4, FPN) in detectron2's Faster R-CNN, written on
torchvision's operators, an iteration-based trainer and COCO evaluation.

    from wrn_det.detection.config import get_det_cfg       # detectron2 key names + MODEL.WRN.*
    from wrn_det.detection.modeling import build_detector   # MODEL.META_ARCHITECTURE
    from wrn_det.detection.train import Trainer             # tools/train_net.py

Sub-packages: ``modeling`` (registries, backbones, RPN, RoI heads, poolers, fast CPU
convolutions, the detectors), ``evaluation`` (COCO box AP, proposal recall, evaluation
pictures), ``weights`` (detector weight files, detectron2's key layout, class metadata).
Modules: ``config``, ``train``, ``predictor``, ``export``, ``visualize``, ``analysis``.
Submodules are imported directly; importing this package loads nothing else.
"""
