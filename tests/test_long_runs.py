"""What clusters do to long jobs: preemption signals, torchrun restarting a worker group, a broken newest
checkpoint, a full disk. Both trainers; every resumed run must end bit-identical to an uninterrupted one."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DRAW_64, REPO, TINY_DET, free_port, tool_env, write_fake_coco

from wrn_det.data.cls_synthetic import write_synthetic_cifar
from wrn_det.engine.errors import PREEMPTED_EXIT_CODE, WrnDetError

pytestmark = pytest.mark.slow  # see conftest.py: run first under pytest-xdist

PREEMPTED = re.compile(r"preempted at iteration (\d+); checkpoint (\S+); continue with --resume")


def _weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {part: ckpt[part] for part in ("model", "ema") if isinstance(ckpt.get(part), dict)}


def _assert_same(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for part in wa:
        different = [k for k in wa[part] if not torch.equal(wa[part][k], wb[part][k])]
        assert not different, (part, different[:5])


def _wait_for(predicate, proc, what, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.02)


def _children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


# ------------------------------------------------------------------ classification


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_synthetic_cifar(str(tmp_path_factory.mktemp("cifar")), n_train=320, n_test=100, seed=5)


def _cls_args(root, out, *extra):
    # dropout and the EMA make the random streams and the EMA state part of what must be restored
    return ["MODEL.NAME", "wrn_10_1", "MODEL.DROPOUT", "0.3", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.9",
            "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False", "OUTPUT_DIR", str(out), "SEED", "7",
            "SOLVER.EPOCHS", "3", "SOLVER.STEPS", "(3,)", "SOLVER.IMS_PER_BATCH", "32", "TEST.IMS_PER_BATCH", "100",
            "LOG_PERIOD", "1", *extra]


def _cls(*args):
    return [sys.executable, str(REPO / "tools" / "train_cls.py"), *map(str, args)]


@pytest.fixture(scope="module")
def cls_reference(cifar, tmp_path_factory):
    """An uninterrupted classification run of 3 epochs; returns its folder."""
    out = tmp_path_factory.mktemp("cls_ref") / "run"
    r = subprocess.run(_cls(*_cls_args(cifar, out)), env=tool_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_sigterm_mid_epoch_stops_with_a_checkpoint_and_resumes_bit_exactly(cifar, cls_reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cls(*_cls_args(cifar, out)), env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = out / "log.txt"
    _wait_for(lambda: log.is_file() and "epoch 2/3 iter 3/10 " in log.read_text(), proc, "epoch 2, batch 3")
    seen = len(re.findall(r"epoch \d/3 iter \d+/10 ", log.read_text()))  # iterations done when the signal leaves
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-2000:]
    assert stderr.strip() == ""  # a log line, not an error
    m = PREEMPTED.search(stdout)
    assert m, stdout[-2000:]
    it, ckpt = int(m.group(1)), m.group(2)
    assert seen - 1 <= it <= seen, (it, seen)  # the current step finished, no more
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and state["batch"] == it - 10 + 1 and Path(ckpt).name == f"model_epoch_0002_{it - 9:05d}.pth"
    assert (out / "last_checkpoint").read_text().strip() == Path(ckpt).name
    r = subprocess.run(_cls("--resume", *_cls_args(cifar, out)), env=tool_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"continuing at epoch 2, batch {it - 9 + 1}" in log.read_text()
    _assert_same(cls_reference / "model_final.pth", out / "model_final.pth")
    rows = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    ref = [json.loads(x) for x in (cls_reference / "metrics.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for a, b in zip(rows, ref):  # the interrupted epoch's figures too: its partial sums were in the checkpoint
        for k in ("train_loss", "train_top1_err", "test_top1_err"):
            assert a[k] == b[k], (a["epoch"], k)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(cifar, cls_reference, tmp_path):
    out = tmp_path / "run"
    # the default SOLVER.CHECKPOINT_KEEP keeps the previous checkpoint to fall back to
    r = subprocess.run(_cls(*_cls_args(cifar, out, "SOLVER.EPOCHS", "2")),
                       env=tool_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    newest = out / "model_epoch_0002.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a node died while writing it
    r = subprocess.run(_cls("--resume", *_cls_args(cifar, out)), env=tool_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (out / "log.txt").read_text()
    assert f"checkpoint {newest} is broken" in text and "model_epoch_0001.pth, the newest intact" in text
    _assert_same(cls_reference / "model_final.pth", out / "model_final.pth")
    # with no intact checkpoint at all: one line, exit status 2
    for f in out.glob("model_epoch_*.pth"):
        f.write_bytes(b"PK\x03\x04 broken")
    r = subprocess.run(_cls("--resume", *_cls_args(cifar, out)), env=tool_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --resume: no intact checkpoint")


def _torchrun(tool, args, out):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
            "--monitor-interval", "0.2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            str(REPO / "tools" / f"{tool}.py"), *map(str, args), "OUTPUT_DIR", str(out)]


def _elastic(tool, args, tmp_path, env, checkpoint_name):
    """Run 2 workers twice: once straight, once with one worker SIGKILLed after ``checkpoint_name``; returns both folders."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = subprocess.Popen(_torchrun(tool, args, straight), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    proc = subprocess.Popen(_torchrun(tool, args, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    last = killed / "last_checkpoint"
    _wait_for(lambda: last.is_file() and last.read_text().strip() == checkpoint_name, proc, checkpoint_name)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    assert proc.wait(300) == 0, proc.stderr.read()[-3000:]  # the agent restarted the group, which finished
    assert ref.wait(300) == 0, ref.stderr.read()[-3000:]
    return straight, killed


