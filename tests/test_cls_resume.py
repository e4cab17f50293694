"""SIGKILL partway through epoch 3, then --resume: the run ends bit-identical to an uninterrupted one."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, tool_env

from wrn_det.data.cls_synthetic import write_synthetic_cifar



def _cmd(root, out, resume=False):
    # dropout and the EMA make the random streams and the EMA state part of what must be restored;
    # the step at epoch 3 resets the momentum buffers inside the interrupted epoch's range
    return [sys.executable, str(REPO / "tools/train_cls.py"), *(["--resume"] if resume else []),
            "MODEL.NAME", "wrn_10_1", "MODEL.DROPOUT", "0.3", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.9",
            "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False", "OUTPUT_DIR", str(out), "SEED", "7",
            "SOLVER.EPOCHS", "4", "SOLVER.STEPS", "(3,)", "SOLVER.IMS_PER_BATCH", "32", "TEST.IMS_PER_BATCH", "100",
            "LOG_PERIOD", "1"]


def _epoch3_started(out: Path) -> bool:
    log = out / "log.txt"
    last = out / "last_checkpoint"
    return (last.is_file() and last.read_text().strip() == "model_epoch_0002.pth" and log.is_file()
            and "epoch 3/4 iter 3/10 " in log.read_text())


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=320, n_test=100, seed=5)
    env = tool_env()
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    # both runs at once: results do not depend on timing, and the test takes half the time
    p_straight = subprocess.Popen(_cmd(root, straight), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p_broken = subprocess.Popen(_cmd(root, broken), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not _epoch3_started(broken):
            assert p_broken.poll() is None, p_broken.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "epoch 3 never started"
            time.sleep(0.02)
        p_broken.send_signal(signal.SIGKILL)
        assert p_broken.wait(60) == -signal.SIGKILL
    finally:
        if p_broken.poll() is None:
            p_broken.kill()
    # killed inside epoch 3: its checkpoint was never written
    assert (broken / "last_checkpoint").read_text().strip() == "model_epoch_0002.pth"
    assert not (broken / "model_epoch_0003.pth").exists()

    res = subprocess.run(_cmd(root, broken, resume=True), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "continuing at epoch 3" in (broken / "log.txt").read_text()
    assert p_straight.wait(300) == 0, p_straight.stderr.read().decode()[-2000:]

    a = torch.load(straight / "model_final.pth", weights_only=True)
    b = torch.load(broken / "model_final.pth", weights_only=True)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    ca = torch.load(straight / "model_epoch_0004.pth", weights_only=True)
    cb = torch.load(broken / "model_epoch_0004.pth", weights_only=True)
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], cb["optimizer"]["state"][k]["momentum_buffer"])
    assert torch.equal(ca["rng_states"][0]["torch"], cb["rng_states"][0]["torch"])

    rows_a = [json.loads(x) for x in (straight / "metrics.json").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (broken / "metrics.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("train_loss", "train_top1_err", "test_loss", "test_top1_err", "lr"):
            assert ra[key] == rb[key], (ra["epoch"], key)
