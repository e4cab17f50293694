"""Our COCO evaluation gives the same numbers as plain pycocotools on a generated results file."""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from wrn_det.data import catalog, coco, shapes
from wrn_det.detection.evaluation import COCOEvaluator, evaluate_coco_results


@pytest.fixture(scope="module")
def gt_and_results(tmp_path_factory):
    """A small shapes split and a results file of jittered, missed, duplicated and false boxes."""
    root = str(tmp_path_factory.mktemp("evalgt"))
    json_file = shapes.generate_split(root, "val", 40, seed=5)
    gt = json.load(open(json_file))
    rng = np.random.default_rng(0)
    results = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # a miss
        x, y, w, h = a["bbox"]
        for _ in range(1 + int(rng.random() < 0.2)):  # sometimes a duplicate
            j = rng.normal(0, 0.08, 4) * [w, h, w, h]
            cat = a["category_id"] if rng.random() < 0.9 else 1 + (a["category_id"] % 3)
            results.append({"image_id": a["image_id"], "category_id": int(cat),
                            "bbox": [float(x + j[0]), float(y + j[1]), float(w + j[2]), float(h + j[3])],
                            "score": float(rng.random())})
    for im in gt["images"][:20]:  # false positives
        results.append({"image_id": im["id"], "category_id": int(rng.integers(1, 4)),
                        "bbox": [5.0, 5.0, 20.0, 15.0], "score": float(rng.random() * 0.5)})
    res_file = os.path.join(root, "results.json")
    with open(res_file, "w") as f:
        json.dump(results, f)
    return json_file, res_file


def plain_pycocotools(json_file, res_file):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        ev = COCOeval(gt, gt.loadRes(res_file), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_same_ap_as_pycocotools(gt_and_results, backend):
    json_file, res_file = gt_and_results
    ref = plain_pycocotools(json_file, res_file)
    ours = evaluate_coco_results(json_file, json.load(open(res_file)), backend)
    for i, k in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        if ref.stats[i] < 0:
            assert np.isnan(ours[k])
        else:
            assert ours[k] == pytest.approx(ref.stats[i] * 100, abs=1e-9), k
    assert 20 < ours["AP"] < 95  # a non-trivial result, so equality means something
    for k, name in enumerate(["square", "circle", "triangle"]):
        p = ref.eval["precision"][:, :, k, 0, -1]
        assert ours[f"AP-{name}"] == pytest.approx(p[p > -1].mean() * 100, abs=1e-9)


def _model_outputs(res_file):
    """Return (inputs, outputs) per image as a detector gives them (XYXY boxes, contiguous classes), from a results file."""
    by_image = {}
    for r in json.load(open(res_file)):
        by_image.setdefault(r["image_id"], []).append(r)
    batches = []
    for img, rs in by_image.items():
        boxes = torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                              for r in rs], dtype=torch.float64)
        batches.append(([{"image_id": img}], [{"boxes": boxes, "scores": torch.tensor([r["score"] for r in rs]),
                                               "classes": torch.tensor([r["category_id"] - 1 for r in rs])}]))
    return batches


