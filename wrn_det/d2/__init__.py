"""detectron2 integration: importing this package registers the WRN pieces in detectron2.

    import wrn_det.d2                      # BACKBONE_REGISTRY: build_wrn_backbone, build_wrn_fpn_backbone
    from wrn_det.d2 import add_wrn_config  # ROI_HEADS_REGISTRY: WRNRes5ROIHeads; datasets: shapes_train, ...

The only package of wrn_det that imports detectron2; ``import wrn_det`` and the
builtin engine never import it.
"""
import warnings

try:
    import detectron2  # noqa: F401
except ImportError as e:  # one line, so that tools can print it as it is
    raise ImportError(
        "wrn_det.d2 needs detectron2, which is not installed; build it from source: "
        "python -m pip install 'git+https://github.com/facebookresearch/detectron2.git' "
        f"(see the README) [{e}]") from e

with warnings.catch_warnings():
    # detectron2 scripts a few helpers with torch.jit.script at import time; recent torch
    # warns about that on every run, which a user of these tools cannot act on
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from .backbone import WRNFPNBackbone, WRNTrunk, build_wrn_backbone, build_wrn_fpn_backbone
    from .checkpoint import WRNDetectionCheckpointer
    from .config import add_wrn_config
    from .data import register_coco_instances, register_datasets
    from .roi_heads import WRNHeadStage, WRNRes5ROIHeads

__all__ = [
    "add_wrn_config", "build_wrn_backbone", "build_wrn_fpn_backbone", "WRNTrunk", "WRNFPNBackbone",
    "WRNRes5ROIHeads", "WRNHeadStage", "WRNDetectionCheckpointer", "register_datasets", "register_coco_instances",
]

register_datasets()