def test_torchrun_restart_after_a_worker_dies_resumes_by_itself_classification(cifar, tmp_path):
    # (the OUTPUT_DIR given last by _torchrun overrides the one of _cls_args)
    straight, killed = _elastic("train_cls", _cls_args(cifar, tmp_path / "unused"), tmp_path, tool_env(),
                                "model_epoch_0001.pth")
    assert "resuming from the last checkpoint" in (killed / "log.txt").read_text()
    _assert_same(straight / "model_final.pth", killed / "model_final.pth")


# ------------------------------------------------------------------ detection


@pytest.fixture(scope="module")
def det_root(tmp_path_factory):
    return write_fake_coco(tmp_path_factory.mktemp("det"), {"train2017": (40, 11)}, **DRAW_64)


def _det_args(out, *extra):
    return ["--config-file", "shapes_wrn_frcnn.yaml", *TINY_DET, "DATASETS.TEST", "()", "SEED", "3",
            "SOLVER.MAX_ITER", "14", "SOLVER.STEPS", "(9,)", "SOLVER.WARMUP_ITERS", "3", "SOLVER.CHECKPOINT_PERIOD", "4",
            "LOG_PERIOD", "1", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.9", *extra, "OUTPUT_DIR", str(out)]


def _net(*args):
    return [sys.executable, str(REPO / "tools" / "train_net.py"), *map(str, args)]


def test_sigterm_mid_run_stops_with_a_checkpoint_and_resumes_bit_exactly_detection(det_root, tmp_path):
    env = tool_env(det_root)
    ref = subprocess.Popen(_net(*_det_args(tmp_path / "ref")), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    out = tmp_path / "run"
    proc = subprocess.Popen(_net(*_det_args(out)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.txt"
    _wait_for(lambda: log.is_file() and "iter: 5 " in log.read_text(), proc, "iteration 5")
    seen = len(re.findall(r"iter: \d+ ", log.read_text()))
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-2000:]
    m = PREEMPTED.search(stdout)
    assert m and stderr.strip() == "", (stdout[-2000:], stderr[-2000:])
    it = int(m.group(1))
    assert seen - 1 <= it <= seen and m.group(2).endswith(f"model_{it:07d}.pth"), (it, seen, m.group(2))
    assert torch.load(m.group(2), weights_only=True)["iteration"] == it
    r = subprocess.run(_net("--resume", *_det_args(out)), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ref.wait(300) == 0, ref.stderr.read()[-2000:]
    _assert_same(tmp_path / "ref" / "model_final.pth", out / "model_final.pth")


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one_detection(det_root, tmp_path):
    out = tmp_path / "run"
    env = tool_env(det_root)
    r = subprocess.run(_net(*_det_args(out)), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    reference = out / "model_final.pth"
    reference.rename(tmp_path / "reference.pth")  # the uninterrupted run's weights
    # as the run was before its final checkpoint, with the newest periodic one broken (a node died writing it)
    newest = out / "model_0000011.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (out / "last_checkpoint").write_text(newest.name)
    r = subprocess.run(_net("--resume", *_det_args(out)), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (out / "log.txt").read_text()
    assert f"checkpoint {newest} is broken" in text and "model_0000007.pth, the newest intact" in text
    assert "continuing at iteration 8" in text
    _assert_same(tmp_path / "reference.pth", out / "model_final.pth")


def test_torchrun_restart_after_a_worker_dies_resumes_by_itself_detection(det_root, tmp_path):
    straight, killed = _elastic("train_net", _det_args(tmp_path / "unused", "SOLVER.IMS_PER_BATCH", "4"), tmp_path,
                                tool_env(det_root), "model_0000003.pth")
    assert "resuming from" in (killed / "log.txt").read_text()
    _assert_same(straight / "model_final.pth", killed / "model_final.pth")


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(det_root, tmp_path, monkeypatch,
                                                                           one_thread):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer
    from wrn_det.engine.config import load_config

    monkeypatch.setenv("DETECTRON2_DATASETS", det_root)
    out = tmp_path / "run"
    cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml",
                      _det_args(out, "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.MAX_ITER", "6")[2:])
    trainer = Trainer(cfg)
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            open(f, "wb").write(b"PK" + b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(WrnDetError) as e:
        trainer.train()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {out / 'model_0000003.pth'}: No space left on device")
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert torch.load(out / "model_0000001.pth", weights_only=True)["iteration"] == 1  # intact
    assert not (out / "model_0000003.pth").exists() and not list(out.glob(".tmp-*"))
