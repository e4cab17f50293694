"""tools/evaluate.py and the detections cap: dense scenes, both COCO backends, VOC datasets, bad results files.

The ground truth of the dense case is one 1000x1000 image of 300 boxes in a COCO file without
pixels; a perfect results file (every object at score 1) scores AP 100 once 300 detections per
image are counted, and a third of that at COCO's default cap of 100, with one warning.
"""
import json
import logging

import pytest
from helpers import load_tool, write_coco

from wrn_det.data import catalog

BACKENDS = ["faster_coco_eval", "pycocotools"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Return (COCO file of one image with 300 objects, results file with each object found at score 1)."""
    root = tmp_path_factory.mktemp("dense")
    anns, results = [], []
    for i in range(300):
        box = [(i % 20) * 50.0, (i // 20) * 50.0, 40.0, 40.0]
        anns.append({"id": i + 1, "image_id": 7, "category_id": 3, "bbox": box, "area": 1600.0, "iscrowd": 0})
        results.append({"image_id": 7, "category_id": 3, "bbox": box, "score": 1.0})
    gt = write_coco(root / "trees.json", [{"id": 7, "file_name": "tile.jpg", "height": 1000, "width": 1000}], anns,
                    [{"id": 3, "name": "tree"}])  # no image folder: the evaluation reads no pixels
    res = root / "results.json"
    res.write_text(json.dumps(results))
    return gt, str(res)


def evaluate(argv, capsys):
    """Run tools/evaluate.py in this process as the script does; returns (exit status, stdout, stderr)."""
    from wrn_det.engine import cli_main

    tool = load_tool("evaluate")
    capsys.readouterr()
    try:
        status = cli_main(tool.main, tool.parse_args(argv))
    except SystemExit as e:  # a command line argparse refuses
        status = e.code
    finally:
        logging.getLogger("wrn_det").handlers.clear()  # the tool's warning handler
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_image_scores_100_with_max_dets_300_and_warns_at_the_default_cap(dense, tmp_path, capsys, backend):
    gt, res = dense
    out = tmp_path / "metrics.json"
    status, _, err = evaluate(["--results", res, "--coco-json", gt, "--max-dets", "300", "--backend", backend,
                               "--output", str(out)], capsys)
    assert status == 0, err
    metrics = json.loads(out.read_text())["bbox"]
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP-tree"] == pytest.approx(100.0)
    assert "warning" not in err

    status, _, err = evaluate(["--results", res, "--coco-json", gt, "--backend", backend, "--output", str(out)],
                              capsys)
    assert status == 0, err
    capped = json.loads(out.read_text())["bbox"]
    # 100 of 300 objects found at precision 1: recall reaches 1/3, so 34 of COCO's 101 recall points
    assert capped["AP"] == pytest.approx(100 * 34 / 101)
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1, err
    assert "1 of 1 images" in warnings[0] and "more than 100 objects" in warnings[0]
    assert "raise --max-dets to at least 300" in warnings[0]


def test_tables_name_the_recall_columns_for_the_cap(dense, capsys):
    gt, res = dense
    status, out, err = evaluate(["--results", res, "--coco-json", gt, "--max-dets", "300"], capsys)
    assert status == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| AP "))
    assert [c.strip() for c in header.strip("|").split("|")] == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1",
                                                                  "AR@10", "AR@300"]
    assert "| tree" in out  # the per-category table


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_evaluation_follows_detections_per_image(dense, tmp_path, caplog, backend):
    """The evaluator training builds scores TEST.DETECTIONS_PER_IMAGE detections per image, and says what to raise."""
    import torch

    from wrn_det.data.coco import register_coco_instances
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import build_evaluator
    from wrn_det.engine.config import load_config

    gt, res = dense
    name = f"t_dense_{backend}"
    register_coco_instances(name, gt, str(tmp_path))
    try:
        catalog.DatasetCatalog.get(name)  # as training reads the test set first: the category id map
        results = json.loads(open(res).read())
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)])
        outputs = [{"boxes": boxes, "scores": torch.ones(300), "classes": torch.zeros(300, dtype=torch.long)}]
        aps, warned = {}, {}
        for n in (100, 300):
            cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml", ["TEST.DETECTIONS_PER_IMAGE", str(n),
                                                                       "TEST.COCO_EVAL_BACKEND", backend])
            ev = build_evaluator(cfg, name)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="wrn_det"):
                ev.process([{"image_id": 7}], outputs)
                aps[n] = ev.evaluate()["bbox"]["AP"]
            warned[n] = [r.getMessage() for r in caplog.records if "objects" in r.getMessage()]
    finally:
        catalog.DatasetCatalog.remove(name)
        catalog.MetadataCatalog.remove(name)
    assert aps[300] == pytest.approx(100.0) and aps[100] == pytest.approx(100 * 34 / 101)
    assert warned[300] == [] and len(warned[100]) == 1
    assert "raise TEST.DETECTIONS_PER_IMAGE to at least 300" in warned[100][0]


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"image_id": 7}', "expected a list of detections"),
    ('[{"image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1]}]', "entry 0: has no 'score'; expected {"),
    ('[7]', "entry 0: expected an object"),
    ('[{"image_id": 7, "category_id": 3, "bbox": [0, NaN, 1, 1], "score": 0.5}]',
     "entry 0: bbox [0, nan, 1, 1] is not [x, y, width, height] with finite values"),
    ('[{"image_id": 7, "category_id": 3, "bbox": [0, 0, -2, 1], "score": 0.5}]', "bbox [0, 0, -2, 1] is not"),
    ('[{"image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}, '
     '{"image_id": 8, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}]',
     "entry 1: image_id 8 is not an image of the dataset"),
    ('[{"image_id": "7", "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}]', "image_id '7' is not an image"),
    ('[{"image_id": 7, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 0.5}]',
     "category_id 4 is not a category of the dataset; expected one of its category ids (3)"),
    ('[{"image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1], "score": true}]', "score True is not a finite number"),
])
def test_bad_results_file_is_one_line_naming_the_entry(dense, tmp_path, capsys, content, expected):
    gt, _ = dense
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    status, _, err = evaluate(["--results", str(bad), "--coco-json", gt, "--output", str(tmp_path / "m.json")], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(bad) in lines[0] and expected in lines[0], lines[0]
    assert not (tmp_path / "m.json").exists()


def test_huge_results_file_is_refused_unread(dense, tmp_path, capsys, monkeypatch):
    from wrn_det.detection.evaluation import coco

    gt, res = dense
    monkeypatch.setattr(coco, "MAX_RESULTS_BYTES", 4096)  # the file below is ~30 KB
    status, _, err = evaluate(["--results", res, "--coco-json", gt], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert res in lines[0] and "expected at most 4.0 KiB" in lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "no_such_set"], "--dataset 'no_such_set' is not a registered dataset"),
    (["--coco-json", "/nonexistent/a.json"], "annotation file /nonexistent/a.json not found"),
])
def test_bad_ground_truth_is_one_line(dense, capsys, argv, expected):
    _, res = dense
    status, _, err = evaluate(["--results", res, *argv], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and expected in lines[0], err
