"""Trainer behaviour: a diverging run stops cleanly, learning-rate steps reset momentum, --eval-only."""
import json

import pytest
import torch

from helpers import cls_cfg, load_tool

from wrn_det.classification import ClsTrainer, NonFiniteLossError
from wrn_det.data.cls_synthetic import write_synthetic_cifar
from wrn_det.engine.cli import cli_main



@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_synthetic_cifar(str(tmp_path_factory.mktemp("cls_data")), n_train=128, n_test=64, seed=9)


def _opts(root, out, *extra):
    return ["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False",
            "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", "32", "TEST.IMS_PER_BATCH", "64", "LOG_PERIOD", "1", *extra]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root, one_thread):
    out = tmp_path / "run"
    # epoch 1 trains normally; the "step" at epoch 2 multiplies the rate by 1e30 and the loss blows up
    cfg = cls_cfg(_opts(data_root, out, "SOLVER.EPOCHS", "3", "SOLVER.STEPS", "(2,)", "SOLVER.GAMMA", "1e30"))
    with pytest.raises(NonFiniteLossError, match=r"became (nan|inf) at epoch 2, iteration \d/4 .*model_epoch_0001.pth"):
        ClsTrainer(cfg).train()
    assert (out / "last_checkpoint").read_text().strip() == "model_epoch_0001.pth"
    assert not (out / "model_epoch_0002.pth").exists() and not (out / "model_final.pth").exists()
    rows = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    good = torch.load(out / "model_epoch_0001.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())


def test_learning_rate_step_resets_momentum(tmp_path, data_root, one_thread):
    trainer = ClsTrainer(cls_cfg(_opts(data_root, tmp_path / "run", "SOLVER.EPOCHS", "3", "SOLVER.STEPS", "(2,)")))
    trainer.train_one_epoch(1)
    assert len(trainer.optimizer.state) > 0
    seen = []
    loader = trainer.train_loader

    class Spy:
        def set_epoch(self, e, start_batch=0):
            loader.set_epoch(e, start_batch)

        def __iter__(self):
            for i, batch in enumerate(loader):
                if i == 0:  # before the epoch's first step
                    seen.append([len(trainer.optimizer.state)])
                if i == 1:  # the rate the first step used
                    seen[-1].append(trainer.optimizer.param_groups[0]["lr"])
                yield batch

    trainer.train_loader = Spy()
    trainer.train_one_epoch(2)   # a step epoch: momentum buffers cleared before its first iteration
    trainer.train_one_epoch(3)   # not a step: buffers carried over
    assert seen[0] == [0, pytest.approx(0.02)] and seen[1][0] > 0 and seen[1][1] == pytest.approx(0.02)


def test_eval_only_reproduces_the_final_test_error(tmp_path, data_root, one_thread, capsys):
    tool = load_tool("train_cls")
    run = tmp_path / "run"
    assert cli_main(tool.main, tool.parse_args(_opts(data_root, run, "SOLVER.EPOCHS", "1"))) == 0
    last = json.loads((run / "metrics.json").read_text().splitlines()[-1])
    ev = tmp_path / "eval"
    assert cli_main(tool.main, tool.parse_args(["--eval-only", *_opts(data_root, ev, "MODEL.WEIGHTS", str(run / "model_final.pth"))])) == 0
    res = json.loads((ev / "eval_metrics.json").read_text())
    assert res["test_top1_err"] == pytest.approx(last["test_top1_err"]) and res["test_loss"] == pytest.approx(last["test_loss"])
    capsys.readouterr()
    assert cli_main(tool.main, tool.parse_args(["--eval-only", *_opts(data_root, tmp_path / "none")])) == 2
    assert "MODEL.WEIGHTS" in capsys.readouterr().err



def test_imagenet_folder_run_end_to_end(tmp_path, one_thread):
    from wrn_det.data.cls_synthetic import synthetic_stripes, write_image_folder

    x, y = synthetic_stripes(24, num_classes=3, seed=2)
    for split, n in (("train", 24), ("val", 9)):
        write_image_folder(str(tmp_path / "imagenet" / split), x[:n], y[:n], ["n01", "n02", "n03"])
    out = tmp_path / "run"
    # the ImageNet path (ImageFolder, DataLoader workers, RandomResizedCrop, the ImageNet configs' colour
    # jitter and lighting) with a small ResNet and crops
    cfg = cls_cfg(["MODEL.NAME", "wide_resnet18_1", "MODEL.NUM_CLASSES", "3", "DATASETS.NAME", "imagenet",
                "INPUT.COLOR_JITTER", "[0.4, 0.4, 0.4]", "INPUT.LIGHTING_STD", "0.1",
                "DATASETS.ROOT", str(tmp_path / "imagenet"), "INPUT.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
                "INPUT.PIXEL_STD", "[58.395, 57.12, 57.375]", "INPUT.TRAIN_CROP_SIZE", "32", "INPUT.TEST_RESIZE", "36",
                "INPUT.TEST_CROP_SIZE", "32", "DATALOADER.NUM_WORKERS", "1", "SOLVER.IMS_PER_BATCH", "8",
                "SOLVER.EPOCHS", "2", "SOLVER.STEPS", "(2,)", "TEST.IMS_PER_BATCH", "4", "OUTPUT_DIR", str(out)])
    trainer = ClsTrainer(cfg)
    assert trainer.iters_per_epoch == 3 and trainer.train_loader.num_images == 24
    last = trainer.train()
    assert last["epoch"] == 2 and (out / "model_final.pth").is_file()
    # every one of the 9 validation images was scored once: errors are multiples of 1/9
    assert round(last["test_top1_err"] * 9 / 100, 6) == round(last["test_top1_err"] * 9 / 100)
