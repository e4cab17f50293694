"""tools/export_model.py on the session's trained shapes detector: TorchScript and ONNX (onnxruntime) give the
eager model's detections on images of several sizes, with the class names in the file. Detections are compared
as a user would (by class and IoU, borderline ones allowed to differ), and a detector of COCO's size whose
scores crowd the threshold exports and passes its check."""
import json
import re
from pathlib import Path
from typing import List, NamedTuple

import numpy as np
import pytest
import torch
from helpers import REPO, load_tool

BOX_TOL, SCORE_TOL = 1e-3, 1e-4


def _export(run, fmt, out, capsys, *extra):
    from wrn_det.engine.cli import cli_main

    tool = load_tool("export_model")
    argv = ["--config-file", str(run.dir / "config.yaml"), "--format", fmt, "--output", str(out), *extra,
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


def test_hub_folder_is_read_back_and_checked_before_it_is_put_in_place(trained_shapes_detector, tmp_path, capsys,
                                                                       monkeypatch):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e '.[hub]')")
    pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (pip install -e '.[hub]')")
    import wrn_det.engine.weights_file as weights_file

    run = trained_shapes_detector
    val = sorted((Path(run.datasets_root) / "coco" / "val2017").glob("*.jpg"))[:2]
    check = ["--check-image", *map(str, val)]
    folder = tmp_path / "hub"
    status, out = _export(run, "hub", folder, capsys, *check)
    assert status == 0, out.err
    found = re.search(r"check Predictor.from_pretrained on 2 images: (\d+) of (\d+) detections of PyTorch found, "
                      r"boxes within 0 px, scores within 0$", out.out.strip())
    assert found and found[1] == found[2] and int(found[1]) > 0, out.out
    # weights that do not come back as they went (here: box deltas scaled) are refused, the folder left as it was
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    writer = weights_file.safetensors_writer

    def moved_boxes(tensors, **fields):
        tensors = dict(tensors)
        key = next(k for k in tensors if k.endswith("bbox_pred.weight"))
        tensors[key] = tensors[key] * 1.5
        return writer(tensors, **fields)

    monkeypatch.setattr(weights_file, "safetensors_writer", moved_boxes)
    status, out = _export(run, "hub", folder, capsys, *check)
    assert status == 2
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "the hub folder export disagrees with the PyTorch model" in err[0], out.err
    assert "nothing was written" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------ comparing detections as a user would

LIMITS = dict(score_thresh=0.05, nms_thresh=0.5, detections_per_image=100)


def _dets(*rows):
    """(boxes, scores, classes) of rows (x1, y1, x2, y2, score, class)."""
    a = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return a[:, :4], a[:, 4], a[:, 5].astype(np.int64)


def _match(ref, got, **kw):
    from wrn_det.detection.export import match_detections

    return match_detections(_dets(*ref), _dets(*got), **{**LIMITS, **kw})


A, B, C = (10, 10, 110, 90, 0.9, 1), (200, 50, 260, 170, 0.40000, 2), (300, 300, 340, 380, 0.40001, 2)


def test_detections_are_matched_by_class_and_iou_whatever_their_order():
    nudged = [(*r[:4], r[4] + d, r[5]) for r, d in ((C, -2e-5), (B, 2e-5), (A, 0))]  # the near tie in score swaps
    m = _match([A, C, B], nudged)
    assert m["ok"] and m["matched"] == 3 and m["count"] == (3, 3) and not m["borderline"]
    assert m["max_score"] == pytest.approx(2e-5) and m["max_box"] == 0
    # the same box under another class is another detection
    m = _match([A], [(*A[:5], 3)])
    assert not m["ok"] and len(m["unexplained"]) == 2


def test_a_detection_at_the_score_threshold_may_be_missing_but_not_a_clear_one():
    at = (400, 100, 450, 160, 0.05004, 5)
    m = _match([A, B, at], [A, B])
    assert m["ok"] and m["matched"] == 2
    assert [(d["side"], d["class"]) for d in m["borderline"]] == [("ref", 5)]
    assert "at the threshold 0.05" in m["borderline"][0]["why"]
    # clear of the threshold by more than the score tolerance: it must be there
    m = _match([A, B, at], [A, B], score_tol=1e-5)
    assert not m["ok"] and m["unexplained"][0]["score"] == pytest.approx(0.05004)
    m = _match([A, B, (400, 100, 450, 160, 0.3, 5)], [A, B])
    assert not m["ok"] and "no detection of its class" in m["unexplained"][0]["why"]


def test_a_box_off_by_more_than_the_tolerance_is_reported_with_its_difference():
    moved = (A[0] + 2, *A[1:])
    m = _match([A, B], [moved, B])
    assert not m["ok"] and m["matched"] == 1
    assert {d["side"] for d in m["unexplained"]} == {"ref", "got"}
    assert "boxes off by 2 px" in m["unexplained"][0]["why"]
    assert _match([A, B], [moved, B], box_tol=2.5)["ok"]


