"""The networks where researchers already are: timm's registry, torch.hub, .safetensors and Hub folders of classifiers.

One small classification run (tools/train_cls.py, WRN-40-1, one epoch on CIFAR-format files written here) gives the
checkpoint that timm, torch.hub, the converter and the Hub folder take.
"""
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, load_tool, run_tool, tool_env

from wrn_det.engine.cli import cli_main
from wrn_det.models import build_model, count_parameters

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[hub]')")
pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e '.[hub]')")
pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (pip install -e '.[hub]')")

import wrn_det  # noqa: E402,F401  (registers the networks in timm's registry)

pytestmark = pytest.mark.usefixtures("one_thread_module")

NAME = "wrn_40_1"  # a canonical network (so in timm's registry), small enough to train here


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A WRN-40-1 trained for one epoch (with EMA weights) by tools/train_cls.py; returns the run folder."""
    from wrn_det.data.cls_synthetic import write_synthetic_cifar

    tmp = tmp_path_factory.mktemp("cls_run")
    root = write_synthetic_cifar(str(tmp / "data"), n_train=64, n_test=64, seed=5)
    out = tmp / "run"
    res = run_tool("train_cls", "MODEL.NAME", NAME, "DATASETS.NAME", "cifar10", "DATASETS.ROOT", root,
                   "DATASETS.VERIFY_CHECKSUMS", "False", "OUTPUT_DIR", str(out), "SEED", "0",
                   "SOLVER.EPOCHS", "1", "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "32", "TEST.IMS_PER_BATCH", "64",
                   "DATALOADER.NUM_WORKERS", "0", cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# --- timm ------------------------------------------------------------------------------------------------------


def test_timm_builds_our_networks_with_their_parameter_counts():
    ours = [n for n in timm.list_models() if n.startswith(("wrn_", "preact_resnet", "nin", "vgg_cifar"))]
    assert {"wrn_28_10", "wrn_16_8", "wrn_40_4", "preact_resnet164", "preact_resnet1001", "nin", "vgg_cifar"} <= set(ours)
    assert {"wide_resnet18_2", "wide_resnet34_2", "wide_resnet152_2"} <= set(timm.list_models("wide_resnet*"))
    for name, kwargs in (("wrn_28_10", {"num_classes": 100}), ("wide_resnet34_2", {}), ("nin", {"num_classes": 7})):
        model = timm.create_model(name, **kwargs)
        assert type(model) is type(build_model(name))
        assert count_parameters(model) == count_parameters(build_model(name, **kwargs)), name
    assert count_parameters(timm.create_model("wrn_28_10")) == 36_479_194  # the paper's WRN-28-10 (10 classes)
    # drop_rate is the paper's dropout inside the blocks of the CIFAR WRNs
    model = timm.create_model("wrn_16_8", drop_rate=0.3)
    assert model.stage2[1].dropout.p == 0.3
    with pytest.raises(ValueError, match="has no dropout"):
        timm.create_model("vgg_cifar", drop_rate=0.5)
    # timm's own names stay timm's: its wide_resnet50_2, whose weights ours loads as they are
    theirs = timm.create_model("wide_resnet50_2")
    assert type(theirs).__module__.startswith("timm.")
    mine = build_model("wide_resnet50_2")
    mine.load_state_dict(theirs.state_dict())
    x = _images(1, 64)
    assert torch.allclose(mine.eval()(x), theirs.eval()(x), atol=1e-4)


def test_pretrained_cfg_has_the_recipe():
    cfg = timm.create_model("wrn_28_10").pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10 and cfg["classifier"] == "fc"
    assert cfg["mean"] == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255), abs=1e-6)  # Base-CIFAR.yaml
    assert cfg["std"] == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255), abs=1e-6)
    data = timm.data.resolve_model_data_config(timm.create_model("wide_resnet34_2"))
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875 and data["interpolation"] == "bilinear"
    assert data["mean"] == pytest.approx((0.485, 0.456, 0.406))  # imagenet_wide_resnet50_2.yaml's 123.675 / 255 ...
    assert not timm.is_model_pretrained("wrn_28_10")  # no weights are published: pretrained needs a file
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("wrn_28_10", pretrained=True)


@pytest.mark.parametrize("name, indices, size", [("wide_resnet34_2", (1, 2, 3, 4), 64), ("wrn_16_4", None, 32),
                                                 ("vgg_cifar", (2, 5), 32)])
def test_features_only_gives_the_stage_maps_with_their_reductions(name, indices, size):
    kwargs = {} if indices is None else {"out_indices": indices}
    feats = timm.create_model(name, features_only=True, **kwargs).eval()
    net = build_model(name).eval()
    info = feats.feature_info
    x = _images(2, size)
    outs = feats(x)
    assert len(outs) == len(info.out_indices) == (len(net.stage_names) + 1 if indices is None else len(indices))
    for out, ch, red in zip(outs, info.channels(), info.reduction()):
        assert out.shape == (2, ch, size // red, size // red)
    if name == "wide_resnet34_2":
        assert info.channels() == [128, 256, 512, 1024] and info.reduction() == [4, 8, 16, 32]
        assert info.module_name() == ["layer1", "layer2", "layer3", "layer4"]
    # the same maps as the network's own forward_features, with the same weights
    result = net.load_state_dict(feats.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("fc.") for k in result.missing_keys)
    stages = list(net.forward_features(x).values())
    picked = [stages[i - 1] for i in info.out_indices if i > 0]
    assert all(torch.equal(a, b) for a, b in zip(outs[-len(picked):], picked))


def test_checkpoints_load_through_pretrained_cfg_overlay(cls_run, tmp_path):
    """A tools/train_cls.py checkpoint, its .safetensors and its converted backbone give the trained network's outputs."""
    from wrn_det.models import load_classifier_weights

    ref = build_model(NAME)
    load_classifier_weights(ref, str(cls_run / "model_final.pth"))
    ref.eval()
    x = _images()
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(cls_run / "model_final.pth")))
    assert torch.equal(model.eval()(x), ref(x))
    # the same through .safetensors (tools/export_model.py) and the converted backbone (tools/convert_weights.py)
    export = load_tool("export_model")
    assert cli_main(export.main, export.parse_args(["--config-file", str(cls_run / "config.yaml"), "--format",
                                                    "safetensors", "--output", str(tmp_path / "w.safetensors"),
                                                    "MODEL.WEIGHTS", str(cls_run / "model_final.pth")])) == 0
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))
    assert torch.equal(model.eval()(x), ref(x))
    convert = load_tool("convert_weights")
    assert cli_main(convert.main, convert.parse_args([str(cls_run / "model_final.pth"), str(tmp_path / "bb.pth")])) == 0
    feats = timm.create_model(NAME, pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "bb.pth"))).eval()
    assert all(torch.equal(a, b) for a, b in zip(feats(x)[1:], ref.forward_features(x).values()))
    # a file of another network is one clear error naming it
    with pytest.raises(Exception, match="does not fit"):
        timm.create_model("wrn_16_4", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "bb.pth")))


