"""The Wide Residual Network family and its baselines as plain PyTorch modules.

    from wrn_det.models import build_model, list_models, ShapeSpec
    model = build_model("wrn_28_10", num_classes=10, dropout=0.3)
    feats = model.forward_features(x)   # OrderedDict stage name -> tensor
    model.output_shape()                # OrderedDict stage name -> ShapeSpec(channels, stride)
"""

from .baselines import NIN, VGGCIFAR, PreActResNet
from .common import FeatureNet, ShapeSpec, Stage, count_parameters
from .registry import build_model, list_models
from .wide_resnet import WideResNet
from .wrn_cifar import WideResNetCIFAR

__all__ = [
    "build_model", "list_models", "ShapeSpec", "FeatureNet", "Stage", "count_parameters",
    "WideResNetCIFAR", "WideResNet", "PreActResNet", "NIN", "VGGCIFAR",
]
