"""tools/plot_logs.py draws curves from a finished run and from the original code's json_stats: logs."""
import json
import shutil

import numpy as np
from PIL import Image

from helpers import load_tool, run_tool

from wrn_det.classification import ClsTrainer, get_cls_cfg
from wrn_det.classification.curves import legend_labels
from wrn_det.data.cls_synthetic import write_synthetic_cifar
from wrn_det.engine.cli import cli_main
from wrn_det.engine.curves import read_run


# Lines as the original Torch code printed them (a trailing tab included) and as its PyTorch code wrote them.
LUA_LOG = """==> online epoch # 1 [batchSize = 128]\t
json_stats: {"loss":1.39,"epoch":1,"test_acc":58.57,"lr":0.1,"train_time":291.7,"model":"wide-resnet"}\t
==> online epoch # 2 [batchSize = 128]\t
json_stats: {"loss":0.906,"epoch":2,"test_acc":66.11,"lr":0.1,"train_time":292.8,"model":"wide-resnet"}\t
json_stats: {"loss":0.701,"epoch":3,"test_acc":72.40,"lr":0.1,"train_time":292.1,"model":"wide-resnet"}\t
"""
PYTORCH_LOG = "".join(
    "json_stats: " + json.dumps({"train_loss": 2.0 / e, "train_acc": 50 + 10 * e, "test_loss": 2.2 / e,
                                 "test_acc": 45 + 10 * e, "epoch": e, "depth": 16}) + "\n" for e in range(1, 5))


def _plot(argv):
    """Return the exit status of ``tools/plot_logs.py ARGV`` run in this process."""
    tool = load_tool("plot_logs")
    return cli_main(tool.main, tool.parse_args(argv))


def _assert_png(path):
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img.std() > 5  # something was drawn


def test_json_stats_logs_are_parsed_and_plotted(tmp_path):
    (tmp_path / "wrn40_4.log").write_text(LUA_LOG)
    (tmp_path / "pytorch_log.txt").write_text(PYTORCH_LOG)
    label, rows = read_run(str(tmp_path / "wrn40_4.log"))
    assert label == "wrn40_4" and [r["epoch"] for r in rows] == [1, 2, 3]
    assert abs(rows[0]["test_err"] - (100 - 58.57)) < 1e-9 and rows[1]["train_loss"] == 0.906
    assert rows[0]["test_loss"] is None  # the Torch code logged no test loss
    _, rows = read_run(str(tmp_path / "pytorch_log.txt"))
    assert abs(rows[3]["train_err"] - 10.0) < 1e-9 and abs(rows[3]["test_loss"] - 0.55) < 1e-9

    out = tmp_path / "orig.png"
    assert _plot([str(tmp_path / "wrn40_4.log"), str(tmp_path / "pytorch_log.txt"), "-o", str(out)]) == 0
    _assert_png(out)