@pytest.mark.slow
def test_registration_follows_timm_whichever_is_imported_first(tmp_path):
    code = ("import sys, json\n"
            "first = sys.argv[1]\n"
            "if first == 'wrn_det':\n"
            "    import wrn_det\n"
            "    light = [m for m in ('torch', 'timm', 'wrn_det.models') if m in sys.modules]\n"
            "    import timm\n"
            "else:\n"
            "    import timm, wrn_det\n"
            "    light = []\n"
            "print(json.dumps({'light': light, 'ours': timm.is_model('wrn_28_10') and timm.is_model('vgg_cifar'),\n"
            "                  'theirs': timm.is_model_pretrained('wide_resnet50_2')}))\n")  # timm's, with its weights
    for first in ("wrn_det", "timm"):
        r = subprocess.run([sys.executable, "-c", code, first], env=tool_env(), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"light": [], "ours": True, "theirs": True}, first
    # without timm nothing changes: wrn_det imports, and so do its networks
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['timm'] = None\nimport wrn_det, wrn_det.models\n"
                        "print(wrn_det.models.build_model('wrn_16_4').num_classes)"], env=tool_env(),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "10", r.stderr[-2000:]


# --- torch.hub -------------------------------------------------------------------------------------------------


def test_torch_hub_loads_every_network_from_the_repository(cls_run):
    model = torch.hub.load(str(REPO), "wrn_28_10", source="local", num_classes=100, dropout=0.3)
    assert count_parameters(model) == count_parameters(build_model("wrn_28_10", num_classes=100))
    assert model.stage1[0].dropout.p == 0.3
    hub = torch.hub.load(str(REPO), "wide_resnet34_2", source="local")
    assert count_parameters(hub) == count_parameters(build_model("wide_resnet34_2")) == 86_036_008
    trained = torch.hub.load(str(REPO), NAME, source="local", weights=str(cls_run / "model_final.pth"))
    ref = build_model(NAME)
    from wrn_det.models import load_classifier_weights

    load_classifier_weights(ref, str(cls_run / "model_final.pth"))
    x = _images()
    assert torch.equal(trained.eval()(x), ref.eval()(x))
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    from wrn_det.models.registry import CANONICAL_MODELS

    assert all(callable(getattr(hubconf, n)) for n in CANONICAL_MODELS) and callable(hubconf.predictor)
    assert all(importlib.util.find_spec(d) for d in hubconf.dependencies)


