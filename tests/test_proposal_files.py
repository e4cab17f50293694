"""Proposal files: detectron2's format read through the restricted unpickler."""
import os
import pathlib
import pickle

import numpy as np
import pytest
from helpers import RunsShell

from wrn_det.data.proposals import load_proposal_file, load_proposals_into_dataset, save_proposal_file
from wrn_det.engine.errors import WrnDetError
from wrn_det.engine.safe_pickle import safe_load_pickle


class _OpensFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


class _TouchesPath:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        # pickles as builtins.getattr(PosixPath(...), "touch") followed by a call
        return pathlib.Path(self.target).touch, ()


class _SavesWithNumpy:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return np.save, (self.target, np.zeros(1))


@pytest.mark.parametrize("payload", [RunsShell, _OpensFile, _TouchesPath, _SavesWithNumpy])
def test_pickle_that_would_create_a_file_is_refused_and_nothing_runs(tmp_path, payload):
    # control: plain pickle really does create the file, so the payload is live
    control = tmp_path / "control"
    result = pickle.loads(pickle.dumps(payload(str(control)), protocol=2))
    if hasattr(result, "close"):
        result.close()
    assert control.exists() or (tmp_path / "control.npy").exists()

    target = tmp_path / "pwned"
    # the payload sits inside an otherwise valid proposal dict, after real numpy arrays
    data = {"ids": [1], "boxes": [np.zeros((1, 4), np.float32)], "objectness_logits": [np.zeros(1, np.float32)],
            "bbox_mode": payload(str(target))}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(WrnDetError) as e:
        load_proposal_file(str(path))
    msg = str(e.value)
    assert str(path) in msg and "refused to load global" in msg and "\n" not in msg
    assert not target.exists() and not (tmp_path / "pwned.npy").exists()
    # the same through the dataset loader a user's config goes through
    with pytest.raises(WrnDetError, match="refused"):
        load_proposals_into_dataset([{"image_id": 1}], str(path))
    assert not target.exists()


def test_refusal_names_the_global(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(RunsShell(str(tmp_path / "x"))))
    with pytest.raises(WrnDetError, match=r"refused to load global (posix|nt|os)\.system"):
        safe_load_pickle(str(path))


def test_codecs_encode_admits_latin1_only(tmp_path):
    # Python 3 writes bytes at protocol 2 through _codecs.encode(..., "latin1"): that loads
    path = tmp_path / "bytes.pkl"
    path.write_bytes(pickle.dumps({"ids": [b"img"]}, protocol=2))
    assert safe_load_pickle(str(path)) == {"ids": [b"img"]}
    # the same global asked for another codec is refused
    evil = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R."
    path.write_bytes(evil)
    with pytest.raises(WrnDetError, match="not a readable pickle"):
        safe_load_pickle(str(path))


