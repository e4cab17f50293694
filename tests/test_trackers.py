"""Experiment trackers (LOGGERS): MLflow and W&B runs hold the run's params and metrics, a resumed run logs into
the same tracker run, only the main process logs, and a tracker that cannot run is one line before anything is
written. Everything offline: MLflow's local stores, W&B's offline mode (read back from its own run files)."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from helpers import DRAW_64, REPO, TINY_DET, cls_cfg, write_fake_coco

from wrn_det.engine.config import flatten_config, load_config
from wrn_det.engine.errors import ConfigError, Preempted
from wrn_det.engine.events import read_metrics


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline, its caches and settings in the test's folder, no MLflow or W&B settings from outside."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_CONSOLE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home" / sub))


def _numbers(rows):
    """Return {key: {step: value}} of the numbers of metrics.json rows (the iteration is the step)."""
    out = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                out.setdefault(k, {})[row["iteration"]] = v
    return out


def _wandb_records(path):
    """Yield the records of a W&B run file (``run-<id>.wandb``): LevelDB-log blocks of wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def _key(item):
    return item.key or "/".join(item.nested_key)


def _wandb_run(folder):
    """Return what the W&B run files under ``folder/wandb`` hold: run ids, config, {key: {step: value}}, summary."""
    ids, config, history, summary = [], {}, {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))):
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.append(r.run.run_id)
                config.update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                for i in r.history.item:
                    k = i.key or i.nested_key[0]
                    if k.startswith("_"):
                        continue
                    v = json.loads(i.value_json)
                    if len(i.nested_key) > 1:  # a field of an image: {"path": ..., "format": ...}
                        history.setdefault(k, {}).setdefault(r.history.step.num, {})[i.nested_key[1]] = v
                    else:
                        history.setdefault(k, {})[r.history.step.num] = v
            elif kind == "summary":
                summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return ids, config, history, summary


def _det_cfg(out, max_iter):
    from wrn_det.detection.config import get_det_cfg

    return load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", TINY_DET + [
        "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "SEED", "3", "LOG_PERIOD", "1",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1", "TEST.EVAL_PERIOD", "2",
        "LOGGERS", "('mlflow', 'wandb', 'tensorboard')", "OUTPUT_DIR", str(out)])


def test_detection_run_in_mlflow_file_store_and_wandb_offline_and_resumed_into_the_same_runs(
        tmp_path, monkeypatch, offline_trackers, one_thread):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from wrn_det.detection.train import Trainer
    from wrn_det.engine.preempt import PreemptionWatch

    monkeypatch.setenv("DETECTRON2_DATASETS", write_fake_coco(tmp_path / "data", {"train2017": (8, 11),
                                                                                  "val2017": (3, 12)}, **DRAW_64))
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())  # MLflow's file store, where the user points it
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it behind this switch
    out = tmp_path / "run"
    cfg = _det_cfg(out, 6)

    # the first part is preempted after its third iteration (index 2), with a checkpoint
    calls = []
    # the flag is read once an iteration at LOG_PERIOD 1 (as a signal would set it)
    monkeypatch.setattr(PreemptionWatch, "flag", property(lambda self: calls.append(1) or len(calls) == 3))
    with pytest.raises(Preempted):
        Trainer(cfg).train()
    client = MlflowClient(tracking_uri=store.as_uri())
    run_id = json.loads((out / "tracker_runs.json").read_text())["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert "bbox/AP" in client.get_run(run_id).data.metrics  # the evaluation after iteration 1

    monkeypatch.setattr(PreemptionWatch, "flag", property(lambda self: False))
    trainer = Trainer(cfg)
    assert trainer.resume_or_load(resume=True) == 3
    trainer.train()

    # MLflow: one run, finished, holding the config and every number of metrics.json at its iteration
    exp = client.get_experiment_by_name("wrn_det")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = {k: str(v) for k, v in flatten_config(cfg).items()}
    assert run.data.params == params and params["MODEL.WRN.NAME"] == "wrn_10_1"
    assert run.data.tags["final_checkpoint"] == str(out / "model_final.pth")
    rows = read_metrics(str(out))
    expected = _numbers(rows)
    assert {"total_loss", "lr", "bbox/AP", "bbox/AP50"} <= expected.keys()
    assert set(run.data.metrics) == set(expected)
    for key, by_step in expected.items():
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == pytest.approx(by_step), key
    assert sorted(expected["total_loss"]) == [0, 1, 2, 3, 4, 5]  # both parts, one series
    assert sorted(expected["bbox/AP"]) == [1, 3, 5]

    # W&B: two offline run folders of one run id (a later `wandb sync` makes them one run), with the
    # same config, the same numbers at the same steps, the evaluation pictures and the final checkpoint
    ids, config, history, summary = _wandb_run(str(out))
    assert ids == [json.loads((out / "tracker_runs.json").read_text())["wandb"]["run_id"]] * 2
    assert {k: config[k] for k in params} == {k: json.loads(json.dumps(v)) for k, v in flatten_config(cfg).items()}
    pictures = {k for k in history if k.startswith("inference/")}
    numbers = {k: v for k, v in history.items() if k not in pictures}
    assert numbers.keys() == expected.keys()
    for key, by_step in expected.items():
        assert numbers[key] == pytest.approx(by_step), key
    assert {"inference/pr_curves", "inference/ap_per_class", "inference/confusion_matrix"} <= pictures
    assert sorted(history["inference/pr_curves"]) == [1, 3, 5]
    assert history["inference/pr_curves"][5]["_type"] == "image-file"
    images = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "images" / "inference" / "*.png"))
    assert any(os.path.basename(p).startswith("pr_curves_5_") for p in images)
    assert summary["final_checkpoint"] == str(out / "model_final.pth")
    assert glob.glob(str(out / "events.out.tfevents.*"))  # TensorBoard beside them