# --- safetensors and Hub folders of classifiers ------------------------------------------------------------------


def test_safetensors_weights_give_the_same_evaluation_as_the_pth(cls_run, tmp_path):
    export = load_tool("export_model")
    weights = tmp_path / "model_final.safetensors"
    assert cli_main(export.main, export.parse_args(["--config-file", str(cls_run / "config.yaml"), "--format",
                                                    "safetensors", "--output", str(weights),
                                                    "MODEL.WEIGHTS", str(cls_run / "model_final.pth")])) == 0
    results = {}
    for name, path in (("pth", cls_run / "model_final.pth"), ("safetensors", weights)):
        out = tmp_path / name
        res = run_tool("train_cls", "--config-file", str(cls_run / "config.yaml"), "--eval-only", "MODEL.WEIGHTS",
                       str(path), "OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", "0", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        results[name] = json.loads((out / "eval_metrics.json").read_text())
    for key in ("test_loss", "test_top1_err", "test_top5_err"):
        assert results["safetensors"][key] == results["pth"][key], key


def test_classifier_hub_folder_round_trip(cls_run, tmp_path):
    from huggingface_hub import ModelCard

    from wrn_det.models import from_pretrained, load_classifier_weights

    export = load_tool("export_model")
    folder = tmp_path / "hub" / "wrn_40_1_cifar10"
    assert cli_main(export.main, export.parse_args(["--config-file", str(cls_run / "config.yaml"), "--format", "hub",
                                                    "--output", str(folder), "--license", "mit",
                                                    "MODEL.WEIGHTS", str(cls_run / "model_final.pth")])) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.yaml", "model.safetensors"]
    card = ModelCard.load(str(folder / "README.md"))
    data = card.data.to_dict()
    assert data["library_name"] == "wrn-det" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == "mit" and data["datasets"] == ["uoft-cs/cifar10"] and data["metrics"] == ["accuracy"]
    last = json.loads((cls_run / "metrics.json").read_text().splitlines()[-1])
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == round(100 - last["test_top1_err"], 2)
    assert f"| test_top1_err | {last['test_top1_err']:.4g} |" in card.text and "train_cls" in card.text
    assert "Zagoruyko" in card.text and "@inproceedings" in card.text
    model = from_pretrained(str(folder))
    ref = build_model(NAME)
    load_classifier_weights(ref, str(cls_run / "model_final.pth"))
    x = _images()
    assert not model.training and torch.equal(model(x), ref.eval()(x))
    assert model.wrn_det_config["MODEL"]["NAME"] == NAME
