"""The VOC evaluator gives detectron2's PascalVOCDetectionEvaluator's numbers on the same detections, both metrics.

The ground truth is a VOC tree of annotation files written here (no pixels: the evaluation
reads none), with difficult objects; the detections are jittered, missed, duplicated,
misclassified and false boxes with float32 corners and scores, some of them tied. Where
detectron2 can be imported, both evaluators see the same detections; everywhere, the
numbers detectron2 gave once are checked.
"""
import json
import logging
import math

import numpy as np
import pytest
import torch
from helpers import load_tool

from wrn_det.data import catalog, voc
from wrn_det.detection.evaluation import VOCEvaluator, evaluate_voc_results, read_coco_results
from wrn_det.detection.evaluation.voc import VOCGroundTruth

CLASSES = ("cat", "dog", "person")

# What detectron2's PascalVOCDetectionEvaluator returned on these detections (AP, AP50, AP75), with the
# per-class AP50 from its voc_eval on the same text files: detectron2 0.6 (commit 02b5c4e2) built from source in
# a second venv (/work/d2venv, which also sees this project's packages; numpy 2.4.6), printed by
# test_same_numbers_as_detectron2_itself when run from the repository root as
#   PYTHONPATH=. /work/d2venv/bin/python -m pytest -q -p no:xdist tests/test_voc_eval.py -k detectron2_itself -s
D2_NUMBERS = {
    2007: {"AP": 42.00046400211019, "AP50": 66.96104002911922, "AP75": 53.05567507662113,
           "AP50-cat": 68.73141125631433, "AP50-dog": 58.57035756090488, "AP50-person": 73.58135127013846},
    2012: {"AP": 41.909338695005246, "AP50": 68.51084485999877, "AP75": 52.9705962280265,
           "AP50-cat": 71.7300897347682, "AP50-dog": 57.28675520101638, "AP50-person": 76.51568964421173},
}


def _tree(folder):
    """Write a VOC tree of 40 images of 3 classes (some objects difficult) at ``folder`` (test split); returns it."""
    rng = np.random.default_rng(2007)
    ids = []
    (folder / "Annotations").mkdir(parents=True)
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    for i in range(40):
        w, h = int(rng.integers(200, 500)), int(rng.integers(200, 500))
        objects = []
        for _ in range(int(rng.integers(1, 7))):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            objects.append({"name": CLASSES[int(rng.integers(0, 3))], "bbox": [x0, y0, x0 + bw, y0 + bh],
                            "difficult": int(rng.random() < 0.15)})
        fid = f"2007_{i:06d}"
        voc.write_voc_annotation(str(folder / "Annotations" / f"{fid}.xml"), w, h, objects)
        ids.append(fid)
    (folder / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in ids))
    return folder


def _detections(dicts):
    """Return per image (image id, boxes float32 (N, 4) XYXY, scores float32 (N,), classes int64 (N,))."""
    rng = np.random.default_rng(12)
    out = []
    for d in dicts:
        boxes, scores, classes = [], [], []
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            size = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
            for copy in range(1 + int(rng.random() < 0.2)):  # sometimes a duplicate
                if copy == 0 and rng.random() < 0.15:
                    continue  # a miss
                boxes.append(np.array([x0, y0, x1, y1]) + rng.normal(0, 0.06 + 0.1 * copy, 4) * size)
                k = a["category_id"] if rng.random() < 0.9 else (a["category_id"] + 1) % 3
                classes.append(k)
                scores.append(0.5 if rng.random() < 0.1 else rng.random())  # some scores tie
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x0, y0 = rng.uniform(0, d["width"] - 30), rng.uniform(0, d["height"] - 30)
            boxes.append(np.array([x0, y0, x0 + rng.uniform(8, 30), y0 + rng.uniform(8, 30)]))
            classes.append(int(rng.integers(0, 3)))
            scores.append(rng.random() * 0.6)
        out.append((d["image_id"], np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                    np.array(classes, np.int64)))
    return out


@pytest.fixture(scope="module")
def voc_case(tmp_path_factory):
    """Return (folder, dicts, detections) of the test's VOC tree, registered as ``t_voc_2007`` and ``t_voc_2012``."""
    folder = _tree(tmp_path_factory.mktemp("voceval") / "VOC2007")
    for year in (2007, 2012):
        voc.register_pascal_voc(f"t_voc_{year}", str(folder), "test", year, CLASSES)
    dicts = catalog.DatasetCatalog.get("t_voc_2007")
    yield folder, dicts, _detections(dicts)
    for year in (2007, 2012):
        catalog.DatasetCatalog.remove(f"t_voc_{year}")
        catalog.MetadataCatalog.remove(f"t_voc_{year}")


