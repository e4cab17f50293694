"""One training state for both trainers: checkpoints written before it still resume, and bad ones are one line.

The two files under ``tests/data/old_checkpoints/`` were written by the trainers as they were before
they shared one checkpoint schema (commit 450a286), on the data and settings these tests rebuild:

* ``classification_model_epoch_0002_00002.pth``: ``ClsTrainer`` with the ``_cls_opts`` below (``wrn_10_1``,
  dropout 0.3, ``SEED -1``, 3 epochs of 4 batches on ``write_synthetic_cifar(n_train=64, n_test=32, seed=5)``),
  stopped by a preemption after batch 2 of epoch 2: keys ``scaler``, ``seed``, ``epoch``, ``batch``,
  ``epoch_sums``, and ``iteration`` counting the iterations done;
* ``detection_model_0000002.pth``: the detection ``Trainer`` with the ``_det_opts`` below (a narrow
  WRN-10-1-FPN, weight EMA, ``SEED -1``) on ``write_fake_coco({"train2017": (8, 11)}, **DRAW_64)``, the
  periodic checkpoint after iteration 2: keys ``grad_scaler``, ``data_seed``, ``ema``, ``ema_updates``,
  ``metadata``.

Both runs were started in a process seeded by ``setup_run``; the preemption came from a
``PreemptionWatch.requested`` that answered True at its sixth call.
"""
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DRAW_64, write_fake_coco

from wrn_det.data.cls_synthetic import write_synthetic_cifar
from wrn_det.engine.checkpoint import write_last_checkpoint
from wrn_det.engine.config import load_config
from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.training import SCHEMA, read_training_checkpoint

OLD = Path(__file__).parent / "data" / "old_checkpoints"

#: the keys every training checkpoint has now, whichever trainer wrote it
COMMON_KEYS = {"schema", "task", "model", "optimizer", "grad_scaler", "ema", "ema_updates", "iteration", "seed",
               "rng_states", "world_size"}


def _old_run(out: Path, source: str, name: str) -> dict:
    """Put the old checkpoint ``source`` into the run folder ``out`` as ``name``; returns its content."""
    out.mkdir(parents=True)
    shutil.copy(OLD / source, out / name)
    write_last_checkpoint(str(out), name)
    return torch.load(out / name, weights_only=True)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cls_opts(root, out):
    return ["MODEL.NAME", "wrn_10_1", "MODEL.DROPOUT", "0.3", "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS",
            "False", "OUTPUT_DIR", str(out), "SEED", "-1", "SOLVER.EPOCHS", "3", "SOLVER.STEPS", "(3,)",
            "SOLVER.IMS_PER_BATCH", "16", "TEST.IMS_PER_BATCH", "32", "LOG_PERIOD", "1"]


def test_classification_checkpoint_of_the_old_schema_resumes_and_finishes(tmp_path, one_thread):
    from wrn_det.classification import ClsTrainer, get_cls_cfg

    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=64, n_test=32, seed=5)
    out = tmp_path / "run"
    old = _old_run(out, "classification_model_epoch_0002_00002.pth", "model_epoch_0002_00002.pth")
    assert "scaler" in old and "schema" not in old and old["iteration"] == 6  # what the old trainer wrote
    trainer = ClsTrainer(load_config(get_cls_cfg(), None, _cls_opts(root, out)))
    # epoch 2 continues at its batch 3: iterations 0..5 were done
    assert trainer.resume_or_load(resume=True) == 6
    assert (trainer.start_epoch, trainer.start_batch) == (2, 2)
    assert trainer.seed == old["seed"]  # the run's own seed (it was drawn: SEED -1), not a new one
    assert _same_tensors(trainer.model.state_dict(), old["model"])
    momentum = {k: v["momentum_buffer"] for k, v in trainer.optimizer.state_dict()["state"].items()}
    assert momentum and all(torch.equal(v, old["optimizer"]["state"][k]["momentum_buffer"]) for k, v in momentum.items())
    assert trainer.best_top1_err == old["best_top1_err"] and torch.equal(trainer.start_sums, old["epoch_sums"][0])

    last = trainer.train()
    assert last["epoch"] == 3 and (out / "model_final.pth").is_file()
    new = torch.load(out / "model_epoch_0003.pth", weights_only=True)
    assert COMMON_KEYS <= new.keys() and "scaler" not in new
    assert (new["schema"], new["task"], new["iteration"], new["seed"]) == (SCHEMA, "classification", 11, old["seed"])
    assert new["epoch"] == 3 and "config" in new

    # --eval-only --resume: the newest checkpoint of the run folder, evaluated as the run's last epoch was
    evaluation = ClsTrainer(load_config(get_cls_cfg(), None, _cls_opts(root, out)), eval_only=True)
    assert evaluation.resume_or_load(resume=True) == 12
    res = evaluation.test()
    assert res["weights"] == str(out / "model_epoch_0003.pth") and res["test_top1_err"] == last["test_top1_err"]
    assert (out / "eval_metrics.json").is_file()


