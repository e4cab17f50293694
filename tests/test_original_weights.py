"""The authors' own weight files convert: functional-zoo's WRN-50-2 export and their PyTorch code's checkpoints.

Nothing can be downloaded here, so each test writes a file in the published layout itself:
the export from a random torchvision ``wide_resnet50_2`` whose random BatchNorm statistics
are folded into the convolutions (as functional-zoo did), the PyTorch-port checkpoint as
``pytorch/resnet.py`` + ``pytorch/main.py`` build and save it. The references are those
layouts' own forward functions (functional-zoo's ``define_model``, the port's ``f``).
"""
import os
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import load_tool
from torch import nn

from wrn_det.models.norm import convert_norm
from wrn_det.engine.cli import cli_main
from wrn_det.models import build_model
from wrn_det.models.convert import read_classifier_state, read_d2_pickle

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _convert_main():
    tool = load_tool("convert_weights")
    return lambda argv: tool.main(tool.parse_args(argv))


def _close(a, b, what):
    # within 1e-5 of the largest magnitude: random BatchNorm statistics make these large
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-5 * scale, (what, (a - b).abs().max().item(), scale)


def _close_outputs(net, x, ref_feats, ref_logits):
    # the converted network in eval mode: each stage output and the logits as the layout's own forward gives them
    net.eval()
    with torch.no_grad():
        feats = net.forward_features(x)
        logits = net(x)
    for (name, f), ref in zip(feats.items(), ref_feats):
        _close(f, ref, name)
    _close(logits, ref_logits, "logits")


# ------------------------------------------------------------------ functional-zoo ----

def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (conv.weight * scale[:, None, None, None]).detach(), (bn.bias - bn.running_mean * scale).detach()


def _functional_zoo_export(net) -> "OrderedDict[str, torch.Tensor]":
    """Return the export of ``net`` (torchvision wide_resnet50_2) in functional-zoo's layout, BN folded."""
    params = OrderedDict()
    params["conv0.weight"], params["conv0.bias"] = _fold(net.conv1, net.bn1)
    for g, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        for b, block in enumerate(layer):
            base = f"group{g}.block{b}"
            for i, (conv, bn) in enumerate(((block.conv1, block.bn1), (block.conv2, block.bn2),
                                            (block.conv3, block.bn3))):
                params[f"{base}.conv{i}.weight"], params[f"{base}.conv{i}.bias"] = _fold(conv, bn)
            if block.downsample is not None:
                params[f"{base}.conv_dim.weight"], params[f"{base}.conv_dim.bias"] = _fold(*block.downsample)
    params["fc.weight"], params["fc.bias"] = net.fc.weight.detach(), net.fc.bias.detach()
    return params


def _functional_zoo_forward(params, x):
    """functional-zoo's define_model (wide-resnet-50-2-export.ipynb); global pooling for any input size."""
    def conv2d(inp, base, stride=1, pad=0):
        return F.conv2d(inp, params[base + ".weight"], params[base + ".bias"], stride, pad)

    def group(o, base, stride, n):
        for i in range(n):
            b = f"{base}.block{i}.conv"
            x = o
            o = F.relu(conv2d(x, b + "0"))
            o = F.relu(conv2d(o, b + "1", stride=stride if i == 0 else 1, pad=1))
            o = conv2d(o, b + "2")
            o = o + (conv2d(x, b + "_dim", stride=stride) if i == 0 else x)
            o = F.relu(o)
        return o

    blocks = [sum(re.match(rf"group{j}\.block\d+\.conv0\.weight", k) is not None for k in params) for j in range(4)]
    o = F.max_pool2d(F.relu(conv2d(x, "conv0", 2, 3)), 3, 2, 1)
    feats = []
    for g, stride in enumerate((1, 2, 2, 2)):
        o = group(o, f"group{g}", stride, blocks[g])
        feats.append(o)
    logits = F.linear(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1), params["fc.weight"], params["fc.bias"])
    return feats, logits