def test_nms_ties_and_what_they_knock_on_are_borderline():
    # two boxes of one class at IoU 0.6 with scores within the tolerance: NMS keeps either
    p, p2 = (0, 0, 100, 100, 0.6, 4), (25, 0, 125, 100, 0.60005, 4)
    # a box at IoU 0.38 with p and 0.67 with p2: kept with p, suppressed with p2
    q = (45, 0, 145, 100, 0.3, 4)
    m = _match([A, B, C, p, q], [A, B, C, p2])
    assert m["ok"] and m["matched"] == 3
    why = {(d["side"], d["score"]): d["why"] for d in m["borderline"]}
    assert "NMS tie" in why[("ref", 0.6)] and "NMS tie" in why[("got", 0.60005)]
    assert "overlaps" in why[("ref", 0.3)] and "borderline" in why[("ref", 0.3)]
    # another box of its class in its place, scoring otherwise: a tie among the RPN's proposals (not in the outputs)
    m = _match([A, B, C, p, q], [A, B, C, (*p2[:4], 0.7, 4)])
    assert m["ok"] and any("another box of its class in its place (at IoU" in d["why"] for d in m["borderline"])
    # ties are the exception: not when they would explain as many detections as agree or more
    for got in ([A, p2], [A, (*p2[:4], 0.7, 4)]):
        m = _match([A, p, q], got)
        assert not m["ok"] and "not ties" in m["unexplained"][0]["why"]
    # IoU at the NMS threshold: a box suppressed by one model and kept by the other
    r, s = (0, 0, 100, 100, 0.8, 6), (0, 0, 200, 100, 0.3, 6)  # IoU 0.5
    m = _match([r, s], [r])
    assert m["ok"] and "at the NMS threshold" in m["borderline"][0]["why"]


def test_the_last_of_a_full_list_may_differ():
    rows = [(i * 20, 0, i * 20 + 15, 15, 0.9 - i * 0.005, 7) for i in range(99)]
    last_ref, last_got = (0, 500, 30, 530, 0.4, 8), (0, 600, 30, 630, 0.40002, 9)
    m = _match(rows + [last_ref], rows + [last_got])
    assert m["ok"] and m["matched"] == 99 and len(m["borderline"]) == 2
    assert all("last of the 100" in d["why"] for d in m["borderline"])
    # a list that is not full has no such cut
    assert not _match(rows[:50] + [last_ref], rows[:50] + [last_got])["ok"]


def test_check_detections_refuses_an_export_that_moves_boxes():
    from wrn_det.detection.export import check_detections
    from wrn_det.engine.errors import WrnDetError

    ref = _dets(A, B, C)
    shifted = (ref[0] * 1.01, ref[1], ref[2])
    images = [torch.zeros(3, 8, 8, dtype=torch.uint8)]
    summary = check_detections("ONNX", lambda im: ref, lambda im: ref, images, LIMITS)
    assert summary["matched"] == summary["detections"] == 3 and summary["borderline"] == []
    with pytest.raises(WrnDetError, match=r"the ONNX export disagrees with the PyTorch model on a \(3, 8, 8\) image: "
                                          r"3 of PyTorch's 3 detections and 3 of the export's 3 have no counterpart "
                                          r"within 0.01 px and 0.001 in score .*boxes off by 1.1 px.*nothing was "
                                          r"written$"):
        check_detections("ONNX", lambda im: shifted, lambda im: ref, images, LIMITS)


# ------------------------------------------------------------------ a COCO-size detector, scores at the threshold

# wrn34_2_frcnn.yaml (80 classes, FPN p2-p6, test size 800/1333, 1000 proposals) on a narrower network
COCO_SIZE = ["MODEL.WRN.NAME", "wide_resnet18_1", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
             "MODEL.DEVICE", "cpu"]


class CocoSize(NamedTuple):
    weights: str
    photo: str            # a photo-like 480 x 640 JPEG
    opts: List[str]       # COCO_SIZE, the weights and the score threshold
    threshold: float
    detections: tuple     # (boxes, scores, classes) of the PyTorch module ONNX exports (float resize) on the photo


