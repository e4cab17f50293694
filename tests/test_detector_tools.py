"""What a user does with a trained detector: tools/demo.py, tools/visualize_data.py, the evaluation's pictures and
progress, and their redrawing by tools/plot_logs.py; on the session's trained shapes detector."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_tool


def _run(name, argv, capsys):
    from wrn_det.engine.cli import cli_main

    tool = load_tool(name)
    status = cli_main(tool.main, tool.parse_args(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _val_images(run, n):
    folder = Path(run.datasets_root) / "coco" / "val2017"
    return sorted(folder.glob("*.jpg"))[:n]


def test_demo_draws_each_image_writes_json_and_names_an_unreadable_one(trained_shapes_detector, tmp_path, capsys):
    from wrn_det import Predictor

    run = trained_shapes_detector
    images = _val_images(run, 3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    out, js = tmp_path / "pictures", tmp_path / "detections.json"
    argv = ["--config-file", str(run.dir / "config.yaml"), "--input", str(images[0]), str(bad),
            str(images[1].parent / "00000[12].jpg"), "MODEL.WEIGHTS", run.weights, "--output", str(out),
            "--json", str(js), "--confidence-threshold", "0.5"]
    status, stdout, err = _run("demo", argv, capsys)
    assert status == 1, err  # one input failed, the others were done
    lines = [line for line in err.strip().splitlines() if line]
    assert lines == [f"error: image file {bad} cannot be read: not a readable image (skipped)"], err
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    picture = _png(out / "000001.png")
    assert picture.shape[0] >= 512 and picture.shape[0] % 64 == 0  # enlarged 64-pixel image, labels readable
    results = json.loads(js.read_text())
    predictor = Predictor(str(run.dir / "config.yaml"), weights=run.weights, device="cpu")
    expected = []
    for image_id, path in zip((0, 2, 3), images):  # image ids count the inputs, the unreadable one (1) included
        pred = predictor(str(path))
        keep = pred["scores"] >= 0.5
        expected += [(image_id, str(path), int(c), round(float(s), 5))
                     for c, s in zip(pred["category_ids"][keep], pred["scores"][keep])]
    got = [(r["image_id"], r["file_name"], r["category_id"], r["score"]) for r in results]
    assert got == expected and len(got) > 5
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] > 0 for r in results)
    assert "3 of 4 images" in stdout and "1 failed" in stdout


def test_demo_missing_weights_is_one_line_exit_2(trained_shapes_detector, tmp_path, capsys):
    run = trained_shapes_detector
    argv = ["--config-file", str(run.dir / "config.yaml"), "--input", str(_val_images(run, 1)[0]),
            "--output", str(tmp_path / "o"), "MODEL.WEIGHTS", str(tmp_path / "nope.pth")]
    status, _, err = _run("demo", argv, capsys)
    assert status == 2
    assert err.strip().splitlines() == [f"error: MODEL.WEIGHTS: checkpoint file '{tmp_path / 'nope.pth'}' does not exist"]
    assert not (tmp_path / "o").exists()


def test_visualize_annotations_and_predictions(trained_shapes_detector, tmp_path, capsys, monkeypatch):
    from wrn_det.detection.visualize import ERROR_COLOUR

    run = trained_shapes_detector
    monkeypatch.setenv("DETECTRON2_DATASETS", run.datasets_root)
    cfg = str(run.dir / "config.yaml")
    status, stdout, err = _run("visualize_data", ["--config-file", cfg, "--source", "annotation", "--num", "3",
                                                  "--output", str(tmp_path / "gt")], capsys)
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "gt").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    gt_picture = _png(tmp_path / "gt" / "000000.png")
    status, stdout, err = _run("visualize_data", ["--config-file", cfg, "--source", "prediction", "--num", "4",
                                                  "--run", str(run.dir), "--output", str(tmp_path / "pred"),
                                                  "--errors-only"], capsys)
    assert status == 0, err
    pictures = sorted((tmp_path / "pred").iterdir())
    assert len(pictures) == 4 and "coco_2017_val (prediction)" in stdout
    both = _png(pictures[0])
    assert both.shape[1] > 2 * gt_picture.shape[1] - 50  # ground truth and predictions side by side
    # --errors-only: every picture shows a false positive or a missed object, drawn in the error colour
    for p in pictures:
        assert (np.abs(_png(p).astype(int) - ERROR_COLOUR).sum(axis=2) == 0).sum() > 50, p


def test_mistakes_are_marked_as_coco_matches_them(trained_shapes_detector):
    from wrn_det.detection.visualize import match_detections

    json_file = Path(trained_shapes_detector.datasets_root) / "coco/annotations/instances_val2017.json"
    data = json.loads(json_file.read_text())
    img = next(im["id"] for im in data["images"] if sum(a["image_id"] == im["id"] for a in data["annotations"]) >= 2)
    first, second = [a for a in data["annotations"] if a["image_id"] == img][:2]
    wrong = 1 + second["category_id"] % 3  # another class than the second object's
    results = [{"image_id": img, "category_id": first["category_id"], "bbox": first["bbox"], "score": 0.9},  # a hit
               {"image_id": img, "category_id": first["category_id"], "bbox": [0.0, 0.0, 3.0, 3.0], "score": 0.8},
               {"image_id": img, "category_id": wrong, "bbox": second["bbox"], "score": 0.7},  # right place, wrong class
               {"image_id": img, "category_id": second["category_id"], "bbox": second["bbox"], "score": 0.2}]  # too low
    gt, dt = match_detections(str(json_file), results, threshold=0.5)
    flags = [bool(a.get("fp")) for a in sorted(dt.imgToAnns[img], key=lambda a: -a["score"])]
    assert flags == [False, True, True]
    missed = {a["id"]: bool(a.get("fn")) for a in gt.imgToAnns[img]}
    assert missed[first["id"]] is False and missed[second["id"]] is True
    gt, dt = match_detections(str(json_file), results, threshold=0.1)  # now the right class counts
    assert not any(a.get("fn") for a in gt.imgToAnns[img])


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"image_id": 1}', "expected a list of detections"),
    ('[{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]', "image_id 99999 is not an image"),
    ('[{"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 0.5}]', "category_id 7 is not a category"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 0.5}]', "bbox [0, 0, -1, 1] is not"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": NaN}]', "score nan is not a finite number"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}]', "is not [x, y, width, height]"),
])
def test_hostile_results_file_is_one_line_exit_2(trained_shapes_detector, tmp_path, capsys, monkeypatch,
                                                 content, expected):
    run = trained_shapes_detector
    monkeypatch.setenv("DETECTRON2_DATASETS", run.datasets_root)
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "coco_instances_results.json").write_text(content)
    status, _, err = _run("visualize_data", ["--config-file", str(run.dir / "config.yaml"), "--source", "prediction",
                                             "--run", str(tmp_path), "--output", str(tmp_path / "o")], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "coco_instances_results.json" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_evaluation_draws_curves_and_confusion_matrix_and_plot_redraws_them(trained_shapes_detector, tmp_path, capsys):
    """The session run's final evaluation left its pictures in inference/; tools/plot_logs.py draws them again."""
    import shutil

    from wrn_det.detection.evaluation.plots import PLOT_FILES, read_plot_data

    run = trained_shapes_detector
    inference = run.dir / "inference"
    for name in PLOT_FILES:
        assert min(_png(inference / name).shape[:2]) >= 200, name
    data = read_plot_data(str(inference / "pr_data.json"))
    assert data["classes"] == ["square", "circle", "triangle"] and len(data["recall"]) == 101
    # the curves are the evaluation's: COCO AP50 is the mean over classes and recall points of the IoU 0.5 curves
    ap50 = np.mean([np.mean(c) for c in data["precision"]["0.5"]]) * 100
    assert ap50 == pytest.approx(run.results["bbox"]["AP50"], abs=1e-6)
    assert [round(a, 6) for a in data["ap"]] == [round(run.results["bbox"][f"AP-{c}"], 6) for c in data["classes"]]
    matrix = np.asarray(data["confusion"]["matrix"])
    n_objects = len(json.loads((Path(run.datasets_root) / "coco/annotations/instances_val2017.json").read_text())
                    ["annotations"])
    # every object is either matched (by a detection of some class) or missed
    assert matrix[:, :3].sum() + matrix[:, 4].sum() == n_objects and np.trace(matrix[:, :3]) > 0.7 * n_objects
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns("*.pth", "*.png"))
    status, _, err = _run("plot_logs", [str(copy)], capsys)
    assert status == 0, err
    assert (copy / "curves.png").is_file()
    assert all((copy / "inference" / name).is_file() for name in PLOT_FILES)


