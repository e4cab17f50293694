"""Tests of the shared engine pieces: config loading and run keys, checkpoints, RNG states, schedules, the command
line, metrics files."""
import os
import random

import numpy as np
import pytest
import torch

from wrn_det.engine.checkpoint import (
    get_rng_states,
    load_checkpoint,
    read_last_checkpoint,
    set_rng_states,
    write_last_checkpoint,
)
from wrn_det.engine.cli import cli_main, default_argument_parser, parse_args_with_overrides, split_overrides
from wrn_det.engine.config import CfgNode, add_run_config, load_config, resolve_config_file, save_config
from wrn_det.engine.errors import ConfigError, WrnDetError
from wrn_det.engine.fileio import atomic_save
from wrn_det.engine.schedules import LRSchedule, build_lr_multiplier


def _defaults():
    c = CfgNode()
    c.OUTPUT_DIR = "out"
    c.SOLVER = CfgNode()
    c.SOLVER.BASE_LR = 0.1
    c.SOLVER.STEPS = (10, 20)
    return c


def test_config_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.5\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nOUTPUT_DIR: here\n")
    cfg = load_config(_defaults(), str(tmp_path / "child.yaml"), ["SOLVER.STEPS", "(3, 4)"])
    assert cfg.SOLVER.BASE_LR == 0.5 and cfg.OUTPUT_DIR == "here" and tuple(cfg.SOLVER.STEPS) == (3, 4)
    assert cfg.is_frozen()
    out = save_config(cfg, str(tmp_path / "o" / "config.yaml"))
    again = load_config(_defaults(), out, [])
    assert again == cfg


