"""The WRN backbones and RoI head in detectron2: shipped configs build, shapes match, weights load, features agree.

Skipped when detectron2 is not installed (it has no wheel; see the README to build it).
"""
import glob
import math
import os

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (build it from source, see the README); "
                                         "the detectron2 integration tests are skipped")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.backbone import Backbone  # noqa: E402

import wrn_det.d2  # noqa: E402,F401  (registers the WRN pieces)
from helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread_module")

from wrn_det.d2 import WRNDetectionCheckpointer, WRNFPNBackbone, WRNRes5ROIHeads, WRNTrunk, add_wrn_config  # noqa: E402
from wrn_det.d2.train import build_config  # noqa: E402
from wrn_det.detection.config import get_det_cfg  # noqa: E402
from wrn_det.detection.modeling import build_detector  # noqa: E402
from wrn_det.detection.weights import load_detector_weights  # noqa: E402
from wrn_det.engine.config import load_config  # noqa: E402
from wrn_det.engine.errors import ConfigError, WrnDetError  # noqa: E402
from wrn_det.models import build_model as build_net  # noqa: E402
from wrn_det.models.convert import convert_weights, read_d2_pickle, save_d2_checkpoint  # noqa: E402

C4 = ["MODEL.BACKBONE.NAME", "build_wrn_backbone", "MODEL.ROI_HEADS.NAME", "WRNRes5ROIHeads"]
FPN_ROI = ["MODEL.ROI_HEADS.NAME", "StandardROIHeads", "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
           "MODEL.ROI_BOX_HEAD.NUM_FC", "2", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7"]


def _fpn(stages, levels):
    return ["MODEL.BACKBONE.NAME", "build_wrn_fpn_backbone", "MODEL.WRN.OUT_FEATURES", str(stages),
            "MODEL.FPN.IN_FEATURES", str(stages), "MODEL.RPN.IN_FEATURES", str(levels),
            "MODEL.ROI_HEADS.IN_FEATURES", str(levels[:-1]),
            "MODEL.ANCHOR_GENERATOR.SIZES", str([[16 * 2 ** i] for i in range(len(levels))]), *FPN_ROI]


IMAGENET_C4 = ["MODEL.WRN.NAME", "wide_resnet18_1", *C4]
IMAGENET_FPN = ["MODEL.WRN.NAME", "wide_resnet18_1", *_fpn(["res2", "res3", "res4", "res5"], ["p2", "p3", "p4", "p5", "p6"])]
CIFAR_C4 = ["MODEL.WRN.NAME", "wrn_10_2", *C4, "MODEL.WRN.OUT_FEATURES", "['stage2']", "MODEL.RPN.IN_FEATURES",
            "['stage2']", "MODEL.ROI_HEADS.IN_FEATURES", "['stage2']"]
CIFAR_FPN = ["MODEL.WRN.NAME", "wrn_10_2", *_fpn(["stage1", "stage2", "stage3"], ["p0", "p1", "p2", "p3"])]


def _d2_cfg(opts):
    """detectron2 users' path: get_cfg(), add_wrn_config, overrides."""
    cfg = get_cfg()
    add_wrn_config(cfg)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3", *opts])
    return cfg


def _builtin_cfg(opts):
    return load_config(get_det_cfg(), None, ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3", *opts])


def _shipped_detection_configs():
    return sorted(p for p in glob.glob(str(REPO / "configs" / "**" / "*.yaml"), recursive=True)
                  if os.sep + "classification" + os.sep not in p)


def test_c4_builds_the_network_once_and_the_head_runs_its_next_stage(monkeypatch):
    from wrn_det.detection.modeling import backbone as builtin

    built = []
    real = builtin.build_wrn_net
    monkeypatch.setattr(builtin, "build_wrn_net", lambda cfg: built.append(1) or real(cfg))
    model = build_model(_d2_cfg(IMAGENET_C4))
    assert len(built) == 1
    head = model.roi_heads.res5.res5
    assert head[0].conv1.in_channels == 256 and head[0].conv1.stride == (2, 2)  # res5 of wide_resnet18_1
    assert all(p.requires_grad for p in head.parameters())
    assert "res5" not in dict(model.backbone.named_children())  # the trunk stops at res4


def test_every_shipped_detection_config_builds_on_detectron2():
    configs = _shipped_detection_configs()
    if not configs:
        pytest.skip("no detection config under configs/ yet")
    for path in configs:
        cfg = get_cfg()
        add_wrn_config(cfg)
        cfg.merge_from_file(path)  # an unknown key would raise here
        # full-size networks: built on the meta device (shapes only, no memory, no initialisation time)
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            model = build_model(cfg)
            builtin = build_detector(load_config(get_det_cfg(), path, ["MODEL.DEVICE", "meta"]))
        name = os.path.relpath(path, REPO)
        assert isinstance(model.backbone, (WRNTrunk, WRNFPNBackbone)), (name, type(model.backbone))
        if isinstance(model.backbone, WRNTrunk):
            assert isinstance(model.roi_heads, WRNRes5ROIHeads), (name, type(model.roi_heads))
        shapes = model.backbone.output_shape()
        for f in list(cfg.MODEL.RPN.IN_FEATURES) + list(cfg.MODEL.ROI_HEADS.IN_FEATURES):
            assert f in shapes, (name, f, list(shapes))
        # the builtin engine reads the same file into a backbone with the same outputs
        assert {k: (s.channels, s.stride) for k, s in shapes.items()} == \
            {k: (s.channels, s.stride) for k, s in builtin.backbone.output_shape().items()}, name
        del model, builtin


@pytest.mark.parametrize("opts", [IMAGENET_C4, IMAGENET_FPN, CIFAR_C4, CIFAR_FPN],
                         ids=["imagenet-C4", "imagenet-FPN", "cifar-C4", "cifar-FPN"])
def test_backbone_outputs_match_output_shape(opts):
    torch.manual_seed(0)
    backbone = build_model(_d2_cfg(opts)).backbone
    assert isinstance(backbone, Backbone)
    d = backbone.size_divisibility
    shapes = backbone.output_shape()
    strides = [s.stride for s in shapes.values()]
    # detectron2's conventions: 0 for a C4 trunk, the coarsest input stride for an FPN
    assert d == (0 if isinstance(backbone, WRNTrunk) else max(backbone.bottom_up.output_shape()[f].stride
                                                                for f in backbone.in_features))
    h, w = 3 * max(strides), 5 * max(strides)
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, h, w))
    assert list(out) == list(shapes)
    for name, x in out.items():
        s = shapes[name]
        assert tuple(x.shape) == (2, s.channels, math.ceil(h / s.stride), math.ceil(w / s.stride)), name