@pytest.fixture(scope="module")
def coco_size(tmp_path_factory):
    """A detector of COCO's size whose scores crowd the threshold on a photo-like image, one of them just above it.

    Random weights made to act as a detector (``benchmarks/export_parity.py``'s ``near_threshold_detector``);
    the score threshold is then put 2e-5 under one detection's score, about what the ONNX model's
    scores differ by from PyTorch's, so that whether it is kept depends on the export's rounding.
    """
    import importlib.util

    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.export import InferenceModel
    from wrn_det.detection.modeling import build_detector
    from wrn_det.detection.predictor import image_to_tensor
    from wrn_det.engine.config import load_config
    from wrn_det.engine.fileio import atomic_save

    spec = importlib.util.spec_from_file_location("export_parity", REPO / "benchmarks" / "export_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    import bench_utils  # beside it, on the path it set

    folder = tmp_path_factory.mktemp("coco_size")
    photo = bench_utils.write_photo_jpegs(str(folder / "photos"), [(480, 640)], seed=3)[0]
    image = image_to_tensor(photo, "RGB")
    cfg = load_config(get_det_cfg(), "wrn34_2_frcnn.yaml", COCO_SIZE)
    assert (cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (80, 800, 1333)
    ckpt = parity.near_threshold_detector(cfg, [image], seed=0, above=70)
    weights = str(folder / "detector.pth")
    atomic_save(ckpt, weights)
    model = build_detector(cfg).eval()
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        boxes, scores, classes = InferenceModel(model, cfg, float_resize=True)(image)
    assert 20 <= len(scores) < 100 and (scores < 0.06).sum() >= 10  # a crowd at the threshold (0.05), no cap
    threshold = float(scores.sort().values[len(scores) // 4]) - 2e-5
    # the detections at the raised threshold: the same NMS (it only removes boxes below the threshold)
    keep = scores > threshold
    return CocoSize(weights, photo, COCO_SIZE + ["MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
                                                 repr(threshold)], threshold,
                    (boxes[keep], scores[keep], classes[keep]))


def _export_coco_size(det, fmt, out, capsys, *extra):
    from wrn_det.engine.cli import cli_main

    tool = load_tool("export_model")
    argv = ["--config-file", "wrn34_2_frcnn.yaml", "--format", fmt, "--output", str(out), *extra, *det.opts]
    status = cli_main(tool.main, tool.parse_args(argv))
    return status, capsys.readouterr()


def test_coco_size_onnx_export_with_scores_at_the_threshold_is_written_and_checked(coco_size, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")
    from wrn_det.detection.export import match_detections

    ref, thresh = coco_size.detections, coco_size.threshold
    at = [k for k, s in enumerate(ref[1].tolist()) if s - thresh < 1e-4]
    assert at, "no detection at the threshold"
    path = tmp_path / "model.onnx"
    status, out = _export_coco_size(coco_size, "onnx", path, capsys, "--check-image", coco_size.photo)
    assert status == 0, out.err
    assert path.stat().st_size > 10 * 2 ** 20
    found = re.search(r"check onnxruntime on 1 images: (\d+) of (\d+) detections of PyTorch found, boxes within "
                      r"(\S+) px, scores within (\S+?)(; (\d+) borderline|$)", out.out.strip())
    assert found, out.out
    matched, total, border = int(found[1]), int(found[2]), int(found[6] or 0)
    assert total == len(ref[1]) and matched + border >= total
    assert 0 < float(found[4]) <= 1e-3  # onnxruntime rounds otherwise than PyTorch, within the tolerance

    # a detection at the threshold may be missing from an export, a clear one may not
    limits = dict(score_thresh=thresh, nms_thresh=0.5, detections_per_image=100)
    keep = [k for k in range(len(ref[1])) if k != at[0]]
    m = match_detections(ref, [x[keep] for x in ref], **limits)
    assert m["ok"] and [d["index"] for d in m["borderline"]] == [at[0]]
    clear = int(ref[1].argmax())
    keep = [k for k in range(len(ref[1])) if k != clear]
    m = match_detections(ref, [x[keep] for x in ref], **limits)
    assert not m["ok"] and m["unexplained"][0]["score"] == pytest.approx(float(ref[1].max()))


def test_export_summary_names_the_borderline_detections(coco_size, tmp_path, capsys, monkeypatch):
    import wrn_det.detection.export as export

    def fake_export(wrapper, path, metadata, images=None):
        Path(path).write_bytes(b"")
        near = {"side": "ref", "index": 7, "class": 12, "score": 0.05001, "box": [1, 2, 3, 4],
                "why": "score 0.05001 at the threshold 0.05"}
        return {"path": path, "check": {"images": 1, "detections": 90, "matched": 89, "max_box": 1e-4,
                                        "max_score": 2e-5, "borderline": [(0, near)]}}

    monkeypatch.setattr(export, "export_torchscript", fake_export)
    status, out = _export_coco_size(coco_size, "torchscript", tmp_path / "m.pt", capsys)
    assert status == 0, out.err
    assert ("89 of 90 detections of PyTorch found, boxes within 0.0001 px, scores within 2e-05; 1 borderline (at the "
            "score threshold, the per-image limit or a tie in NMS), allowed to differ: image 1, PyTorch's class 12 score "
            "0.05001 (score 0.05001 at the threshold 0.05)") in out.out