def test_config_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("SOLVER:\n  BASE_LRR: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(_defaults(), str(f), [])
    assert "SOLVER.BASE_LRR" in str(e.value) and "bad.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key .NOPE."):
        load_config(_defaults(), None, ["NOPE", "1"])
    with pytest.raises(ConfigError, match="odd number"):
        load_config(_defaults(), None, ["SOLVER.BASE_LR"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_file("no_such_config_anywhere.yaml")


def test_atomic_save_and_weights_only_load(tmp_path):
    p = str(tmp_path / "ck.pth")
    atomic_save({"model": {"w": torch.ones(2)}, "iteration": 3}, p)
    assert load_checkpoint(p)["iteration"] == 3
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []
    write_last_checkpoint(str(tmp_path), "ck.pth")
    assert read_last_checkpoint(str(tmp_path)) == p
    with pytest.raises(WrnDetError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WrnDetError, match="cannot be read"):
        load_checkpoint(str(tmp_path / "junk.pth"))


def test_atomic_save_failure_keeps_old_file(tmp_path):
    p = str(tmp_path / "ck.pth")
    atomic_save({"v": torch.tensor(1)}, p)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Unpicklable()}, p)
    assert load_checkpoint(p)["v"].item() == 1
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def test_rng_states_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save(get_rng_states(), str(tmp_path / "rng.pth"))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(load_checkpoint(str(tmp_path / "rng.pth")))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_multistep_schedule_drops_at_steps():
    m = build_lr_multiplier("WarmupMultiStepLR", 10, [4, 8], 0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = LRSchedule(opt, m, 10)
    lrs = []
    for it in range(10):
        sched.apply(it)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
    assert lrs[:4] == [0.2] * 4 and all(abs(x - 0.02) < 1e-12 for x in lrs[4:8]) and abs(lrs[8] - 0.002) < 1e-12
    with pytest.raises(ConfigError, match="LR_SCHEDULER_NAME"):
        build_lr_multiplier("Nope", 10)


def test_cli_main_prints_one_line(capsys):
    def bad():
        raise ConfigError("file x.yaml: unknown config key 'A.B'")

    assert cli_main(bad) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: file x.yaml: unknown config key 'A.B'"


def test_overrides_stand_anywhere_on_a_command_line():
    argv = ["--input", "a.jpg", "b.jpg", "MODEL.WEIGHTS", "w.pth", "--output", "out", "SOLVER.BASE_LR", "0.1", "--x"]
    assert split_overrides(argv) == (["--input", "a.jpg", "b.jpg", "--output", "out", "--x"],
                                     ["MODEL.WEIGHTS", "w.pth", "SOLVER.BASE_LR", "0.1"])
    # a key without a value, lower case and undotted words are arguments
    assert split_overrides(["model.weights", "x", "SEED", "1", "MODEL.WEIGHTS"]) == (
        ["model.weights", "x", "SEED", "1", "MODEL.WEIGHTS"], [])
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--input", nargs="+")
    args = parse_args_with_overrides(p, ["--input", "a.jpg", "b.jpg", "MODEL.WEIGHTS", "w.pth"])
    assert args.input == ["a.jpg", "b.jpg"] and args.opts == ["MODEL.WEIGHTS", "w.pth"]
    args = default_argument_parser().parse_args(["--config-file", "x.yaml", "--resume", "SOLVER.BASE_LR", "0.1"])
    assert args.config_file == "x.yaml" and args.resume and args.opts == ["SOLVER.BASE_LR", "0.1"]


def test_run_keys_have_each_tasks_defaults_and_engine_reads_them():
    from wrn_det.classification import get_cls_cfg
    from wrn_det.detection.config import get_det_cfg

    det, cls = get_det_cfg(), get_cls_cfg()
    assert (det.SEED, det.LOG_PERIOD, det.MODEL_EMA.DECAY, det.SOLVER.AMP.DTYPE) == (-1, 20, 0.999, "float16")
    assert (cls.SEED, cls.LOG_PERIOD, cls.MODEL_EMA.DECAY, cls.SOLVER.AMP.DTYPE) == (0, 50, 0.9999, "bfloat16")
    for cfg in (det, cls):
        assert cfg.PREEMPT_SIGNALS == ("SIGTERM", "SIGUSR1") and cfg.CUDNN_BENCHMARK is False
        assert cfg.MODEL_EMA.ENABLED is False and cfg.SOLVER.AMP.ENABLED is False
    # --eval-only on the EMA weights is detection's: classification evaluates both
    assert det.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY is False and "USE_EMA_WEIGHTS_FOR_EVAL_ONLY" not in cls.MODEL_EMA
    # the keys merge from a file into nodes of the caller's class, and a misspelt one is refused
    cfg = add_run_config(_defaults(), "classification")
    assert cfg.SOLVER.BASE_LR == 0.1 and isinstance(cfg.SOLVER.AMP, CfgNode)
    merged = load_config(cfg, None, ["SOLVER.AMP.ENABLED", "True", "MODEL_EMA.DECAY", "0.99", "SEED", "3"])
    assert merged.SOLVER.AMP.ENABLED and merged.MODEL_EMA.DECAY == 0.99 and merged.SEED == 3
    with pytest.raises(ConfigError, match="MODEL_EMA.DECAYS"):
        load_config(cfg, None, ["MODEL_EMA.DECAYS", "0.9"])
    with pytest.raises(ConfigError, match="'segmentation'"):
        add_run_config(_defaults(), "segmentation")


def test_setup_run_turns_on_cudnn_benchmark_when_asked(tmp_path):
    from wrn_det.engine.run import setup_run

    cfg = add_run_config(_defaults(), "classification")
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        setup_run(cfg, logger_names=("wrn_det.test_engine",))
        assert torch.backends.cudnn.benchmark is False
        cfg.CUDNN_BENCHMARK = True
        assert setup_run(cfg, logger_names=("wrn_det.test_engine",)) == 0  # SEED 0 of classification
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    assert not (tmp_path / "out").exists()


def test_metrics_json_is_strict_json_and_read_back_by_one_reader(tmp_path):
    import json

    from wrn_det.engine.events import MetricsWriter, read_metrics, trim_metrics

    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write({"epoch": 1, "loss": torch.tensor(0.5), "ap": float("nan"), "big": np.float64("inf")}, step=7)
        w.write({"epoch": 2, "loss": 0.25, "sizes": (1, float("-inf"))}, step=8)
    text = (tmp_path / "metrics.json").read_text()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) for line in text.splitlines()]
    assert rows == [{"epoch": 1, "loss": 0.5, "ap": None, "big": None, "iteration": 7},
                    {"epoch": 2, "loss": 0.25, "sizes": [1, None], "iteration": 8}]
    assert read_metrics(str(tmp_path)) == rows == read_metrics(str(tmp_path / "metrics.json"))
    # a resumed run drops the rows after its checkpoint; the rows kept are the lines as written
    assert trim_metrics(str(tmp_path), lambda r: r["epoch"] <= 1) == 1
    assert (tmp_path / "metrics.json").read_text() == text.splitlines(keepends=True)[0]
    assert trim_metrics(str(tmp_path), lambda r: True) == 0 and trim_metrics(str(tmp_path / "none"), bool) == 0
    (tmp_path / "metrics.json").write_text('{"iteration": 1}\n\n{"iteration": 2, "loss": NaN\n')
    with pytest.raises(WrnDetError, match=r"metrics.json, line 3: not a JSON object \(Expecting"):
        read_metrics(str(tmp_path))
    with pytest.raises(WrnDetError, match=r"nowhere.*not found"):
        read_metrics(str(tmp_path / "nowhere"))