def _classifier_checkpoint(tmp_path, name):
    """A classification checkpoint of ``name`` with random weights and non-trivial BN statistics."""
    torch.manual_seed(1)
    net = build_net(name)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    path = tmp_path / f"{name}_cls.pth"
    torch.save({"model": net.state_dict()}, path)
    return path


@pytest.mark.parametrize("opts", [IMAGENET_C4, IMAGENET_FPN, CIFAR_C4, CIFAR_FPN],
                         ids=["imagenet-C4", "imagenet-FPN", "cifar-C4", "cifar-FPN"])
def test_builtin_and_detectron2_backbones_give_identical_features(tmp_path, opts):
    name = opts[1]
    src = _classifier_checkpoint(tmp_path, name)
    convert_weights(str(src), model_name=name, builtin_out=str(tmp_path / "w.pth"), d2_out=str(tmp_path / "w.pkl"),
                    safetensors_out=str(tmp_path / "w.safetensors"))

    builtin = build_detector(_builtin_cfg([*opts, "MODEL.WEIGHTS", str(tmp_path / "w.pth")])).eval()
    load_detector_weights(builtin, str(tmp_path / "w.pth"))
    d2 = build_model(_d2_cfg(opts)).eval()
    ckpt = WRNDetectionCheckpointer(d2)
    ckpt.load(str(tmp_path / "w.pkl"))
    report = ckpt.last_report
    assert report["missing"] == [] and report["unexpected"] == [] and report["loaded"] == report["total"] > 20

    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        if isinstance(d2.backbone, WRNFPNBackbone):
            # the pyramid's own convolutions are not in a classification checkpoint: same weights on both sides
            d2.backbone.fpn.load_state_dict(builtin.backbone.fpn.state_dict())
        ours, theirs = builtin.backbone(x), d2.backbone(x)
        assert list(ours) == list(theirs)
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k
        if isinstance(d2.roi_heads, WRNRes5ROIHeads):  # C4: the box head's stage too
            f = ours[list(ours)[-1]]
            pooled = torch.randn(4, f.shape[1], 14, 14)
            assert torch.equal(builtin.roi_heads.box_head.res5(pooled), d2.roi_heads.res5(pooled))

    # the builtin-format file and the .safetensors load into detectron2 as well, with the same result
    for other in ("w.pth", "w.safetensors"):
        d2b = build_model(_d2_cfg(opts)).eval()
        WRNDetectionCheckpointer(d2b).load(str(tmp_path / other))
        for (k, a), (_, b) in zip(d2.state_dict().items(), d2b.state_dict().items()):
            if k.startswith(("backbone.bottom_up.", "roi_heads.res5.")) or (isinstance(d2.backbone, WRNTrunk)
                                                                            and k.startswith("backbone.")):
                assert torch.equal(a, b), (other, k)


