"""Several processes (gloo) under mixed precision: SyncBN statistics in float32, every shipped config's first steps.

The shipped CIFAR configs turn bfloat16 autocast on and MODEL.SYNC_BN is on by default, so a run of
several processes normalises bfloat16 convolution outputs with statistics of the global batch: those
statistics must be summed and kept in float32, and equal (within the convolution's bfloat16 error)
the float32 statistics one process computes on the whole batch.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import REPO, load_tool

from wrn_det.engine.launch import launch

pytestmark = pytest.mark.slow  # see conftest.py: run first under pytest-xdist

STEPS = 3


def _batch():
    g = torch.Generator().manual_seed(5)
    # 8 images whose channels have distinct means and spreads, so every statistic is checked
    x = torch.randn(8, 3, 12, 12, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    return x + torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)


def _layers(norm):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    bn = norm(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, 6))
    return conv, bn


def _syncbn_worker(out_dir):
    from wrn_det.engine import comm
    from wrn_det.models.norm import SyncBatchNorm

    rank, world = comm.get_rank(), comm.get_world_size()
    conv, bn = _layers(SyncBatchNorm)
    x = _batch().chunk(world)[rank]
    dtypes = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = bn(conv(x))
        dtypes.append(str(y.dtype))
        y.float().square().mean().backward()  # the statistics' gradients go through the all-reduce too
    torch.save({"mean": bn.running_mean, "var": bn.running_var, "dtypes": dtypes,
                "buffers": [str(bn.running_mean.dtype), str(bn.running_var.dtype)], "count": int(bn.num_batches_tracked)},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_syncbn_under_bfloat16_keeps_float32_statistics_of_the_global_batch(tmp_path):
    launch(_syncbn_worker, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path),))
    # the reference: one process, float32, BatchNorm over the whole batch
    conv, bn = _layers(nn.BatchNorm2d)
    x = _batch()
    for _ in range(STEPS):
        bn(conv(x))
    # the convolution's own bfloat16 error: its output rounded to bfloat16 moves the statistics by about this much
    with torch.no_grad():
        y32 = conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = conv(x).float()
    mean_err = (y16.mean(dim=(0, 2, 3)) - y32.mean(dim=(0, 2, 3))).abs().max().item()
    var_err = (y16.var(dim=(0, 2, 3)) - y32.var(dim=(0, 2, 3))).abs().max().item()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["dtypes"] == ["torch.bfloat16"] * STEPS  # the output keeps the input's dtype
        assert got["buffers"] == ["torch.float32", "torch.float32"] and got["count"] == STEPS
        # statistics of the global batch, not of each process's half (which differ by far more)
        assert torch.allclose(got["mean"], bn.running_mean, rtol=0, atol=4 * mean_err + 1e-4), (got["mean"], bn.running_mean)
        assert torch.allclose(got["var"], bn.running_var, rtol=0, atol=4 * var_err + 1e-4), (got["var"], bn.running_var)
    # what a per-process (unsynchronised) BatchNorm would hold is outside those bounds
    half = nn.BatchNorm2d(6)
    for _ in range(STEPS):
        half(conv(x[:4]))
    assert (half.running_var - bn.running_var).abs().max() > 4 * var_err + 1e-4


# ------------------------------------------------------------------ every shipped config, two processes

CONFIGS = REPO / "configs"
CLS_CONFIGS = sorted(p for p in (CONFIGS / "classification").glob("*.yaml") if not p.name.startswith("Base-"))
# the RPN configs first: their evaluation writes the proposal files the Fast R-CNN configs train and test on
DET_CONFIGS = sorted([*(CONFIGS / "COCO-Detection").glob("*.yaml"), *(CONFIGS / "PascalVOC-Detection").glob("*.yaml"),
                      *(CONFIGS / "demo").glob("*.yaml")],
                     key=lambda p: ("rpn" not in p.stem, p.parent.name, p.stem))


def _write_cls_data(root: Path) -> None:
    from wrn_det.data.cls_synthetic import synthetic_stripes, write_cifar, write_image_folder, write_mnist, write_svhn

    train, test = synthetic_stripes(8, seed=1), synthetic_stripes(4, seed=2)
    write_cifar(str(root), train, test, "cifar10")
    write_cifar(str(root), train, test, "cifar100")
    for split, (x, y) in (("train", train), ("test", test), ("extra", test)):
        write_svhn(str(root), split, x, y)
    digits = (synthetic_stripes(8, seed=3, size=28)[0][:, 0], np.arange(8) % 10)
    write_mnist(str(root), True, *digits)
    write_mnist(str(root), False, digits[0][:4], digits[1][:4])
    names = [f"n{i:08d}" for i in range(10)]
    write_image_folder(str(root / "imagenet" / "train"), *synthetic_stripes(8, seed=4, size=40), names)
    write_image_folder(str(root / "imagenet" / "val"), *synthetic_stripes(4, seed=5, size=40), names)


#: the smallest network of each family the configs train: bfloat16 has no CPU units here (it is emulated,
#: about 100 times slower than float32), and the settings under test are the run's, not the network's width
SMALLEST = {"wrn": "wrn_10_1", "preact_resnet": "preact_resnet11", "wide_resnet": "wide_resnet18_1"}


def _cls_opts(path: Path, root: Path, out: Path):
    from wrn_det.classification import get_cls_cfg
    from wrn_det.engine.config import load_config

    imagenet = path.stem.startswith("imagenet")
    name = load_config(get_cls_cfg(), str(path), []).MODEL.NAME
    family = next(f for f in sorted(SMALLEST, key=len, reverse=True) if name.startswith(f))
    opts = ["MODEL.NAME", SMALLEST[family], "DATASETS.ROOT", str(root / "imagenet" if imagenet else root), "DATASETS.VERIFY_CHECKSUMS", "False",
            "MODEL.DEVICE", "cpu", "SOLVER.EPOCHS", "1", "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH", "4",
            "TEST.IMS_PER_BATCH", "4", "LOG_PERIOD", "1", "SEED", "0", "OUTPUT_DIR", str(out / path.stem)]
    if imagenet:  # 40-pixel images of 10 classes, cropped to 32
        opts += ["MODEL.NUM_CLASSES", "0", "INPUT.TRAIN_CROP_SIZE", "32", "INPUT.TEST_RESIZE", "36",
                 "INPUT.TEST_CROP_SIZE", "32", "DATALOADER.NUM_WORKERS", "0"]
    return opts


def _det_opts(path: Path, out: Path):
    opts = ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
            "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "0", "TEST.EVAL_PERIOD", "0",
            "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "1", "SEED", "0", "OUTPUT_DIR", str(out / path.stem)]
    if "rpn" in path.stem:  # evaluated: the proposal files the Fast R-CNN configs train on
        opts += ["DATASETS.TEST", "('coco_2017_train', 'coco_2017_val')"]
    else:  # the training steps are under test, not the final evaluation (tested elsewhere)
        opts += ["DATASETS.TEST", "()"]
    if "fast_rcnn" in path.stem:  # the proposals (and, for the demo, the weights) of the RPN run of its family
        rpn = out / path.stem.replace("fast_rcnn", "rpn")
        props = rpn / "inference"
        opts += ["DATASETS.PROPOSAL_FILES_TRAIN", f"('{props}/coco_2017_train/box_proposals.pkl',)",
                 "DATASETS.PROPOSAL_FILES_TEST", "()"]
        if path.parent.name == "demo":
            opts += ["MODEL.WEIGHTS", str(rpn / "model_final.pth")]
    return opts


def _run_configs(family: str, data: str, out: str) -> None:
    """Run every config of ``family`` in this process of a two-process group, as its tool does; rank 0 writes a
    summary ``out/<family>.json`` of what each run used and reached."""
    import json
    import logging

    from wrn_det.engine import comm
    from wrn_det.engine.config import load_config
    from wrn_det.engine.run import open_output_dir, setup_run
    from wrn_det.models.norm import SyncBatchNorm

    data, out = Path(data), Path(out)
    summary = {}
    for path in (CLS_CONFIGS if family == "classification" else DET_CONFIGS):
        if family == "classification":
            from wrn_det.classification import ClsTrainer, get_cls_cfg

            cfg = load_config(get_cls_cfg(), str(path), _cls_opts(path, data, out))
            setup_run(cfg, ("wrn_det.cls", "wrn_det"), seed_per_rank=False)
            trainer = ClsTrainer(cfg)
        else:
            from wrn_det.detection.config import get_det_cfg
            from wrn_det.detection.train import Trainer

            cfg = load_config(get_det_cfg(), str(path), _det_opts(path, out))
            setup_run(cfg)
            trainer = Trainer(cfg)
        trainer.resume_or_load(False)
        open_output_dir(cfg)
        trainer.train()
        comm.synchronize()
        rows = [json.loads(x) for x in (Path(cfg.OUTPUT_DIR) / "metrics.json").read_text().splitlines()]
        summary[path.stem] = {
            "amp": str(trainer.step.dtype), "want_amp": cfg.SOLVER.AMP.ENABLED and cfg.SOLVER.AMP.DTYPE,
            "world": comm.get_world_size(), "sync_bn": sum(isinstance(m, SyncBatchNorm) for m in trainer.model.modules()),
            "losses": [r.get("train_loss", r.get("total_loss")) for r in rows
                       if r.get("train_loss", r.get("total_loss")) is not None],
        }
        if comm.is_main_process():  # the weights are not needed (but an RPN's final ones): keep the disk free
            for f in Path(cfg.OUTPUT_DIR).glob("*.pth"):
                if "rpn" not in path.stem or f.name != "model_final.pth":
                    f.unlink()
        for name in ("wrn_det", "wrn_det.cls"):
            logging.getLogger(name).handlers.clear()
    if comm.is_main_process():
        (out / f"{family}.json").write_text(json.dumps(summary))


def test_every_classification_config_trains_on_two_processes_with_its_amp(tmp_path, monkeypatch):
    import json

    _write_cls_data(tmp_path / "data")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_run_configs, num_gpus_per_machine=2, dist_url="auto",
           args=("classification", str(tmp_path / "data"), str(tmp_path)))
    summary = json.loads((tmp_path / "classification.json").read_text())
    assert sorted(summary) == sorted(p.stem for p in CLS_CONFIGS)
    for name, run in summary.items():
        assert run["world"] == 2, name
        # the shipped AMP setting, as given (bfloat16 for the CIFAR and ImageNet recipes)
        want = "None" if not run["want_amp"] else f"torch.{run['want_amp']}"
        assert run["amp"] == want and want != "None", (name, run)
        assert run["sync_bn"] > 0, (name, run)  # MODEL.SYNC_BN is on by default: global-batch statistics
        assert run["losses"] and all(np.isfinite(v) and v > 0 for v in run["losses"]), (name, run)


def test_every_detection_config_trains_on_two_processes_with_its_amp(tmp_path, monkeypatch):
    import json

    from helpers import DRAW_64, write_fake_coco

    root = write_fake_coco(tmp_path / "d2", {"train2017": (8, 1), "val2017": (4, 2)}, **DRAW_64)
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_run_configs, num_gpus_per_machine=2, dist_url="auto", args=("detection", root, str(tmp_path)))
    summary = json.loads((tmp_path / "detection.json").read_text())
    assert sorted(summary) == sorted(p.stem for p in DET_CONFIGS)
    for name, run in summary.items():
        assert run["world"] == 2, name
        want = "None" if not run["want_amp"] else f"torch.{run['want_amp']}"
        assert run["amp"] == want, (name, run)
        assert len(run["losses"]) == 2 and all(np.isfinite(v) and v > 0 for v in run["losses"]), (name, run)
    for split in ("coco_2017_train", "coco_2017_val"):  # what the Fast R-CNN configs read
        assert (tmp_path / "wrn34_2_rpn" / "inference" / split / "box_proposals.pkl").is_file()
