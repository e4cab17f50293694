"""Weight conversion (tools/convert_weights.py) and the pretrain -> convert -> detect path; no detectron2 needed.

The end-to-end test pretrains a small WRN with tools/train_cls.py on CIFAR-format files it
writes, converts the checkpoint (plain and EMA weights) and starts builtin-engine
detectors from it through the engine's MODEL.WEIGHTS loader.
"""
import os
import pickle

import pytest
import torch
import torchvision

from helpers import load_tool, run_tool

from wrn_det.data.cls_synthetic import write_synthetic_cifar
from wrn_det.detection.config import get_det_cfg
from wrn_det.detection.modeling import build_detector
from wrn_det.engine.config import load_config
from wrn_det.engine.cli import cli_main
from wrn_det.engine.errors import WrnDetError
from wrn_det.models import build_model
from wrn_det.models.convert import (
    ConversionError,
    backbone_key_map,
    extract_backbone,
    guess_network,
    read_classifier_state,
    read_d2_pickle,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _convert_main():
    tool = load_tool("convert_weights")
    return lambda argv: tool.main(tool.parse_args(argv))


def _run_convert(*args):
    return run_tool("convert_weights", *args, timeout=120)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A wrn_10_1 pretrained for one epoch with EMA weights; returns the run folder."""
    tmp = tmp_path_factory.mktemp("pretrain")
    root = write_synthetic_cifar(str(tmp / "data"), n_train=128, n_test=64, seed=3)
    out = tmp / "run"
    res = run_tool("train_cls", "MODEL.NAME", "wrn_10_1", "DATASETS.NAME", "cifar10", "DATASETS.ROOT", root,
                   "DATASETS.VERIFY_CHECKSUMS", "False", "OUTPUT_DIR", str(out), "SEED", "0",
                   "SOLVER.EPOCHS", "1", "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "64", "TEST.IMS_PER_BATCH", "64",
                   "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5", "DATALOADER.NUM_WORKERS", "0", cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _builtin_detector(weights: str, c4: bool):
    """Build a builtin-engine wrn_10_1 detector and load MODEL.WEIGHTS through the engine's own loader."""
    from wrn_det.detection.weights import load_detector_weights

    if c4:
        opts = ["MODEL.BACKBONE.NAME", "build_wrn_backbone", "MODEL.ROI_HEADS.NAME", "WRNRes5ROIHeads",
                "MODEL.WRN.OUT_FEATURES", "['stage2']", "MODEL.RPN.IN_FEATURES", "['stage2']",
                "MODEL.ROI_HEADS.IN_FEATURES", "['stage2']"]
    else:
        opts = ["MODEL.BACKBONE.NAME", "build_wrn_fpn_backbone", "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
                "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_FC", "2",
                "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7",
                "MODEL.WRN.OUT_FEATURES", "['stage1', 'stage2', 'stage3']",
                "MODEL.FPN.IN_FEATURES", "['stage1', 'stage2', 'stage3']",
                "MODEL.RPN.IN_FEATURES", "['p0', 'p1', 'p2', 'p3']", "MODEL.ROI_HEADS.IN_FEATURES", "['p0', 'p1', 'p2']",
                "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64]]"]
    cfg = load_config(get_det_cfg(), None, ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.DEVICE", "cpu",
                                             "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.WEIGHTS", weights, *opts])
    model = build_detector(cfg)
    load_detector_weights(model, cfg.MODEL.WEIGHTS)
    return model