def _det_opts(out):
    return ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "SOLVER.MOMENTUM", "0.0", "SOLVER.IMS_PER_BATCH", "2",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MIN_SIZE_TEST", "64", "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "()",
            "SEED", "-1", "SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(6,)", "SOLVER.WARMUP_ITERS", "2",
            "SOLVER.CHECKPOINT_PERIOD", "3", "LOG_PERIOD", "1", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.9",
            "OUTPUT_DIR", str(out)]


def test_detection_checkpoint_of_the_old_schema_resumes_and_finishes(tmp_path, monkeypatch, one_thread):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer

    monkeypatch.setenv("DETECTRON2_DATASETS", write_fake_coco(tmp_path / "data", {"train2017": (8, 11)}, **DRAW_64))
    out = tmp_path / "run"
    old = _old_run(out, "detection_model_0000002.pth", "model_0000002.pth")
    assert "data_seed" in old and "schema" not in old and old["iteration"] == 2  # what the old trainer wrote
    trainer = Trainer(load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", _det_opts(out)))
    assert trainer.resume_or_load(resume=True) == 3
    assert trainer.seed == old["data_seed"]  # the data stream goes on with the run's drawn seed
    assert _same_tensors(trainer.model.state_dict(), old["model"])
    assert trainer.ema.num_updates == old["ema_updates"] == 3 and _same_tensors(trainer.ema.state_dict(), old["ema"])

    trainer.train()
    new = torch.load(out / "model_final.pth", weights_only=True)
    assert COMMON_KEYS <= new.keys() and "data_seed" not in new
    assert (new["schema"], new["task"], new["iteration"], new["seed"]) == (SCHEMA, "detection", 7, old["data_seed"])
    assert new["ema_updates"] == 8  # the old average's 3 updates and the 5 iterations after it
    assert new["metadata"] == old["metadata"]

    # --eval-only --resume with MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY: the newest checkpoint's EMA weights
    cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", _det_opts(out) + [
        "DATASETS.TEST", "('coco_2017_train',)", "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", "True"])
    evaluation = Trainer(cfg, eval_only=True)
    assert evaluation.resume_or_load(resume=True) == 8
    assert _same_tensors(evaluation.model.state_dict(), new["ema"])
    assert "AP" in evaluation.test()["bbox"] and (out / "inference" / "coco_instances_results.json").is_file()


def test_unusable_checkpoints_are_one_line(tmp_path):
    cls = torch.load(OLD / "classification_model_epoch_0002_00002.pth", weights_only=True)
    path = str(tmp_path / "model_epoch_0002_00002.pth")
    torch.save(cls, path)
    with pytest.raises(WrnDetError, match=r"is a checkpoint of 'classification' training; this run is detection$"):
        read_training_checkpoint(path, "detection")
    assert read_training_checkpoint(path, "classification")["grad_scaler"] == {}  # the old "scaler"
    torch.save({**cls, "schema": SCHEMA + 1}, path)
    with pytest.raises(WrnDetError, match=f"has checkpoint schema {SCHEMA + 1}; this wrn_det reads schemas up to"):
        read_training_checkpoint(path, "classification")
    torch.save({"model": cls["model"]}, path)  # weights only: model_final.pth of the classification trainer
    with pytest.raises(WrnDetError, match="is not a training checkpoint of this engine .it lacks optimizer, iteration"):
        read_training_checkpoint(path, "classification")