def ours(name, detections, output_dir=None):
    ev = VOCEvaluator(name, output_dir)
    for iid, boxes, scores, classes in detections:
        ev.process([{"image_id": iid}], [{"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                                          "classes": torch.from_numpy(classes)}])
    return ev.evaluate()["bbox"]


def test_dicts_follow_detectron2s_conventions(voc_case):
    folder, dicts, _ = voc_case
    assert [d["image_id"] for d in dicts] == [f"2007_{i:06d}" for i in range(40)]
    assert dicts[0]["file_name"] == str(folder / "JPEGImages" / "2007_000000.jpg")
    text = (folder / "Annotations" / "2007_000000.xml").read_text()
    first = dicts[0]["annotations"][0]
    xmin = int(text.split("<xmin>")[1].split("<")[0])
    assert first["bbox"][0] == xmin - 1 and first["bbox_mode"] == 0  # VOC's 1-based corner minus one, XYXY
    assert any(a["difficult"] for d in dicts for a in d["annotations"])  # difficult objects are kept


@pytest.mark.parametrize("year", [2007, 2012])
def test_same_numbers_as_detectron2_recorded(voc_case, year):
    _, _, detections = voc_case
    got = ours(f"t_voc_{year}", detections)
    want = D2_NUMBERS[year]
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert 20 < got["AP"] < 90 and got["AP50"] > got["AP75"] > got["AP"] - 30  # a non-trivial result


@pytest.mark.parametrize("year", [2007, 2012])
def test_same_numbers_as_detectron2_itself(voc_case, year, tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is not installed; the recorded numbers are checked instead")
    from detectron2.data import MetadataCatalog as D2MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc as d2_register
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval
    from detectron2.structures import Boxes, Instances

    folder, _, detections = voc_case
    name = f"t_d2_voc_{year}"
    if name not in D2MetadataCatalog.list():
        d2_register(name, str(folder), "test", year, CLASSES)
    ev = PascalVOCDetectionEvaluator(name)
    ev.reset()
    for iid, boxes, scores, classes in detections:
        inst = Instances((1000, 1000), pred_boxes=Boxes(torch.from_numpy(boxes)), scores=torch.from_numpy(scores),
                         pred_classes=torch.from_numpy(classes))
        ev.process([{"image_id": iid}], [{"instances": inst}])
    theirs = {k: float(v) for k, v in ev.evaluate()["bbox"].items()}
    # detectron2 does not return the per-class AP50: its voc_eval gives it, on the same text files
    lines = {k: [] for k in range(len(CLASSES))}
    for iid, boxes, scores, classes in detections:
        for (x0, y0, x1, y1), s, c in zip(boxes, scores.tolist(), classes.tolist()):
            lines[c].append(f"{iid} {s:.3f} {x0 + 1:.1f} {y0 + 1:.1f} {x1:.1f} {y1:.1f}")
    for k, cls in enumerate(CLASSES):
        (tmp_path / f"{cls}.txt").write_text("\n".join(lines[k]))
        _, _, ap = voc_eval(str(tmp_path / "{}.txt"), str(folder / "Annotations" / "{}.xml"),
                            str(folder / "ImageSets" / "Main" / "test.txt"), cls, 0.5, use_07_metric=year == 2007)
        theirs[f"AP50-{cls}"] = float(ap * 100)
    print(f"detectron2, {year}: {theirs!r}")
    got = ours(f"t_voc_{year}", detections)
    for k, v in theirs.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def _results_file(path, detections, class_ids):
    """Write ``detections`` in COCO results form (full float32 precision) with ``class_ids[k]`` as category ids."""
    out = []
    for iid, boxes, scores, classes in detections:
        for (x0, y0, x1, y1), s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
            out.append({"image_id": iid, "category_id": class_ids[c], "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    path.write_text(json.dumps(out))
    return str(path)


def run_evaluate(argv, capsys):
    """Run tools/evaluate.py in this process; returns (exit status, stdout, stderr)."""
    from wrn_det.engine import cli_main

    tool = load_tool("evaluate")
    capsys.readouterr()
    try:
        status = cli_main(tool.main, tool.parse_args(argv))
    finally:
        logging.getLogger("wrn_det").handlers.clear()
    out = capsys.readouterr()
    return status, out.out, out.err


def test_evaluate_tool_on_voc_2007_test_gives_detectron2s_numbers(voc_case, tmp_path, capsys, monkeypatch):
    """The builtin voc_2007_test over the same tree (its 20 classes; the 17 without objects are left out)."""
    folder, _, detections = voc_case
    monkeypatch.setenv("DETECTRON2_DATASETS", str(folder.parent))
    res = _results_file(tmp_path / "dets.json", detections, [1 + voc.VOC_CLASSES.index(c) for c in CLASSES])
    status, out, err = run_evaluate(["--results", res, "--dataset", "voc_2007_test", "--output",
                                     str(tmp_path / "m.json")], capsys)
    assert status == 0, err
    got = json.loads((tmp_path / "m.json").read_text())["bbox"]
    for k, v in D2_NUMBERS[2007].items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert math.isnan(got["AP50-boat"])  # no boat in the tree: NaN, and not in the mean
    assert "VOC2007 metric (11-point AP)" in out
    headers = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    assert headers[0] == ["AP", "AP50", "AP75"] and headers[2] == ["category", "AP50"] * 3
    pairs = {row[i]: row[i + 1] for row in headers[3:] for i in range(0, len(row), 2) if row[i]}
    assert pairs["cat"] == f"{D2_NUMBERS[2007]['AP50-cat']:.3f}" and pairs["boat"] == "nan" and len(pairs) == 20

    status, _, err = run_evaluate(["--results", res, "--dataset", "voc_2007_test", "--max-dets", "300"], capsys)
    assert status == 2 and err.count("\n") == 1 and "--max-dets applies to COCO evaluation" in err, err


def test_results_file_of_the_evaluator_reads_back_to_the_same_numbers(voc_case, tmp_path):
    _, dicts, detections = voc_case
    got = ours("t_voc_2012", detections, str(tmp_path))
    path = tmp_path / "coco_instances_results.json"
    entries = json.loads(path.read_text())
    assert {e["image_id"] for e in entries} <= {d["image_id"] for d in dicts}  # the VOC file ids
    by_image = read_coco_results(str(path), {d["image_id"] for d in dicts}, {1, 2, 3})
    again = evaluate_voc_results(VOCGroundTruth(dicts, CLASSES), [r for rs in by_image.values() for r in rs], 2012)
    for k in got:
        assert again[k] == pytest.approx(got[k], abs=0.05), k  # the file rounds boxes to 1e-3 and scores to 1e-5


def test_class_without_objects_is_nan_and_left_out_of_the_mean(voc_case):
    folder, _, detections = voc_case
    voc.register_pascal_voc("t_voc_boat", str(folder), "test", 2012, CLASSES + ("boat",))
    try:
        boats = [(iid, boxes, scores, np.full_like(classes, 3)) for iid, boxes, scores, classes in detections[:5]]
        got = ours("t_voc_boat", detections + boats)
    finally:
        catalog.DatasetCatalog.remove("t_voc_boat")
        catalog.MetadataCatalog.remove("t_voc_boat")
    assert math.isnan(got["AP50-boat"])
    for k, v in D2_NUMBERS[2012].items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_difficult_objects_are_neither_found_nor_missed(tmp_path):
    """One image: a found object, a difficult one (found or not, the AP stays 100), a false detection."""
    folder = tmp_path / "VOCd"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    voc.write_voc_annotation(str(folder / "Annotations" / "a.xml"), 100, 100, [
        {"name": "cat", "bbox": [10, 10, 40, 40]}, {"name": "cat", "bbox": [60, 60, 90, 90], "difficult": 1}])
    (folder / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    voc.register_pascal_voc("t_voc_difficult", str(folder), "test", 2012, CLASSES)
    try:
        def ap(boxes, scores):
            return ours("t_voc_difficult", [("a", np.array(boxes, np.float32), np.array(scores, np.float32),
                                             np.zeros(len(boxes), np.int64))])["AP50-cat"]

        assert ap([[10, 10, 40, 40]], [0.9]) == pytest.approx(100.0)
        assert ap([[10, 10, 40, 40], [60, 60, 90, 90]], [0.9, 0.95]) == pytest.approx(100.0)  # difficult: ignored
        assert ap([[10, 10, 40, 40], [0, 50, 20, 70]], [0.9, 0.95]) == pytest.approx(50.0)  # a false one first
    finally:
        catalog.DatasetCatalog.remove("t_voc_difficult")
        catalog.MetadataCatalog.remove("t_voc_difficult")