@pytest.fixture(scope="module")
def zoo_export(tmp_path_factory):
    """A random wide_resnet50_2 with random BatchNorm statistics, exported as functional-zoo did."""
    torch.manual_seed(0)
    net = torchvision.models.wide_resnet50_2()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) * 0.3 + 0.2
            m.bias.data = torch.randn(c, generator=g) * 0.5
            m.running_mean = torch.randn(c, generator=g) * 0.5
            m.running_var = torch.rand(c, generator=g) * 0.2 + 0.02
    params = _functional_zoo_export(net)
    path = tmp_path_factory.mktemp("zoo") / "wide-resnet-50-2-export-5ae25d50.pth"
    torch.save(params, path, _use_new_zipfile_serialization=False)  # the published file predates the zip format
    return path, params


def test_functional_zoo_export_converts_exactly(zoo_export, tmp_path, capsys):
    path, params = zoo_export
    # the published file's figures: 108 tensors, 68,849,128 values
    assert len(params) == 108 and sum(v.numel() for v in params.values()) == 68_849_128
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_feats, ref_logits = _functional_zoo_forward(params, x)
    assert ref_feats[-1].abs().max() > 1000  # large features: a loose tolerance would hide nothing

    state, info = read_classifier_state(str(path))
    assert info["kind"] == "functional_zoo" and info["model_name"] == "wide_resnet50_2"
    assert any("frozen BatchNorm" in w for w in info["warnings"])
    net = build_model("wide_resnet50_2")
    net.load_state_dict(state, strict=True)
    assert torch.all(net.layer2[0].bn2.weight == 1) and torch.all(net.layer2[0].bn2.running_mean == 0)
    _close_outputs(net, x, ref_feats, ref_logits)

    # the tool writes both engines' files and warns about the folded BatchNorm
    capsys.readouterr()
    assert cli_main(_convert_main(), [str(path), str(tmp_path / "wrn50_2")]) == 0
    out = capsys.readouterr()
    assert "wide_resnet50_2" in out.out and "warning:" in out.err and "FrozenBN" in out.err
    builtin = torch.load(tmp_path / "wrn50_2.pth", weights_only=True)
    assert builtin["wrn_det"]["model_name"] == "wide_resnet50_2"
    assert builtin["wrn_det"]["source_kind"] == "functional_zoo"
    fresh = build_model("wide_resnet50_2")
    res = fresh.load_state_dict(builtin["model"], strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    # the frozen BatchNorm of detection (torchvision's FrozenBatchNorm2d) gives the export's features too
    convert_norm(fresh, "FrozenBN")
    with torch.no_grad():
        frozen = fresh.eval().forward_features(x)
    for (name, f), ref in zip(frozen.items(), ref_feats):
        _close(f, ref, name)
    d2 = read_d2_pickle(str(tmp_path / "wrn50_2.pkl"))["model"]
    assert torch.equal(torch.from_numpy(d2["res3.0.conv2.weight"]), params["group1.block0.conv1.weight"])
    assert torch.equal(torch.from_numpy(d2["res3.0.bn2.bias"]), params["group1.block0.conv1.bias"])
    assert torch.equal(torch.from_numpy(d2["stem.bn1.running_var"]), torch.full((64,), 1 - 1e-5))


def _save_tiny(params, path):
    # expanded views keep the shapes while the file holds one number per tensor
    torch.save({k: (v.reshape(-1)[:1].expand(v.shape) if torch.is_tensor(v) else v) for k, v in params.items()}, path)


def _one_line_error(argv, capsys):
    capsys.readouterr()
    assert cli_main(_convert_main(), argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_functional_zoo_like_files_with_a_wrong_tensor_give_one_line(zoo_export, tmp_path, capsys):
    _, params = zoo_export
    missing = OrderedDict(params)
    del missing["group2.block3.conv1.bias"]
    extra = OrderedDict(params, **{"fc2.weight": torch.zeros(3, 3)})
    shape = OrderedDict(params, **{"group1.block0.conv1.weight": torch.zeros(256, 256, 1, 1)})
    nan = OrderedDict(params, **{"group0.block1.conv2.weight": torch.full((256, 128, 1, 1), float("nan"))})
    text = OrderedDict(params, **{"fc.bias": "1000 classes"})
    short = OrderedDict((k, v) for k, v in params.items() if not k.startswith("group2.block5."))
    cases = [(missing, "lacks 1 of its 108 tensors: group2.block3.conv1.bias"),
             (extra, "fc2.weight"),
             (shape, "group1.block0.conv1.weight has shape (256, 256, 1, 1); expected (256, 256, 3, 3)"),
             (nan, "group0.block1.conv2.weight holds NaN"),
             (text, "fc.bias is a str"),
             (short, "blocks (3, 4, 5, 3)")]
    for i, (bad, expected) in enumerate(cases):
        path = tmp_path / f"zoo{i}.pth"
        _save_tiny(bad, path)
        err = _one_line_error([str(path), str(tmp_path / f"out{i}")], capsys)
        assert "functional-zoo" in err and expected in err, err
    assert "no EMA weights" in _one_line_error([str(tmp_path / "zoo1.pth"), str(tmp_path / "o"), "--ema"], capsys)
    # the real export under another network's name: the error says what the file is
    err = _one_line_error([str(zoo_export[0]), str(tmp_path / "o"), "--model", "wrn_28_10"], capsys)
    assert "'wide_resnet50_2'" in err and "wrn_28_10" in err
    assert not [p for p in os.listdir(tmp_path) if not p.startswith("zoo")]  # nothing written


# ------------------------------------------------------------ the authors' PyTorch code ----

def _port_params(depth, width, num_classes, seed):
    """Random params in pytorch/resnet.py's layout, with random BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    n = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]

    def conv(ni, no, k):
        return torch.randn(no, ni, k, k, generator=g) * (2.0 / (ni * k * k)) ** 0.5  # kaiming_normal_, fan-in

    def bn(c):
        return {"weight": torch.rand(c, generator=g) * 0.5 + 0.5, "bias": torch.randn(c, generator=g) * 0.5,
                "running_mean": torch.randn(c, generator=g) * 0.5,
                "running_var": torch.rand(c, generator=g) * 0.1 + 0.02}

    flat = OrderedDict(conv0=conv(3, 16, 3))
    ni = 16
    for gi, no in enumerate(widths):
        for b in range(n):
            base = f"group{gi}.block{b}."
            i = ni if b == 0 else no
            flat[base + "conv0"] = conv(i, no, 3)
            flat[base + "conv1"] = conv(no, no, 3)
            flat.update({base + "bn0." + k: v for k, v in bn(i).items()})
            flat.update({base + "bn1." + k: v for k, v in bn(no).items()})
            if i != no:
                flat[base + "convdim"] = conv(i, no, 1)
        ni = no
    flat.update({"bn." + k: v for k, v in bn(widths[2]).items()})
    flat["fc.weight"] = torch.randn(num_classes, widths[2], generator=g) * 0.05
    flat["fc.bias"] = torch.zeros(num_classes)
    return flat, n


def _port_forward(params, x, n):
    """pytorch/resnet.py's f in eval mode; returns the group outputs (the last one activated) and logits."""
    def bn(t, base):
        return F.batch_norm(t, params[base + ".running_mean"], params[base + ".running_var"],
                            params[base + ".weight"], params[base + ".bias"], False)

    def block(x, base, stride):
        o1 = F.relu(bn(x, base + ".bn0"))
        y = F.conv2d(o1, params[base + ".conv0"], stride=stride, padding=1)
        o2 = F.relu(bn(y, base + ".bn1"))
        z = F.conv2d(o2, params[base + ".conv1"], stride=1, padding=1)
        return z + (F.conv2d(o1, params[base + ".convdim"], stride=stride) if base + ".convdim" in params else x)

    o = F.conv2d(x, params["conv0"], padding=1)
    feats = []
    for g, stride in enumerate((1, 2, 2)):
        for i in range(n):
            o = block(o, f"group{g}.block{i}", stride if i == 0 else 1)
        feats.append(o)
    feats[-1] = F.relu(bn(feats[-1], "bn"))
    logits = F.linear(F.avg_pool2d(feats[-1], 8, 1, 0).flatten(1), params["fc.weight"], params["fc.bias"])
    return feats, logits


def test_pytorch_port_checkpoint_converts_to_wrn_16_4(tmp_path, capsys):
    params, n = _port_params(16, 4, 10, seed=3)
    path = tmp_path / "model.pt7"
    # as pytorch/main.py saves it: params, epoch, the optimizer's state dict
    torch.save({"params": params, "epoch": 7,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.02, "momentum": 0.9, "params": [0, 1]}]}}, path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_feats, ref_logits = _port_forward(params, x, n)
    assert ref_feats[-1].abs().max() > 100

    state, info = read_classifier_state(str(path))
    assert info["kind"] == "wrn_pytorch" and info["model_name"] == "wrn_16_4" and not info["warnings"]
    net = build_model("wrn_16_4")
    net.load_state_dict(state, strict=True)
    _close_outputs(net, x, ref_feats, ref_logits)

    capsys.readouterr()
    assert cli_main(_convert_main(), [str(path), str(tmp_path / "wrn_16_4.pth")]) == 0
    out = capsys.readouterr()
    assert "wrn_16_4" in out.out and "warning" not in out.err
    builtin = torch.load(tmp_path / "wrn_16_4.pth", weights_only=True)["model"]
    assert torch.equal(builtin["stage2.0.shortcut.weight"], params["group1.block0.convdim"])
    assert torch.equal(builtin["stage3.post_act.bn.running_var"], params["bn.running_var"])
    # a CIFAR-100 run of the same code: the classifier has 100 rows, the backbone converts alike
    params100, _ = _port_params(16, 4, 100, seed=3)
    torch.save({"params": params100, "epoch": 200}, tmp_path / "cifar100.pt7")
    state, info = read_classifier_state(str(tmp_path / "cifar100.pt7"))
    assert info["model_name"] == "wrn_16_4" and state["fc.weight"].shape == (100, 256)
    assert cli_main(_convert_main(), [str(tmp_path / "cifar100.pt7"), str(tmp_path / "wrn_16_4_c100.pth")]) == 0