def test_metrics_json_cut_short_by_a_crash_is_read_trimmed_and_appended_to(tmp_path, caplog):
    """A run killed while writing a row leaves a last line without its end: readers pass it over, a resumed run's
    writer removes it before appending (so its rows do not glue onto it), trim keeps the whole rows."""
    import json
    import logging

    from wrn_det.engine.events import MetricsWriter, read_metrics, trim_metrics

    path = tmp_path / "metrics.json"
    path.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "lo')
    with caplog.at_level(logging.WARNING, logger="wrn_det"):
        assert read_metrics(str(tmp_path)) == [{"epoch": 1, "loss": 0.5}]
    assert "line 2: the last line is cut short" in caplog.text
    assert trim_metrics(str(tmp_path), lambda r: True) == 0 and path.read_text().endswith('"lo')  # nothing to drop
    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write({"epoch": 2, "loss": 0.25}, step=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "iteration": 2}]


def _gather_ranks(out_dir):
    from wrn_det.engine import comm

    ranks = comm.all_gather(comm.get_rank())
    summed = comm.reduce_dict({"x": torch.tensor(float(comm.get_rank() + 1))}, average=False)["x"].item()
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.txt"), "w") as f:
        f.write(f"{comm.get_world_size()} {ranks} {summed} {comm.shared_random_seed() >= 0}")


def test_launch_spawns_cpu_processes_with_gloo(tmp_path):
    from wrn_det.engine.launch import launch

    launch(_gather_ranks, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path),))
    for r in range(2):
        assert (tmp_path / f"rank{r}.txt").read_text() == "2 [0, 1] 3.0 True"


def test_written_files_get_the_umask_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, str(tmp_path / "a.pth"))
        save_config(_defaults(), str(tmp_path / "c.yaml"))
        write_last_checkpoint(str(tmp_path), "a.pth")
    finally:
        os.umask(mask)
    for name in ("a.pth", "c.yaml", "last_checkpoint"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o644, name


def test_restore_ema_loads_the_average_or_restarts_it_with_a_warning(caplog):
    from wrn_det.engine.ema import ModelEMA, restore_ema

    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    ema.update(model)
    saved = {"ema": {k: v.clone() for k, v in ema.state_dict().items()}, "ema_updates": ema.num_updates}
    other = ModelEMA(torch.nn.Linear(3, 2), 0.5)
    got = restore_ema(other, saved, model)
    assert got is other and got.num_updates == 2 and torch.equal(got.module.weight, saved["ema"]["weight"])
    fresh = restore_ema(other, {"model": model.state_dict()}, model)  # a run without the EMA wrote it
    assert fresh is not other and fresh.decay == 0.5 and torch.equal(fresh.module.weight, model.weight)
    assert "no EMA weights" in caplog.text
    assert restore_ema(None, saved, model) is None


def test_console_log_follows_the_current_stdout(monkeypatch, capsys):
    """The console handler writes to sys.stdout as it is when a record comes: a stream replaced (and closed)
    after set-up, as a notebook or a test capture does, gets no 'Logging error' and loses no line."""
    import io
    import logging
    import sys

    from wrn_det.engine.events import setup_logger

    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    log = setup_logger(None, 0, "wrn_det.test_console")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)
    log.info("after the swap")
    assert "after the swap" in second.getvalue() and "Logging error" not in capsys.readouterr().err
    log.handlers.clear()
