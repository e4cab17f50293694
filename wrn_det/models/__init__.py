"""The Wide Residual Network family and its baselines as plain PyTorch modules.

    from wrn_det.models import build_model, list_models, ShapeSpec
    model = build_model("wrn_28_10", num_classes=10, dropout=0.3)
    feats = model.forward_features(x)   # OrderedDict stage name -> tensor
    model.output_shape()                # OrderedDict stage name -> ShapeSpec(channels, stride)
    model = from_pretrained("folder or owner/name")   # a classifier written by tools/export_model.py --format hub

With timm installed, ``import wrn_det`` also registers these networks in timm's registry
(:mod:`wrn_det.models.timm_models`): ``timm.create_model("wrn_28_10", num_classes=100)``.
"""

from .baselines import NIN, VGGCIFAR, PreActResNet
from .common import FeatureNet, ShapeSpec, Stage, count_parameters
from .pretrained import from_pretrained, load_classifier_weights, save_pretrained
from .registry import build_model, list_models
from .wide_resnet import WideResNet
from .wrn_cifar import WideResNetCIFAR

__all__ = [
    "build_model", "list_models", "ShapeSpec", "FeatureNet", "Stage", "count_parameters",
    "WideResNetCIFAR", "WideResNet", "PreActResNet", "NIN", "VGGCIFAR", "from_pretrained", "save_pretrained",
    "load_classifier_weights",
]
