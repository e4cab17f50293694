"""Classification pretraining of the WRN family (CIFAR-10/100, SVHN, MNIST, ImageNet).

    from wrn_det.classification import get_cls_cfg, ClsTrainer
    cfg = get_cls_cfg(); cfg.merge_from_file("configs/classification/cifar10_wrn_28_10.yaml")
    ClsTrainer(cfg).train()

The command line is ``tools/train_cls.py``.
"""
from .config import get_cls_cfg
from .trainer import ClsTrainer, NonFiniteLossError

__all__ = ["get_cls_cfg", "ClsTrainer", "NonFiniteLossError"]