def test_pictures_of_eighty_classes_keep_every_name_inside_the_picture(tmp_path):
    """COCO's 80 classes, some with long names: all four pictures are drawn and no text runs off an edge."""
    from wrn_det.detection.evaluation.plots import PLOT_FILES, redraw
    from wrn_det.engine.fileio import write_json

    rng = np.random.default_rng(0)
    k = 80
    classes = [("a much longer class name " if i % 7 == 0 else "") + f"class {i}" for i in range(k)]
    curves = {t: [sorted(rng.random(101).tolist(), reverse=True) for _ in range(k)] for t in ("0.5", "0.75")}
    for t in curves:
        curves[t][5] = None  # a class without objects
    ap = [float(rng.random() * 100) for _ in range(k)]
    ap[5] = None
    write_json(str(tmp_path / "pr_data.json"), {
        "classes": classes, "recall": np.linspace(0, 1, 101).tolist(), "precision": curves, "ap": ap,
        "confusion": {"matrix": rng.integers(0, 5, (k, k + 2)).tolist(), "score": 0.5, "iou": 0.5}})
    written = redraw(str(tmp_path))
    assert [Path(p).name for p in written] == list(PLOT_FILES)
    for path in written:
        img = _png(path)
        edges = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3),
                                img[:, -3:].reshape(-1, 3)])
        assert (edges == 255).all(), path  # a name or label cut by the edge would leave its pixels there
        assert (img < 128).any(axis=2).mean() > 0.002, path  # and something is drawn
    # one panel per class: 8 columns of 3 inches, 10 rows of 2.6 inches at 100 dpi
    assert _png(written[1]).shape[:2] == (2600, 2400)


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(classes=[]), "'classes' must be a non-empty list"),
    (lambda d: d["precision"]["0.5"].pop(), "must hold one curve per class (3)"),
    (lambda d: d["precision"]["0.75"][0].__setitem__(5, 7.0), "precision values must lie in [0, 1]"),
    (lambda d: d.update(ap=[1.0, None, float("nan")]), "'ap' must hold one AP in [0, 100]"),
    (lambda d: d["confusion"]["matrix"][0].append(1), "confusion['matrix'] must be 3 rows of 5"),
])
def test_hostile_plot_data_is_one_line(trained_shapes_detector, tmp_path, edit, expected):
    from wrn_det.detection.evaluation.plots import read_plot_data
    from wrn_det.engine.errors import WrnDetError

    data = json.loads((trained_shapes_detector.dir / "inference" / "pr_data.json").read_text())
    edit(data)
    path = tmp_path / "pr_data.json"
    path.write_text(json.dumps(data))
    with pytest.raises(WrnDetError) as e:
        read_plot_data(str(path))
    assert expected in str(e.value) and str(path) in str(e.value)