def _hand_written(path, ids, boxes, logits, mode=0, protocol=2):
    with open(path, "wb") as f:
        pickle.dump({"ids": ids, "boxes": boxes, "objectness_logits": logits, "bbox_mode": mode}, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_hand_written_detectron2_file_loads(tmp_path, protocol):
    path = tmp_path / "props.pkl"
    boxes = [np.array([[0, 0, 10, 10], [5, 5, 20, 30]], np.float64), np.zeros((0, 4), np.float32)]
    logits = [np.array([0.5, 2.0], np.float32), np.zeros(0, np.float32)]
    _hand_written(path, [np.int64(7), 9], boxes, logits, protocol=protocol)
    props = load_proposal_file(str(path))
    assert props["ids"] == [7, 9] and props["bbox_mode"] == 0
    assert props["boxes"][0].dtype == np.float32 and props["boxes"][1].shape == (0, 4)
    np.testing.assert_array_equal(props["boxes"][0], boxes[0])
    dicts = load_proposals_into_dataset([{"image_id": 9}, {"image_id": 7}], str(path))
    # sorted by decreasing objectness, as detectron2 does when loading
    np.testing.assert_array_equal(dicts[1]["proposal_boxes"], boxes[0][::-1])
    np.testing.assert_array_equal(dicts[1]["proposal_objectness_logits"], [2.0, 0.5])
    assert dicts[0]["proposal_boxes"].shape == (0, 4)


def test_xywh_boxes_and_detectron1_key_names(tmp_path):
    path = tmp_path / "d1.pkl"
    with open(path, "wb") as f:
        pickle.dump({"indexes": ["a"], "boxes": [np.array([[1, 2, 3, 4]], np.float32)],
                     "scores": [np.array([1.0], np.float32)], "bbox_mode": 1}, f)
    props = load_proposal_file(str(path))
    np.testing.assert_array_equal(props["boxes"][0], [[1, 2, 4, 6]])
    assert props["ids"] == ["a"]


def test_malformed_files_give_one_line(tmp_path):
    cases = {
        "notpickle.pkl": b"hello world",
        "list.pkl": pickle.dumps([1, 2]),
        "idsint.pkl": pickle.dumps({"ids": 3, "boxes": [], "objectness_logits": []}),
        "nokey.pkl": pickle.dumps({"ids": [1], "boxes": [np.zeros((1, 4))]}),
        "lengths.pkl": pickle.dumps({"ids": [1, 2], "boxes": [np.zeros((1, 4))], "objectness_logits": [np.zeros(1)]}),
        "shape.pkl": pickle.dumps({"ids": [1], "boxes": [np.zeros((1, 5))], "objectness_logits": [np.zeros(1)]}),
        "mode.pkl": pickle.dumps({"ids": [1], "boxes": [np.zeros((1, 4))], "objectness_logits": [np.zeros(1)],
                                  "bbox_mode": 4}),
    }
    expected = {"notpickle.pkl": "not a readable pickle", "list.pkl": "expected a dict",
                "idsint.pkl": "ids is of type int; expected a list",
                "nokey.pkl": "no key 'objectness_logits'", "lengths.pkl": "have 2, 1 and 1 entries",
                "shape.pkl": r"boxes\[0\] has shape \(1, 5\)", "mode.pkl": "bbox_mode 4"}
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(WrnDetError, match=expected[name]) as e:
            load_proposal_file(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WrnDetError, match="not found"):
        load_proposal_file(str(tmp_path / "absent.pkl"))
    good = tmp_path / "good.pkl"
    save_proposal_file(str(good), [1], [np.zeros((1, 4))], [np.zeros(1)])
    with pytest.raises(WrnDetError, match="no proposals for image id 2"):
        load_proposals_into_dataset([{"image_id": 1}, {"image_id": 2}], str(good))


def test_save_writes_atomically_and_round_trips(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "out" / "props.pkl"
    save_proposal_file(str(path), [3, 4], [torch.tensor([[1.0, 2, 3, 4]]), np.zeros((0, 4))],
                       [torch.tensor([0.25]), np.zeros(0)])
    assert sorted(os.listdir(path.parent)) == ["props.pkl"]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's owner-only mode
    props = load_proposal_file(str(path))
    assert props["ids"] == [3, 4]
    np.testing.assert_array_equal(props["boxes"][0], [[1, 2, 3, 4]])
    # readable by plain pickle, as detectron2 reads it
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert set(raw) == {"ids", "boxes", "objectness_logits", "bbox_mode"} and raw["bbox_mode"] == 0


def test_file_written_by_detectron2_loads_and_ours_loads_in_detectron2(tmp_path):
    pytest.importorskip("detectron2")
    import logging

    import torch
    from detectron2.data.build import load_proposals_into_dataset as d2_load
    from detectron2.evaluation.coco_evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    preds = []
    for img_id, n in ((11, 3), (12, 0)):
        inst = Instances((40, 50))
        inst.proposal_boxes = Boxes(torch.rand(n, 4) * 20 + torch.tensor([0.0, 0, 20, 20]))
        inst.objectness_logits = torch.randn(n)
        preds.append({"image_id": img_id, "proposals": inst})

    class _Stub:  # the attributes COCOEvaluator._eval_box_proposals reads
        _output_dir = str(tmp_path)
        _do_evaluation = False
        _logger = logging.getLogger("test")
        _results = {}

    COCOEvaluator._eval_box_proposals(_Stub(), preds)  # detectron2's own writer
    props = load_proposal_file(str(tmp_path / "box_proposals.pkl"))
    assert props["ids"] == [11, 12]
    np.testing.assert_allclose(props["boxes"][0], preds[0]["proposals"].proposal_boxes.tensor.numpy())
    assert props["boxes"][1].shape == (0, 4)

    ours = tmp_path / "ours.pkl"
    save_proposal_file(str(ours), props["ids"], props["boxes"], props["objectness_logits"])
    theirs = d2_load([{"image_id": 12}, {"image_id": 11}], str(ours))
    mine = load_proposals_into_dataset([{"image_id": 12}, {"image_id": 11}], str(ours))
    for a, b in zip(theirs, mine):
        np.testing.assert_array_equal(a["proposal_boxes"], b["proposal_boxes"])
        np.testing.assert_array_equal(a["proposal_objectness_logits"], b["proposal_objectness_logits"])
        assert int(a["proposal_bbox_mode"]) == b["proposal_bbox_mode"]


class _ObjectArrayOverBytes:
    # numpy.ndarray((1,), object, buffer=...) would read the file's bytes as object pointers
    def __reduce__(self):
        return np.ndarray, ((1,), np.dtype(object), b"A" * 8)


class _FloatArrayOverBytes:
    # the same direct call with a plain dtype: still not numpy's unpickling path, so refused
    def __reduce__(self):
        return np.ndarray, ((1,), np.dtype("f8"), b"A" * 8)


class _UnflaggedObjectFieldDtype:
    # a float dtype whose state then claims an object field without the object flag
    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "|", None, ("a",), {"a": (np.dtype(object), 0)}, 8, 1, 0)


class _ArrayOverBytesWithThatDtype:
    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), _UnflaggedObjectFieldDtype(), False, b"A" * 8)


