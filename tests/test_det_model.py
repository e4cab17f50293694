"""Detection models: WRN backbones (C4, FPN) from the feature protocol, FrozenBN and FREEZE_AT,
detector outputs, and MODEL.WEIGHTS from a classification checkpoint."""
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from wrn_det.detection.modeling.backbone import WRNBackbone, build_backbone
from wrn_det.detection.config import get_det_cfg
from wrn_det.detection.modeling import build_detector
from wrn_det.detection.weights import load_detector_weights
from wrn_det.engine.config import load_config
from wrn_det.engine.errors import ConfigError
from wrn_det.models import build_model


def cfg_for(config, *opts):
    return load_config(get_det_cfg(), config, ["MODEL.DEVICE", "cpu", *opts])


@pytest.mark.parametrize("config, opts, names", [
    ("Base-WRN-RCNN-FPN.yaml", ["MODEL.WRN.NAME", "wide_resnet18_1"], ["p2", "p3", "p4", "p5", "p6"]),
    ("Base-WRN-RCNN-C4.yaml", ["MODEL.WRN.NAME", "wide_resnet18_1"], ["res4"]),
    ("shapes_wrn_frcnn.yaml", ["MODEL.WRN.NAME", "wrn_10_1"], ["p1", "p2", "p3"]),
])
def test_backbone_outputs_match_output_shape(config, opts, names):
    backbone = build_backbone(cfg_for(config, *opts))
    shapes = backbone.output_shape()
    assert list(shapes) == names
    x = torch.zeros(1, 3, 128, 192)
    with torch.no_grad():
        feats = backbone(x)
    for name, f in feats.items():
        assert f.shape[1] == shapes[name].channels
        assert (f.shape[2], f.shape[3]) == (128 // shapes[name].stride, 192 // shapes[name].stride), name


def test_freeze_at_and_frozen_bn_follow_detectron2():
    net = build_model("wide_resnet18_1", num_classes=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net.forward_features(x)["res4"]
    b = WRNBackbone(net, ["res4"], freeze_at=2)  # the network was built with BatchNorm
    # stem and res2 frozen (FrozenBN, no gradients); res3 and res4 train their BatchNorm
    assert isinstance(net.bn1, FrozenBatchNorm2d) and isinstance(net.layer1[0].bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in list(net.conv1.parameters()) + list(net.layer1.parameters()))
    assert isinstance(net.layer2[0].bn1, nn.BatchNorm2d) and net.layer2[0].conv1.weight.requires_grad
    # stages the detector never runs (res5 here) and the classifier get no gradients
    assert not any(p.requires_grad for p in list(net.layer4.parameters()) + list(net.fc.parameters()))
    b.eval()
    with torch.no_grad():
        assert torch.allclose(b(x)["res4"], expected, atol=1e-5)  # FrozenBN = BN in eval mode
    frozen = WRNBackbone(build_model("wide_resnet18_1", num_classes=1, norm_layer=FrozenBatchNorm2d), ["res4"],
                         freeze_at=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    with pytest.raises(ConfigError, match="OUT_FEATURES: 'res9'"):
        WRNBackbone(build_model("wide_resnet18_1", num_classes=1), ["res9"])


def test_detector_outputs_boxes_in_original_coordinates():
    cfg = cfg_for("shapes_wrn_frcnn.yaml", "MODEL.WRN.NAME", "wrn_10_1", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    model = build_detector(cfg)
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    model.train()
    losses = model([{"image": image, "boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "classes": torch.tensor([2])}])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 128, "width": 192}])
    assert len(out["boxes"]) > 0 and out["classes"].max() <= 2 and out["classes"].min() >= 0
    assert out["boxes"][:, 2].max() <= 192 and out["boxes"][:, 3].max() <= 128
    assert out["boxes"][:, 2].max() > 96  # scaled from the 96-pixel input to the 192-pixel original


def test_model_weights_from_classification_checkpoint(tmp_path):
    net = build_model("wrn_10_1", num_classes=10)
    for p in net.parameters():
        nn.init.normal_(p)
    path = tmp_path / "cls.pth"
    torch.save({"model": net.state_dict()}, path)
    model = build_detector(cfg_for("shapes_wrn_frcnn.yaml", "MODEL.WRN.NAME", "wrn_10_1"))
    load_detector_weights(model, str(path))
    mine = model.backbone.bottom_up.net.state_dict()
    skipped = [k for k, v in net.state_dict().items() if mine[k].shape != v.shape]
    assert skipped == ["fc.weight", "fc.bias"]  # the classifier (10 classes here) is not a backbone tensor
    for k, v in net.state_dict().items():
        if k not in skipped:
            assert torch.equal(mine[k], v), k
