"""The shipped shapes demo config on detectron2's engine: a few iterations, COCOEvaluator, checkpoints, reloading.

Skipped when detectron2 is not installed (it has no wheel; see the README to build it).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tool_env

pytestmark = pytest.mark.usefixtures("one_thread_module")

pytest.importorskip("detectron2", reason="detectron2 is not installed (build it from source, see the README); "
                                         "the detectron2 engine tests are skipped")

TRAIN_NET = REPO / "tools" / "train_net.py"
DEMO = "shapes_wrn_frcnn.yaml"
SHORT = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
         "DATALOADER.NUM_WORKERS", "0", "SEED", "3"]


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A DETECTRON2_DATASETS root for this module (the shapes data is generated there on first use)."""
    return tmp_path_factory.mktemp("datasets")


def _env(root):
    return tool_env(root)


@pytest.fixture(scope="module")
def trained(datasets_root, tmp_path_factory):
    """Train the demo config for 6 iterations on detectron2's engine and evaluate; returns the output folder."""
    out = tmp_path_factory.mktemp("d2_demo")
    cmd = [sys.executable, "-m", "wrn_det.d2.train", "--config-file", DEMO, *SHORT, "OUTPUT_DIR", str(out)]
    res = subprocess.run(cmd, cwd=str(out), env=_env(datasets_root), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def test_training_iterations_and_coco_evaluation_on_shapes(trained):
    out = trained
    for name in ("config.yaml", "last_checkpoint", "model_final.pth", "model_0000002.pth", "log.txt",
                 "inference/coco_instances_results.json"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    train_rows = [r for r in rows if "total_loss" in r]
    assert train_rows and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in train_rows)
    evals = [r for r in rows if "bbox/AP" in r]
    assert len(evals) == 1  # TEST.EVAL_PERIOD 0: once, after the last iteration
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AP-square", "bbox/AP-circle", "bbox/AP-triangle"):
        assert 0.0 <= evals[0][key] <= 100.0, key
    preds = json.loads((out / "inference/coco_instances_results.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= {1, 2, 3}  # the dataset's own ids, mapped back
    # the config written is the merged one: the WRN of the demo, on the CPU here
    config = (out / "config.yaml").read_text()
    assert "NAME: wrn_10_2" in config and "NAME: build_wrn_fpn_backbone" in config
    log = (out / "log.txt").read_text()
    assert "Evaluation results for bbox" in log


def test_trained_checkpoint_reloads_and_evaluates_identically(trained, datasets_root, tmp_path, monkeypatch):
    """Load model_final.pth into a fresh model (every backbone tensor accounted for) and evaluate on a subset
    registered with wrn_det.d2.register_coco_instances: predictions equal the training run's."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets_root))
    from wrn_det.d2 import WRNDetectionCheckpointer, register_coco_instances
    from wrn_det.d2.train import Trainer, build_config

    val = json.loads((datasets_root / "shapes/annotations/instances_val.json").read_text())
    keep = {im["id"] for im in val["images"][:12]}
    subset = {**val, "images": [im for im in val["images"] if im["id"] in keep],
              "annotations": [a for a in val["annotations"] if a["image_id"] in keep]}
    (tmp_path / "val12.json").write_text(json.dumps(subset))
    name = f"shapes_val12_{os.getpid()}"
    register_coco_instances(name, {}, str(tmp_path / "val12.json"), str(datasets_root / "shapes/val"))

    cfg = build_config(DEMO, [*SHORT, "DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path),
                              "MODEL.WEIGHTS", str(trained / "model_final.pth")])
    model = Trainer.build_model(cfg)
    ckpt = WRNDetectionCheckpointer(model, strict=True)
    ckpt.load(cfg.MODEL.WEIGHTS)
    assert ckpt.last_report["missing"] == [] and ckpt.last_report["loaded"] == ckpt.last_report["total"] > 30
    results = Trainer.test(cfg, model)
    assert "bbox" in results and "AP" in results["bbox"]

    ours = json.loads((tmp_path / "inference/coco_instances_results.json").read_text())
    theirs = [p for p in json.loads((trained / "inference/coco_instances_results.json").read_text())
              if p["image_id"] in keep]
    key = lambda p: (p["image_id"], p["category_id"], round(p["score"], 4))  # noqa: E731
    assert len(ours) == len(theirs) > 0
    for a, b in zip(sorted(ours, key=key), sorted(theirs, key=key)):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert abs(a["score"] - b["score"]) < 1e-4
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-2


def test_train_net_engine_detectron2_dispatches_here(datasets_root, tmp_path):
    # --eval-only with a weights file that does not exist: fails fast, in one line, from wrn_det.d2's config check
    cmd = [sys.executable, str(TRAIN_NET), "--engine", "detectron2", "--config-file", DEMO, "--eval-only",
           "MODEL.WEIGHTS", str(tmp_path / "nope.pth"), "OUTPUT_DIR", str(tmp_path / "out")]
    res = subprocess.run(cmd, cwd=str(tmp_path), env=_env(datasets_root), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [f"error: MODEL.WEIGHTS file '{tmp_path / 'nope.pth'}' does not exist"]


def test_detectron2_checkpoint_in_the_predictor_matches_default_predictor(trained, tmp_path, monkeypatch):
    """The 6-iteration detectron2 model in wrn_det.Predictor (builtin modules, keys mapped, detectron2's anchors)
    gives DefaultPredictor's detections on images at the test size (64 pixels: neither resizes).

    At other sizes the two differ by their resize alone: DefaultPredictor resizes with PIL, the builtin test path
    with torchvision's antialiased resize (the evaluation's).
    """
    import cv2
    from detectron2.engine import DefaultPredictor

    from wrn_det import Predictor
    from wrn_det.d2.train import build_config
    from wrn_det.data import shapes

    weights = str(trained / "model_final.pth")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))  # no dataset is needed to run either
    theirs = DefaultPredictor(build_config(DEMO, ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"]))
    ours = Predictor(DEMO, weights=weights, device="cpu")
    # the detectron2 trainer stores the training set's classes in its checkpoints too
    assert ours.weights["engine"] == "detectron2" and ours.weights["classes_from"] == "checkpoint"
    assert ours.thing_classes == ["square", "circle", "triangle"]
    shapes.generate_split(str(tmp_path), "s64", 4, seed=21, sides=(64,), min_size=12.0, max_frac=0.6, max_objects=4)
    compared = 0
    for path in sorted((tmp_path / "s64").glob("*.jpg")):
        a = theirs(cv2.imread(str(path)))["instances"]
        b = ours(str(path))
        assert len(a) == len(b["scores"]) > 0, path
        # both are sorted by score; ties are ordered alike since the inputs to NMS are the same
        assert (a.pred_boxes.tensor - b["boxes"]).abs().max() <= 1e-3
        assert (a.scores - b["scores"]).abs().max() <= 1e-4
        assert torch.equal(a.pred_classes, b["classes"])
        compared += len(a)
    assert compared > 20


def test_voc_dataset_is_scored_with_the_voc_metric_and_coco_with_the_detection_cap(datasets_root, tmp_path,
                                                                                    monkeypatch):
    """The shapes set as a Pascal VOC folder trains and is scored by detectron2's PascalVOCDetectionEvaluator on
    its engine (as the builtin engine picks its VOC evaluator); COCO evaluation counts TEST.DETECTIONS_PER_IMAGE."""
    from wrn_det.d2.train import Trainer, build_config

    out = tmp_path / "d2_voc"
    opts = [*SHORT, "SOLVER.MAX_ITER", "2", "DATASETS.TRAIN", "('shapes_voc_train',)",
            "DATASETS.TEST", "('shapes_voc_val',)", "OUTPUT_DIR", str(out)]
    cmd = [sys.executable, "-m", "wrn_det.d2.train", "--config-file", DEMO, *opts]
    res = subprocess.run(cmd, cwd=str(tmp_path), env=_env(datasets_root), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    evals = [r for r in rows if "bbox/AP50" in r]
    assert len(evals) == 1 and {"bbox/AP", "bbox/AP50", "bbox/AP75"} <= set(evals[0])
    assert "AP-square" not in " ".join(evals[0])  # detectron2's VOC table, not COCO's per-class AP
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets_root))
    cfg = build_config(DEMO, ["DATASETS.TEST", "('shapes_voc_val',)", "TEST.DETECTIONS_PER_IMAGE", "300"])
    assert type(Trainer.build_evaluator(cfg, "shapes_voc_val")).__name__ == "PascalVOCDetectionEvaluator"
    coco = Trainer.build_evaluator(cfg, "shapes_val", str(tmp_path / "inf"))
    assert type(coco).__name__ == "COCOEvaluator" and coco._max_dets_per_image[-1] == 300