def test_plot_of_a_finished_run_and_bad_input(tmp_path, capsys, one_thread):
    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=128, n_test=64, seed=3)
    run = tmp_path / "tiny_run"
    cfg = get_cls_cfg()
    cfg.merge_from_list(["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False",
                         "OUTPUT_DIR", str(run), "SOLVER.EPOCHS", "2", "SOLVER.IMS_PER_BATCH", "32",
                         "TEST.IMS_PER_BATCH", "64"])
    ClsTrainer(cfg).train()
    label, rows = read_run(str(run))
    assert label == "tiny_run" and [r["epoch"] for r in rows] == [1, 2]
    assert all(r["test_err"] is not None and r["train_loss"] is not None for r in rows)

    assert _plot([str(run), "-o", str(tmp_path / "curves.png")]) == 0
    _assert_png(tmp_path / "curves.png")

    capsys.readouterr()
    (tmp_path / "empty.log").write_text("nothing to see\n")
    assert _plot([str(tmp_path / "empty.log"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "empty.log" in err
    assert not (tmp_path / "x.png").exists()


def test_train_cls_writes_the_original_json_stats_lines(tmp_path, capsys):
    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=128, n_test=64, seed=3)
    run = tmp_path / "wrn_run"
    res = run_tool("train_cls", "MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False",
                   "OUTPUT_DIR", str(run), "SOLVER.EPOCHS", "2", "SOLVER.IMS_PER_BATCH", "32", "TEST.IMS_PER_BATCH", "64",
                   "SOLVER.BASE_LR", "0.05", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in (run / "log.txt").read_text().splitlines() if ln.startswith("json_stats: ")]
    stats = [json.loads(ln[len("json_stats: "):]) for ln in lines]
    assert [s["epoch"] for s in stats] == [1, 2]  # one per epoch
    metrics = [json.loads(ln) for ln in (run / "metrics.json").read_text().splitlines()]
    for s, m in zip(stats, metrics):
        # the epoch's figures, under this project's names and the original code's
        assert s["test_top1_err"] == m["test_top1_err"] and abs(s["test_acc"] - (100 - m["test_top1_err"])) < 1e-9
        assert s["train_top1_err"] == m["train_top1_err"] and s["loss"] == s["train_loss"] == m["train_loss"]
        # merged with every option of the run, as train.lua merged its opt
        assert s["MODEL.NAME"] == "wrn_10_1" and s["SOLVER.BASE_LR"] == 0.05 and s["SOLVER.STEPS"] == [60, 120, 160]
        assert s["OUTPUT_DIR"] == str(run) and "INPUT.PIXEL_MEAN" in s
    # the original notebook's reader (notebooks/sweeper.py loadLog) and ours take the same rows
    found = [json.loads(ln[ln.find("json_stats") + 12:]) for ln in (run / "log.txt").read_text().splitlines()
             if ln.find("json_stats") > -1]
    assert found == stats
    _, rows = read_run(str(run / "log.txt"))
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["test_err"] == metrics[1]["test_top1_err"]

    # --legend names runs by their options: ours (json_stats or config.yaml) and the original code's
    (tmp_path / "wrn40_4.log").write_text(LUA_LOG)
    other = tmp_path / "other_run"  # a run with config.yaml and metrics.json only
    other.mkdir()
    shutil.copy(run / "metrics.json", other / "metrics.json")
    (other / "config.yaml").write_text((run / "config.yaml").read_text().replace("BASE_LR: 0.05", "BASE_LR: 0.1"))
    assert legend_labels([str(run), str(tmp_path / "wrn40_4.log")], ["MODEL.NAME", "model"]) == [
        "MODEL.NAME=wrn_10_1, model=not present", "MODEL.NAME=not present, model=wide-resnet"]
    assert legend_labels([str(run), str(other)], ["auto"]) == ["SOLVER.BASE_LR=0.05", "SOLVER.BASE_LR=0.1"]
    capsys.readouterr()
    out = tmp_path / "legend.png"
    assert _plot([str(run), str(other), "--legend", "MODEL.NAME,SOLVER.BASE_LR", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MODEL.NAME=wrn_10_1, SOLVER.BASE_LR=0.05" in printed and "SOLVER.BASE_LR=0.1" in printed
    _assert_png(out)
    assert _plot([str(run), "--legend", "MODEL.NAM", "-o", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MODEL.NAM" in err and not (tmp_path / "y.png").exists()


def test_plot_logs_reads_detection_runs_too(tmp_path, capsys):
    """A run of tools/train_net.py (rows per iteration) gets its own figure of losses, learning rate and AP."""
    det = tmp_path / "det_run"
    det.mkdir()
    rows = [{"total_loss": 2.0 / (it + 1), "loss_cls": 1.0 / (it + 1), "lr": 0.02, "iteration": it} for it in range(0, 100, 20)]
    rows += [{"bbox/AP": 31.5, "bbox/AP50": 60.0, "bbox/APl": None, "iteration": 99}]
    (det / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    label, read = read_run(str(det))
    assert label == "det_run" and read == rows  # a detection run's rows are kept as written
    capsys.readouterr()
    assert _plot([str(det)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {det / 'curves.png'}"
    _assert_png(det / "curves.png")
    assert _plot([str(det / "metrics.json"), "-o", str(tmp_path / "det.png"), "--title", "shapes"]) == 0
    _assert_png(tmp_path / "det.png")

    # runs of both kinds, --legend or one -o for several detection runs: one line, nothing written
    (tmp_path / "wrn40_4.log").write_text(LUA_LOG)
    other = tmp_path / "other_det"
    shutil.copytree(det, other, ignore=shutil.ignore_patterns("*.png"))
    capsys.readouterr()
    for argv, expected in (([str(det), str(tmp_path / "wrn40_4.log")], "plot them in separate calls"),
                           ([str(det), "--legend", "auto"], "--legend labels overlaid classification runs"),
                           ([str(det), str(other), "-o", str(tmp_path / "both.png")], "-o names one PNG")):
        assert _plot(argv + ["-o", str(tmp_path / "no.png")] if "-o" not in argv else argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "no.png").exists() and not (tmp_path / "both.png").exists()
    assert not (other / "curves.png").exists()