def test_pretrain_convert_detect_loads_every_backbone_parameter(pretrained, tmp_path):
    # the plain weights into both formats, the EMA weights into the builtin format
    res = _run_convert(pretrained / "model_best.pth", tmp_path / "wrn")
    assert res.returncode == 0, res.stderr
    assert "wrn_10_1" in res.stdout and "fc.weight" in res.stdout  # the name came from the checkpoint; fc left out
    assert _convert_main()([str(pretrained / "model_final.pth"), str(tmp_path / "wrn_ema.pth"), "--ema"]) == 0

    best = torch.load(pretrained / "model_best.pth", weights_only=True)
    final = torch.load(pretrained / "model_final.pth", weights_only=True)
    keymap = backbone_key_map(build_model("wrn_10_1"))
    weights = [k for k in keymap if not k.endswith("num_batches_tracked")]
    params = [k for k, _ in build_model("wrn_10_1").named_parameters() if k in keymap]
    assert len(params) > 20 and "stem.weight" in params
    # the EMA (decay 0.5) differs from the raw weights, so the two checks below are distinct
    assert any(not torch.equal(final["model"][k], final["ema"][k]) for k in params)

    for weights_file, source in ((tmp_path / "wrn.pth", best["model"]), (tmp_path / "wrn_ema.pth", final["ema"])):
        for c4 in (True, False):
            model = _builtin_detector(str(weights_file), c4=c4)
            net = model.backbone.net if c4 else model.backbone.bottom_up.net
            loaded = net.state_dict()
            for k in weights:  # every parameter and BN statistic of the stem and the stages
                assert torch.equal(loaded[k], source[k].float()), (weights_file.name, c4, k)
            if c4:  # the box head runs the classifier's stage3
                head = model.roi_heads.box_head.res5.state_dict()
                assert torch.equal(head["0.conv1.weight"], source["stage3.0.conv1.weight"])

    # the detectron2 pickle (read with the restricted unpickler) holds the same numbers under protocol keys
    d2 = read_d2_pickle(str(tmp_path / "wrn.pkl"))
    assert d2["__author__"] == "wrn_det" and d2["matching_heuristics"] is True
    assert set(d2["model"]) == {keymap[k] for k in weights}
    for k in weights:
        assert torch.equal(torch.from_numpy(d2["model"][keymap[k]]), best["model"][k].float()), k