def test_evaluator_writes_results_and_maps_ids(gt_and_results, tmp_path):
    json_file, res_file = gt_and_results
    coco.register_coco_instances("t_eval", json_file, os.path.dirname(json_file))
    try:
        from wrn_det.data.coco import load_coco_json

        load_coco_json(json_file, os.path.dirname(json_file), "t_eval")
        ev = COCOEvaluator("t_eval", str(tmp_path))
        for inputs, outputs in _model_outputs(res_file):
            ev.process(inputs, outputs)
        out = ev.evaluate()["bbox"]
    finally:
        catalog.DatasetCatalog.remove("t_eval")
    written = json.load(open(tmp_path / "coco_instances_results.json"))
    assert len(written) == len(json.load(open(res_file)))
    ref = plain_pycocotools(json_file, res_file)
    assert out["AP"] == pytest.approx(ref.stats[0] * 100, abs=1e-3)  # results are rounded to 1e-3 px


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_one_evaluator_serves_every_evaluation_with_the_ground_truth_read_once(gt_and_results, tmp_path, backend):
    """As in a run: one evaluator per test set, reset between evaluations (every TEST.EVAL_PERIOD, the EMA weights)."""
    from wrn_det.data.coco import load_coco_json
    from wrn_det.detection.evaluation.plots import confusion_matrix, read_plot_data

    json_file, res_file = gt_and_results
    own = str(tmp_path / "instances.json")
    shutil.copy(json_file, own)
    name = f"t_reuse_{backend}"
    coco.register_coco_instances(name, own, os.path.dirname(json_file))
    try:
        load_coco_json(own, os.path.dirname(json_file), name)
        ev = COCOEvaluator(name, None, backend)
        os.remove(own)  # read once, when the evaluator was built: the evaluations need the file no more
        metrics = []
        for folder in ("first", "ema"):
            ev.output_dir = str(tmp_path / folder)
            ev.reset()
            for inputs, outputs in _model_outputs(res_file):
                ev.process(inputs, outputs)
            metrics.append(ev.evaluate()["bbox"])
    finally:
        catalog.DatasetCatalog.remove(name)
    assert 20 < metrics[0]["AP"] < 95
    results = json.load(open(tmp_path / "first" / "coco_instances_results.json"))
    assert json.load(open(tmp_path / "ema" / "coco_instances_results.json")) == results
    fresh = evaluate_coco_results(json_file, results, backend)  # the file read anew
    for m in metrics:
        assert m.keys() == fresh.keys()
        assert all(m[k] == fresh[k] or (np.isnan(m[k]) and np.isnan(fresh[k])) for k in m), (m, fresh)
    pictures = [read_plot_data(str(tmp_path / folder / "pr_data.json")) for folder in ("first", "ema")]
    assert pictures[0] == pictures[1]
    assert pictures[0]["confusion"] == confusion_matrix(json_file, results)


def _matched(ours, theirs):
    """Return True when two images' COCO results hold the same detections within the results' rounding."""
    if len(ours) != len(theirs):
        return False
    left = list(theirs)
    for a in ours:
        close = [b for b in left if b["category_id"] == a["category_id"] and abs(a["score"] - b["score"]) <= 1e-5 + 1e-9
                 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) <= 1e-3 + 1e-9]
        if not close:
            return False
        left.remove(close[0])
    return True


def test_batched_evaluation_gives_the_detections_of_one_image_at_a_time(trained_shapes_detector, tmp_path,
                                                                         monkeypatch):
    """TEST.IMS_PER_BATCH 3 on images of four sizes: the results file holds the one-at-a-time detections."""
    from helpers import DRAW_64, SHAPES_DETECTOR_CONFIG, write_fake_coco

    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer
    from wrn_det.engine.config import load_config

    run = trained_shapes_detector
    root = write_fake_coco(tmp_path / "data", {"val2017": (14, 21)}, **dict(DRAW_64, sides=(64, 80)))
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    results, batch_sizes = {}, {}
    for batch in (1, 3):
        out = tmp_path / f"batch{batch}"
        cfg = load_config(get_det_cfg(), SHAPES_DETECTOR_CONFIG, run.opts + [
            "MODEL.WEIGHTS", run.weights, "TEST.IMS_PER_BATCH", str(batch), "OUTPUT_DIR", str(out)])
        trainer = Trainer(cfg, eval_only=True)
        batch_sizes[batch] = [len(b) for b in trainer.test_sets["coco_2017_val"].loader.batch_sampler]
        trainer.test()
        per_image = {}
        for r in json.load(open(out / "inference" / "coco_instances_results.json")):
            per_image.setdefault(r["image_id"], []).append(r)
        results[batch] = per_image
    assert batch_sizes[1] == [1] * 14 and max(batch_sizes[3]) == 3 and sum(batch_sizes[3]) == 14
    assert sum(map(len, results[1].values())) > 20
    assert results[3].keys() == results[1].keys()
    assert all(_matched(results[3][i], results[1][i]) for i in results[1])
