"""A small WRN learns a synthetic 10-class set written as CIFAR-10 batches (the issue's learning test)."""
import json

import numpy as np
import pytest
import torch

from helpers import load_tool

from wrn_det.data.classification import read_cifar
from wrn_det.data.cls_synthetic import write_synthetic_cifar
from wrn_det.engine.cli import cli_main



def _colour_only_accuracy(train, test) -> float:
    """Accuracy of nearest class mean on each image's mean colour: what a colour-blind-to-shape model gets."""
    f_tr = train.images.float().mean(dim=(2, 3))
    f_te = test.images.float().mean(dim=(2, 3))
    means = torch.stack([f_tr[train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(f_te, means).argmin(1)
    return (pred == test.labels).float().mean().item()


@pytest.mark.slow
def test_wrn_learns_synthetic_cifar10_to_90_percent(tmp_path, one_thread):
    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=2000, n_test=500, seed=1)
    train = read_cifar(root, "cifar10", True, verify_checksums=False)
    test = read_cifar(root, "cifar10", False, verify_checksums=False)
    # the set is not solvable from colour alone (stripes' orientation matters), nor by guessing
    assert _colour_only_accuracy(train, test) < 0.6
    assert np.bincount(test.labels.numpy(), minlength=10).max() < 0.2 * len(test)

    out = tmp_path / "run"
    # the script's own entry point, in this process (a subprocess would add the start-up of torch)
    argv = ["MODEL.NAME", "wrn_10_1", "DATASETS.NAME", "cifar10", "DATASETS.ROOT", root,
            "DATASETS.VERIFY_CHECKSUMS", "False", "OUTPUT_DIR", str(out), "SEED", "0",
            "SOLVER.EPOCHS", "3", "SOLVER.STEPS", "(3,)", "SOLVER.IMS_PER_BATCH", "64", "TEST.IMS_PER_BATCH", "250"]
    tool = load_tool("train_cls")
    assert cli_main(tool.main, tool.parse_args(argv)) == 0

    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    final = rows[-1]
    assert final["test_top1_err"] <= 10.0, rows  # >= 90% accuracy on held-out images
    assert rows[0]["test_top1_err"] > final["test_top1_err"]
    # the schedule: 0.1, then x0.2 from the start of epoch 3
    assert [r["lr"] for r in rows] == [0.1, 0.1, 0.1 * 0.2]
    for key in ("train_loss", "train_top1_err", "test_loss", "test_top5_err", "seconds", "images_per_sec", "n_parameters"):
        assert key in final
    for name in ("config.yaml", "last_checkpoint", "model_best.pth", "model_final.pth", "model_epoch_0003.pth"):
        assert (out / name).is_file(), name
    # the newest two epoch checkpoints are kept (SOLVER.CHECKPOINT_KEEP 2): a broken newest one has one to fall back to
    assert (out / "model_epoch_0002.pth").is_file() and not (out / "model_epoch_0001.pth").exists()
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    best = torch.load(out / "model_best.pth", weights_only=True)
    assert best["test_top1_err"] == min(r["test_top1_err"] for r in rows)