def test_torchvision_and_timm_layouts(tmp_path):
    # torchvision's wide_resnet50_2 (random weights: nothing can be downloaded here) is recognised by its layout
    tv = torchvision.models.wide_resnet50_2().state_dict()
    assert guess_network(tv) == "wide_resnet50_2"
    backbone, _, dropped = extract_backbone(tv, "wide_resnet50_2")
    assert dropped == ["fc.weight", "fc.bias"]
    assert all(torch.equal(v, tv[k]) for k, v in backbone.items())
    assert len(backbone) == sum(1 for k in tv if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    with torch.device("meta"):
        assert guess_network(torchvision.models.wide_resnet101_2().state_dict()) == "wide_resnet101_2"

    # a timm training checkpoint: DataParallel prefixes, raw and EMA weights (timm's ResNet keys are torchvision's)
    raw, ema = torchvision.models.resnet18().state_dict(), torchvision.models.resnet18().state_dict()
    src = tmp_path / "timm_checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in raw.items()},
                "state_dict_ema": {"module." + k: v for k, v in ema.items()}}, src)
    state, info = read_classifier_state(str(src), use_ema=True)
    assert info["kind"] == "timm" and info["ema"] and torch.equal(state["conv1.weight"], ema["conv1.weight"])
    assert _convert_main()([str(src), str(tmp_path / "r18"), "--ema"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for out in ("r18.pth", "r18.pkl"):  # ordinary file permissions, not the private ones of a temporary file
        assert (tmp_path / out).stat().st_mode & 0o777 == 0o666 & ~umask, out
    builtin = torch.load(tmp_path / "r18.pth", weights_only=True)
    assert builtin["wrn_det"]["model_name"] == "wide_resnet18_1" and builtin["wrn_det"]["ema"] is True
    assert torch.equal(builtin["model"]["layer4.1.bn2.running_var"], ema["layer4.1.bn2.running_var"])
    d2 = read_d2_pickle(str(tmp_path / "r18.pkl"))
    assert torch.equal(torch.from_numpy(d2["model"]["res5.1.bn2.running_var"]), ema["layer4.1.bn2.running_var"])
    assert torch.equal(torch.from_numpy(d2["model"]["stem.conv1.weight"]), ema["conv1.weight"])


def test_compiled_classification_checkpoint_loads_as_detection_weights_and_converts(pretrained, tmp_path):
    # a classifier saved from its torch.compile wrapper: every key starts with _orig_mod.
    net = build_model("wrn_10_1")
    net.load_state_dict(torch.load(pretrained / "model_best.pth", weights_only=True)["model"])
    compiled = torch.compile(net)  # compiles lazily: nothing runs here
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    torch.save({"model": state}, tmp_path / "compiled.pth")
    for c4 in (True, False):
        model = _builtin_detector(str(tmp_path / "compiled.pth"), c4=c4)
        got = (model.backbone.net if c4 else model.backbone.bottom_up.net).state_dict()
        checked = [k for k in backbone_key_map(net) if k in got]
        assert len(checked) > 30
        for k in checked:  # every parameter and BN statistic the detector holds
            assert torch.equal(got[k], net.state_dict()[k]), k
    assert _convert_main()([str(tmp_path / "compiled.pth"), str(tmp_path / "wrn"), "--model", "wrn_10_1"]) == 0
    converted = torch.load(tmp_path / "wrn.pth", weights_only=True)["model"]
    assert torch.equal(converted["stage3.0.conv1.weight"], net.state_dict()["stage3.0.conv1.weight"])


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), r18)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    extra = tmp_path / "extra.pth"
    torch.save({**torchvision.models.resnet18().state_dict(), "layer5.0.conv1.weight": torch.zeros(1)}, extra)
    cases = [
        ([str(tmp_path / "missing.pth"), str(tmp_path / "o1")], "does not exist"),
        ([str(junk), str(tmp_path / "o2")], "junk.pth"),
        ([str(r18), str(tmp_path / "o3"), "--model", "wide_resnet34_1"], "pass --model wide_resnet18_1"),
        ([str(r18), str(tmp_path / "o4"), "--ema"], "no EMA weights"),
        ([str(r18), str(tmp_path / "o5.onnx")], "expected a .pth"),
        ([str(extra), str(tmp_path / "o6")], "layer5.0.conv1.weight"),
        ([str(r18), str(tmp_path / "o7"), "--model", "wrn_7_1"], "wrn_7_1"),
    ]
    main = _convert_main()
    for argv, expected in cases:
        assert cli_main(main, argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["extra.pth", "junk.pth", "resnet18.pth"]  # nothing half-written
    # the real command line gives the same: status 2, one line
    res = _run_convert(tmp_path / "missing.pth", tmp_path / "o8")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": Evil()}, "__author__": "x"}))
    with pytest.raises(ConversionError, match="refused to load global (posix|nt|os).system"):
        read_d2_pickle(str(path))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(WrnDetError, match="does not exist"):
        read_d2_pickle(str(tmp_path / "nope.pkl"))


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_builtin_engine_rejects_incomplete_backbone_weights(pretrained, tmp_path, change):
    assert _convert_main()([str(pretrained / "model_best.pth"), str(tmp_path / "wrn.pth")]) == 0
    ckpt = torch.load(tmp_path / "wrn.pth", weights_only=True)
    if change == "missing":
        del ckpt["model"]["stage2.0.conv1.weight"]
    else:
        ckpt["model"]["stage4.0.conv1.weight"] = ckpt["model"]["stage3.0.conv1.weight"]
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(WrnDetError, match="stage2.0.conv1.weight" if change == "missing" else "stage4.0.conv1.weight"):
        _builtin_detector(str(tmp_path / "bad.pth"), c4=True)


def test_safetensors_in_and_out_of_the_converter(pretrained, tmp_path):
    """--format safetensors writes the backbone without code; it loads as the .pth does, and is read as input too."""
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e '.[hub]')")
    from wrn_det.engine.weights_file import read_weights_file

    main = _convert_main()
    assert main([str(pretrained / "model_best.pth"), str(tmp_path / "wrn"), "--format", "pth", "safetensors"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrn.pth", "wrn.safetensors"]
    wf = read_weights_file(str(tmp_path / "wrn.safetensors"))
    assert (wf.kind, wf.model_name, wf.contents["wrn_det"]["format"]) == ("backbone", "wrn_10_1", "backbone")
    pth = torch.load(tmp_path / "wrn.pth", weights_only=True)["model"]
    assert set(wf.model) == set(pth) and all(torch.equal(wf.model[k], v) for k, v in pth.items())
    for c4 in (True, False):
        a = _builtin_detector(str(tmp_path / "wrn.pth"), c4=c4).state_dict()
        b = _builtin_detector(str(tmp_path / "wrn.safetensors"), c4=c4).state_dict()
        net = "backbone.net." if c4 else "backbone.bottom_up.net."
        loaded = [k for k in a if k.startswith(net) and k[len(net):] in pth]
        assert len(loaded) == len(pth) and all(torch.equal(a[k], b[k]) for k in loaded)
    # a .safetensors as input (a Hub or timm file): the same backbone again, and into a detectron2 pickle
    assert main([str(tmp_path / "wrn.safetensors"), str(tmp_path / "again.safetensors")]) == 0
    again = read_weights_file(str(tmp_path / "again.safetensors")).model
    assert all(torch.equal(again[k], v) for k, v in pth.items())
    assert main([str(tmp_path / "wrn.safetensors"), str(tmp_path / "d2.pkl")]) == 0
    assert read_d2_pickle(str(tmp_path / "d2.pkl"))["wrn_det"]["model_name"] == "wrn_10_1"
    with pytest.raises(WrnDetError, match="--format asks for safetensors"):
        main([str(pretrained / "model_best.pth"), str(tmp_path / "x.pth"), "--format", "safetensors"])