class _Slow(torch.nn.Module):
    def forward(self, inputs):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "classes": torch.zeros(0, dtype=torch.int64)}
                for _ in inputs]


class _Evaluator:
    dataset_name = "fake_set"

    def reset(self):
        self.n = 0

    def process(self, inputs, outputs):
        self.n += len(inputs)

    def evaluate(self):
        return {"n": self.n}


def test_evaluation_progress_log_lines_and_terminal_bar(monkeypatch, caplog, capsys):
    from wrn_det.detection.evaluation import evaluator as evaluation

    loader = [[{"image_id": i}] for i in range(6)]
    monkeypatch.setattr(evaluation, "PROGRESS_LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="wrn_det"):
        assert evaluation.inference_on_dataset(_Slow(), loader, _Evaluator()) == {"n": 6}
    progress = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert progress[0].startswith("inference on fake_set: 1/6 images") and len(progress) == 5  # not after the last

    def bar(total, desc, unit="it"):  # what progress_bar returns on a terminal, written where capsys sees it
        import sys

        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0)

    from wrn_det.engine import progress

    monkeypatch.setattr(progress, "progress_bar", bar)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wrn_det"):
        evaluation.inference_on_dataset(_Slow(), loader, _Evaluator())
    assert not [r for r in caplog.records if "ETA" in r.getMessage()]
    err = capsys.readouterr().err
    assert "inference on fake_set" in err and "6/6" in err
