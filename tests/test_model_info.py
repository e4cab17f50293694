"""Tests of tools/model_info.py: parameter and MAC figures, JSON output, errors."""
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, load_tool

from wrn_det.engine import cli_main

SCRIPT = REPO / "tools" / "model_info.py"


def _main(argv):
    """Return the exit status of ``tools/model_info.py ARGV`` run in this process (its output stays in capsys)."""
    tool = load_tool("model_info")
    return cli_main(tool.main, tool.parse_args(argv))


def _run(*args, cwd):
    # Run from a foreign folder without installing: the script finds the package itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_for_wrn_28_10(tmp_path):
    proc = _run("wrn_28_10", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["name"] == "wrn_28_10"
    assert info["params"] == 36_479_194
    assert abs(info["gmacs"] - 5.25) / 5.25 < 0.02
    assert info["input_size"] == 32
    assert info["features"]["stage3"] == {"channels": 640, "stride": 4, "shape": [640, 8, 8]}


def test_cli_bad_name_is_one_line_and_exit_2(tmp_path):
    proc = _run("wrn_foo", "--json", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "wrn_foo" in lines[0] and "wrn_28_10" in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("args,params", [
    # Parameter counts do not depend on the input, so small inputs keep these quick.
    (["wrn_28_10", "--num-classes", "100", "--input-size", "8"], 36_536_884),
    (["wrn_40_4", "--input-size", "8"], 8_949_210),
    (["wrn_16_8", "--input-size", "8"], 10_961_370),
    (["wide_resnet34_2", "--num-classes", "1000", "--input-size", "32"], 86_036_008),
    # the authors' baselines, as their logs logs/nin_1875527964 and logs/vgg_24208029 record them
    (["nin"], 1_007_242),
    (["vgg_cifar", "--num-classes", "10"], 20_035_018),
])
def test_json_parameter_counts(args, params, capsys):
    assert _main([*args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == params


def test_json_wide_resnet50_2_at_224(capsys):
    assert _main(["wide_resnet50_2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 68_883_240
    assert info["input_size"] == 224
    assert abs(info["gmacs"] - 11.40) / 11.40 < 0.02
    assert info["features"]["res5"] == {"channels": 2048, "stride": 32, "shape": [2048, 7, 7]}


def test_text_output_and_bad_input_size(capsys):
    assert _main(["nin", "--input-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "params: 1,007,242" in out and "stage2" in out
    assert _main(["nin", "--input-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input-size" in err[0]


def test_main_leaves_grad_mode_as_it_was():
    import torch

    assert _main(["wrn_10_1", "--json"]) == 0
    assert torch.is_grad_enabled()


def test_config_mode_parameters_gflops_by_part_and_benchmark(capsys):
    """--config-file: the detector's parameters (trainable after FREEZE_AT) and GFLOPs split into its parts."""
    demo = ["--config-file", "shapes_wrn_frcnn.yaml", "--input-size", "64", "96", "MODEL.DEVICE", "cpu"]
    assert _main([*demo, "--json", "--benchmark", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    params, gflops = info["params"], info["gflops"]
    assert list(gflops) == ["backbone", "FPN", "RPN", "RoI heads", "total"]
    assert gflops["total"] == pytest.approx(sum(v for k, v in gflops.items() if k != "total"), abs=2e-3)
    assert all(gflops[k] > 0 for k in gflops)
    assert params["all"]["total"] == sum(params[k]["total"] for k in ("backbone", "FPN", "RPN", "RoI heads"))
    assert info["network_input_size"] == [64, 96] and info["benchmark"]["runs"] == 2 and info["benchmark"]["median_s"] > 0
    # FREEZE_AT 2 freezes the stem and stage1: their convolutions stop being trainable (their BatchNorm becomes
    # FrozenBatchNorm, whose statistics and affine terms are buffers, not parameters)
    assert _main([*demo, "--json", "MODEL.BACKBONE.FREEZE_AT", "2"]) == 0
    frozen = json.loads(capsys.readouterr().out)["params"]
    assert frozen["backbone"]["trainable"] < frozen["backbone"]["total"] <= params["backbone"]["total"]
    assert frozen["backbone"]["trainable"] < params["backbone"]["trainable"]
    assert frozen["FPN"]["trainable"] == params["FPN"]["trainable"]
    # a larger input costs more in the backbone, not in the RoI heads (a fixed number of proposals)
    assert _main(["--config-file", "shapes_wrn_frcnn.yaml", "--input-size", "128", "192", "MODEL.DEVICE", "cpu",
                      "--json"]) == 0
    bigger = json.loads(capsys.readouterr().out)["gflops"]
    assert bigger["backbone"] == pytest.approx(4 * gflops["backbone"], rel=0.02)
    assert bigger["RoI heads"] == pytest.approx(gflops["RoI heads"], rel=1e-3)
    assert _main(["--config-file", "shapes_wrn_frcnn.yaml", "--input-size", "64", "96", "MODEL.DEVICE", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "GFLOPs at 64x96" in text and "trainable (MODEL.BACKBONE.FREEZE_AT 0" in text and "RoI heads" in text


def test_config_mode_bad_input_is_one_line(capsys):
    assert _main(["--config-file", "shapes_wrn_frcnn.yaml", "MODEL.WRN.DEPTH", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'MODEL.WRN.DEPTH'" in err[0]
    assert _main(["--config-file", "shapes_wrn_frcnn.yaml", "--input-size", "1", "2", "3"]) == 2
    assert "--input-size" in capsys.readouterr().err