def test_pytorch_port_like_files_with_a_wrong_tensor_give_one_line(tmp_path, capsys):
    params, _ = _port_params(16, 4, 10, seed=5)
    missing = OrderedDict((k, v) for k, v in params.items() if k != "group1.block1.bn0.running_var")
    shape = OrderedDict(params, **{"group1.block0.convdim": torch.zeros(128, 64, 3, 3)})
    extra = OrderedDict(params, **{"group0.block0.conv2": torch.zeros(64, 64, 3, 3)})
    odd, _ = _port_params(16, 2, 10, seed=6)
    odd["group0.block0.conv0"] = torch.zeros(40, 16, 3, 3)  # --width 2.5: not an integer widening factor
    cases = [(missing, "lacks 1 of its"), (shape, "group1.block0.convdim has shape (128, 64, 3, 3)"),
             (extra, "group0.block0.conv2"), (odd, "40 output channels")]
    for i, (bad, expected) in enumerate(cases):
        path = tmp_path / f"port{i}.pt7"
        _save_tiny({"params": bad, "epoch": 1}, path)
        err = _one_line_error([str(path), str(tmp_path / f"out{i}")], capsys)
        assert "PyTorch WRN code" in err and expected in err, err
    assert not [p for p in os.listdir(tmp_path) if not p.startswith("port")]
