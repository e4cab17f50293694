"""Two CPU processes under torchrun (gloo, two agents meeting through c10d) train like one process with the same
global batch."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, tool_env, torchrun_two_agents

from wrn_det.data.cls_synthetic import write_synthetic_cifar

LOSS = re.compile(r"epoch (\d+)/\d+ iter (\d+)/\d+ loss (\S+)")


def _losses(out: Path):
    return [(int(e), int(i), float(v)) for e, i, v in LOSS.findall((out / "log.txt").read_text())]


@pytest.mark.slow
def test_two_torchrun_agents_match_one_process(tmp_path):
    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=128, n_test=64, seed=11)
    # BatchNorm: MODEL.SYNC_BN (the default) normalises with the statistics of the global batch,
    # on the CPU through wrn_det.models.norm.SyncBatchNorm; no dropout, so no per-process random stream matters
    opts = ["MODEL.NAME", "wrn_10_1", "MODEL.DROPOUT", "0.0", "MODEL.SYNC_BN", "True",
            "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False", "SEED", "3",
            "SOLVER.EPOCHS", "2", "SOLVER.STEPS", "(2,)", "SOLVER.IMS_PER_BATCH", "32", "SOLVER.BASE_LR", "0.05",
            "TEST.IMS_PER_BATCH", "64", "LOG_PERIOD", "1"]
    env = tool_env()
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = subprocess.run([sys.executable, str(REPO / "tools/train_cls.py"), *opts, "OUTPUT_DIR", str(one)], env=env,
                        capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-2000:]
    # two torchrun agents of one process each, meeting through c10d: two machines, as far as the run can tell
    for agent in torchrun_two_agents("train_cls", [*opts, "OUTPUT_DIR", str(two)], env):
        assert agent.returncode == 0, agent.stderr[-3000:]

    log2 = (two / "log.txt").read_text()
    assert "2 process(es)" in log2 and (two / "log.txt.rank1").is_file()
    l1, l2 = _losses(one), _losses(two)
    assert [x[:2] for x in l1] == [x[:2] for x in l2] == [(e, i) for e in (1, 2) for i in (1, 2, 3, 4)]
    diffs = [abs(a[2] - b[2]) for a, b in zip(l1, l2)]
    assert max(diffs) < 1e-4, list(zip(l1, l2))
    assert l1[0][2] != l1[-1][2]  # it trained

    w1 = torch.load(one / "model_final.pth", weights_only=True)["model"]
    w2 = torch.load(two / "model_final.pth", weights_only=True)["model"]
    for k in w1:
        if w1[k].is_floating_point():
            assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=1e-3), k
