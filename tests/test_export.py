"""tools/export_model.py on the session's trained shapes detector: TorchScript and ONNX (onnxruntime) give the
eager model's detections on images of several sizes, with the class names in the file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_tool

BOX_TOL, SCORE_TOL = 1e-3, 1e-4


def _export(run, fmt, out, capsys):
    from wrn_det.engine.cli import cli_main

    tool = load_tool("export_model")
    argv = ["--config-file", str(run.dir / "config.yaml"), "--format", fmt, "--output", str(out),
            "MODEL.WEIGHTS", run.weights, "MODEL.DEVICE", "cpu"]
    status = cli_main(tool.main, tool.parse_args(argv))
    return status, capsys.readouterr()


@pytest.fixture(scope="module")
def predictor(trained_shapes_detector):
    from wrn_det import Predictor

    run = trained_shapes_detector
    return Predictor(str(run.dir / "config.yaml"), weights=run.weights, device="cpu")


@pytest.fixture(scope="module")
def images(trained_shapes_detector):
    """Held-out images at the test size (64 x 64) and resized copies of other sizes and shapes, RGB (3, H, W)."""
    import cv2

    folder = Path(trained_shapes_detector.datasets_root) / "coco" / "val2017"
    rgb = [cv2.imread(str(p))[:, :, ::-1].copy() for p in sorted(folder.glob("*.jpg"))[5:8]]
    sized = [rgb[0], rgb[1], cv2.resize(rgb[1], (150, 97)), cv2.resize(rgb[2], (80, 128)), cv2.resize(rgb[0], (41, 60))]
    return [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous() for a in sized]


def _assert_same(ref, got, what):
    boxes, scores, classes = (np.asarray(x) for x in got)
    assert len(scores) == len(ref["scores"]) > 0, what
    assert np.abs(boxes - ref["boxes"].numpy()).max() <= BOX_TOL, what
    assert np.abs(scores - ref["scores"].numpy()).max() <= SCORE_TOL, what
    assert (classes == ref["classes"].numpy()).all(), what


def test_torchscript_gives_the_predictors_detections(trained_shapes_detector, predictor, images, tmp_path, capsys):
    status, out = _export(trained_shapes_detector, "torchscript", tmp_path / "model.pt", capsys)
    assert status == 0, out.err
    assert "check torch.jit.load on 2 images" in out.out
    extra = {"wrn_det.json": ""}
    model = torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    meta = json.loads(extra["wrn_det.json"])
    assert meta["thing_classes"] == ["square", "circle", "triangle"]
    assert meta["contiguous_id_to_thing_dataset_id"] == {"0": 1, "1": 2, "2": 3}
    with torch.no_grad():
        for im in images:  # the resize, the pre- and post-processing are inside: any size goes in
            _assert_same(predictor(im), model(im), tuple(im.shape))


def test_onnx_gives_the_eager_models_detections(trained_shapes_detector, predictor, images, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")
    import onnx

    from wrn_det.detection.export import InferenceModel

    status, out = _export(trained_shapes_detector, "onnx", tmp_path / "model.onnx", capsys)
    assert status == 0, out.err
    assert "check onnxruntime on 2 images" in out.out
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(meta["wrn_det"])["thing_classes"] == ["square", "circle", "triangle"]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == [3, "height", "width"]
    eager = InferenceModel(predictor.model, predictor.cfg, float_resize=True)  # the module that was exported
    with torch.no_grad():
        for im in images:
            boxes, scores, classes = eager(im)
            ref = {"boxes": boxes, "scores": scores, "classes": classes}
            _assert_same(ref, session.run(None, {"image": im.numpy()}), tuple(im.shape))
        for im in images[:2]:  # at the test size nothing is resized: the evaluation's own detections
            _assert_same(predictor(im), session.run(None, {"image": im.numpy()}), tuple(im.shape))


def test_export_needs_weights_in_one_line(trained_shapes_detector, tmp_path, capsys):
    from wrn_det.engine.cli import cli_main

    run = trained_shapes_detector
    tool = load_tool("export_model")
    argv = ["--config-file", str(run.dir / "config.yaml"), "--format", "torchscript", "--output",
            str(tmp_path / "m.pt"), "MODEL.WEIGHTS", str(tmp_path / "missing.pth")]
    assert cli_main(tool.main, tool.parse_args(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth" in err[0] and not (tmp_path / "m.pt").exists()
