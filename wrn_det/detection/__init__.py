"""The builtin detection engine: WRN backbones (C4, FPN) in Faster R-CNN built from
torchvision's detection pieces, an iteration-based trainer and COCO evaluation.

    from wrn_det.detection.config import get_det_cfg      # detectron2 key names + MODEL.WRN.*
    from wrn_det.detection.modeling import build_detector  # MODEL.META_ARCHITECTURE
    from wrn_det.detection.train import Trainer, main      # tools/train_net.py

Submodules are imported directly; importing this package loads nothing else.
"""