def test_classification_run_in_mlflows_default_store_in_the_run_folder(tmp_path, offline_trackers, one_thread):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from wrn_det.classification import ClsTrainer
    from wrn_det.data.cls_synthetic import write_synthetic_cifar

    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=64, n_test=32, seed=9)
    out = tmp_path / "cls"
    cfg = cls_cfg(["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False",
                   "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", "32", "TEST.IMS_PER_BATCH", "32",
                   "SOLVER.EPOCHS", "2", "LOGGERS", "('mlflow',)"])
    ClsTrainer(cfg).train()
    assert (out / "mlflow.db").is_file() and not glob.glob(str(out / "events.out.tfevents.*"))
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "tracker_runs.json").read_text())["mlflow"]["run_id"])
    assert run.data.params["SOLVER.EPOCHS"] == "2" and run.data.params["LOGGERS"] == "['mlflow']"
    rows = read_metrics(str(out))
    for key in ("test_top1_err", "train_loss", "epoch", "n_parameters"):  # at the epoch, classification's step
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert logged == pytest.approx({r["epoch"]: r[key] for r in rows}), key
    assert run.data.tags["final_checkpoint"] == str(out / "model_final.pth") and run.info.status == "FINISHED"


def test_a_logger_that_cannot_run_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    from wrn_det.classification import ClsTrainer

    def build(loggers):
        cfg = cls_cfg(["MODEL.NAME", "wrn_10_1", "OUTPUT_DIR", str(tmp_path / "out"), "LOGGERS", loggers])
        ClsTrainer(cfg)

    with pytest.raises(ConfigError, match=r"^LOGGERS: unknown logger 'comet'; expected some of tensorboard, mlflow, "
                                          r"wandb"):
        build("('tensorboard', 'comet')")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"^LOGGERS names 'wandb' but the wandb package is not installed: "
                                          r"pip install wandb \(or pip install -e '.\[trackers\]'\)$"):
        build("('wandb',)")
    assert not (tmp_path / "out").exists()


def test_only_the_main_process_logs(tmp_path, monkeypatch, offline_trackers):
    pytest.importorskip("mlflow")
    from wrn_det.engine import comm
    from wrn_det.engine.events import MetricsWriter

    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    with MetricsWriter(str(tmp_path), ("mlflow", "wandb", "tensorboard"), config={"A": 1}) as w:
        w.write({"loss": 1.0}, step=0)
        assert w.trackers == []
    assert os.listdir(tmp_path) == []


def test_trackers_are_imported_only_when_loggers_name_them():
    code = ("import sys, wrn_det, wrn_det.detection.train, wrn_det.classification.trainer, wrn_det.engine.trackers;"
            "from wrn_det.engine.events import MetricsWriter;"
            "print(sorted(m for m in ('mlflow', 'wandb') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
