"""Tests of the shared engine pieces: config loading, checkpoints, RNG states, schedules, CLI errors."""
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
from wrn_det.engine.config import CfgNode, load_config, resolve_config_file, save_config
from wrn_det.engine.errors import ConfigError, WrnDetError, cli_main
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