class _StructuredStateDtype:
    # a plain float dtype whose state then turns it into a structured one (of plain fields):
    # the state itself is what is refused
    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("f8"), 0)}, 8, 1, 0)


class _ArrayOverBytesWithStructuredState:
    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), _StructuredStateDtype(), False, b"A" * 8)


@pytest.mark.parametrize("payload, refused", [
    (_ObjectArrayOverBytes, "refused to load dtype 'O8'"),
    (_FloatArrayOverBytes, "refused to load a direct call of numpy.ndarray"),
    # the object field's own dtype is refused before the state that hides it is read
    (_UnflaggedObjectFieldDtype, "refused to load dtype 'O8'"),
    (_ArrayOverBytesWithThatDtype, "refused to load dtype 'O8'"),
    (_StructuredStateDtype, "refused to load a dtype state"),
    (_ArrayOverBytesWithStructuredState, "refused to load a dtype state"),
])
def test_arrays_of_raw_pointers_are_refused(tmp_path, payload, refused):
    # numpy calls that only look like array reconstruction must not yield objects made of the
    # file's raw bytes; run in a child process so that a regression crashes it, not pytest
    import subprocess
    import sys

    path = tmp_path / "ptr.pkl"
    path.write_bytes(pickle.dumps({"ids": [1], "boxes": [payload()], "objectness_logits": [np.zeros(1)]}, protocol=2))
    code = ("import sys; from wrn_det.data.proposals import load_proposal_file\n"
            "from wrn_det.engine.errors import WrnDetError\n"
            "try:\n    load_proposal_file(sys.argv[1])\nexcept WrnDetError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import re

    assert re.search(refused, r.stdout), r.stdout