def test_weights_with_missing_or_unknown_backbone_keys_are_an_error(tmp_path):
    src = _classifier_checkpoint(tmp_path, "wide_resnet18_1")
    convert_weights(str(src), model_name="wide_resnet18_1", d2_out=str(tmp_path / "w.pkl"))
    good = read_d2_pickle(str(tmp_path / "w.pkl"))

    missing = {**good, "model": {k: v for k, v in good["model"].items() if k != "res3.1.conv2.weight"}}
    save_d2_checkpoint(missing, str(tmp_path / "missing.pkl"))
    with pytest.raises(WrnDetError, match=r"1 of the \d+ backbone tensors were not loaded \(backbone.res3.1.conv2.weight"):
        WRNDetectionCheckpointer(build_model(_d2_cfg(IMAGENET_C4))).load(str(tmp_path / "missing.pkl"))
    # allowed by the config: loads the rest and reports what it did not load
    cfg = _d2_cfg(IMAGENET_C4 + ["MODEL.WRN.STRICT_WEIGHTS", "False"])
    ckpt = WRNDetectionCheckpointer(build_model(cfg), strict=cfg.MODEL.WRN.STRICT_WEIGHTS)
    ckpt.load(str(tmp_path / "missing.pkl"))
    assert ckpt.last_report["missing"] == ["backbone.res3.1.conv2.weight"]

    unknown = {**good, "model": {**good["model"], "res6.0.conv1.weight": good["model"]["res5.0.conv1.weight"]}}
    save_d2_checkpoint(unknown, str(tmp_path / "unknown.pkl"))
    with pytest.raises(WrnDetError, match="1 keys of the file match nothing in the model"):
        WRNDetectionCheckpointer(build_model(_d2_cfg(IMAGENET_C4))).load(str(tmp_path / "unknown.pkl"))

    # weights of another network: every backbone tensor has the wrong shape
    with pytest.raises(WrnDetError, match=r"100 of the 105 backbone tensors were not loaded .*\(shape mismatch"):
        WRNDetectionCheckpointer(build_model(_d2_cfg(["MODEL.WRN.NAME", "wide_resnet18_2", *C4]))).load(
            str(tmp_path / "w.pkl"))

    # a C4 model that stops at res3 (res4 as the box head) does not run res5: not an error
    short = ["MODEL.WRN.NAME", "wide_resnet18_1", *C4, "MODEL.WRN.OUT_FEATURES", "['res3']",
             "MODEL.RPN.IN_FEATURES", "['res3']", "MODEL.ROI_HEADS.IN_FEATURES", "['res3']"]
    ckpt = WRNDetectionCheckpointer(build_model(_d2_cfg(short)))
    ckpt.load(str(tmp_path / "w.pkl"))
    assert ckpt.last_report["missing"] == [] and ckpt.last_report["unused_stages"][0].startswith("res5.")


def test_engine_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  WRN:\n    NAMES: wide_resnet18_1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key 'MODEL.WRN.NAMES'"):
        build_config(str(bad), [])
    with pytest.raises(ConfigError, match="MODEL.WRN.NAMES"):
        build_config("", ["MODEL.WRN.NAMES", "x"])
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS file '.*nope.pkl' does not exist"):
        build_config("", ["MODEL.WEIGHTS", str(tmp_path / "nope.pkl")])
    with pytest.raises(ConfigError, match="Res5ROIHeads is detectron2's head"):
        build_model(_d2_cfg(["MODEL.WRN.NAME", "wide_resnet18_1", "MODEL.BACKBONE.NAME", "build_wrn_backbone",
                             "MODEL.ROI_HEADS.NAME", "Res5ROIHeads"]))
    cfg = build_config("", [])
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")  # unset = as the builtin engine
    assert cfg.MODEL.WRN.NAME == get_det_cfg().MODEL.WRN.NAME


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_freeze_at_and_frozen_bn(norm):
    from torchvision.ops import FrozenBatchNorm2d

    model = build_model(_d2_cfg([*IMAGENET_C4, "MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.WRN.NORM", norm]))
    trunk, head = model.backbone, model.roi_heads.res5
    # FREEZE_AT 2: the stem and res2 do not train; res3, res4 and the res5 head do
    for part, trains in ((trunk.stem, False), (trunk.res2, False), (trunk.res3, True), (trunk.res4, True), (head, True)):
        assert all(p.requires_grad == trains for p in part.parameters()), part
    frozen_bn = [m for m in trunk.res2.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen_bn and not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.res2.modules())
    later = [m for m in list(trunk.res3.modules()) + list(head.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    assert bool(later) == (norm == "BN")  # FrozenBN everywhere, or trained BN after the frozen stages
    # detectron2's optimizer only gets the parameters that train
    from detectron2.solver import build_optimizer

    opt = build_optimizer(_d2_cfg(IMAGENET_C4), model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) not in in_opt for p in trunk.stem.parameters())
