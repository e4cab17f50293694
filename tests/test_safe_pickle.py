"""Hostile pickles against the one restricted unpickler, for both kinds of plain pickle the project reads.

Proposal files (``wrn_det.data.proposals.load_proposal_file``) and detectron2 weight pickles
(``wrn_det.models.convert.read_d2_pickle``, which the detectron2 engine's checkpointer uses)
are attacked with the same files: a global that runs code, a direct ``numpy.ndarray`` call
over the file's bytes, a dtype state that hides an object field, an object-dtype array, and
a length field larger than the file. Each is read in a child process through ``cli_main``
(as the tools run): one ``error:`` line naming the file and what was refused, exit status 2,
nothing created, and no crash (a crash would show as a negative exit status).
"""
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import DRAW_64, REPO, RunsShell, run_tool, tool_env, write_fake_coco

READERS = {
    "proposal file": ("wrn_det.data.proposals", "load_proposal_file"),
    "detectron2 weights file": ("wrn_det.models.convert", "read_d2_pickle"),
}


class _NdarrayOverBytes:
    # numpy.ndarray((1,), float, buffer=...) is not numpy's unpickling path: refused whatever the dtype
    def __reduce__(self):
        return np.ndarray, ((1,), np.dtype("f8"), b"A" * 8)


class _StateDtype:
    # a float dtype whose state then turns it into a structured one with ``field``, its flags 0
    # (numpy would then read the array's raw bytes as the field's objects)
    def __init__(self, field):
        self.field = field

    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "|", None, ("a",), {"a": (self.field, 0)}, 8, 0, 0)


class _ArrayWithStateDtype:
    def __init__(self, field):
        self.field = field

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), _StateDtype(self.field), False, b"A" * 8)


def _object_array() -> np.ndarray:
    a = np.empty(2, dtype=object)
    a[0], a[1] = "x", 1
    return a


def _payload(kind: str, attack, target) -> dict:
    """A valid-looking file of ``kind`` with ``attack`` inside."""
    if kind == "proposal file":
        return {"ids": [1], "boxes": [attack], "objectness_logits": [np.zeros(1, np.float32)], "bbox_mode": 0}
    return {"model": {"stem.conv1.weight": attack}, "__author__": "wrn_det", "matching_heuristics": True}


def _length_bomb(path) -> None:
    # a BINUNICODE8 string announcing 2**40 bytes in a file of a few bytes
    path.write_bytes(b"\x80\x04" + b"\x8d" + struct.pack("<Q", 2 ** 40) + b"x.")


ATTACKS = {
    "code": ("global posix.system", lambda t: RunsShell(t)),
    "ndarray_call": ("a direct call of numpy.ndarray", lambda t: _NdarrayOverBytes()),
    # the hidden object field's own dtype is refused before the state that hides it is read
    "hidden_object_field": ("dtype 'O8'", lambda t: _ArrayWithStateDtype(np.dtype(object))),
    "structured_state": ("a dtype state", lambda t: _ArrayWithStateDtype(np.dtype("f8"))),
    "object_array": ("dtype 'O8'", lambda t: _object_array()),
    "length_field": ("cannot be unpickled (it announces a record of 1099511627776 bytes", None),
}


def _read_in_child(module: str, func: str, path) -> subprocess.CompletedProcess:
    code = (f"import sys\nfrom {module} import {func}\nfrom wrn_det.engine import cli_main\n"
            f"sys.exit(cli_main({func}, sys.argv[1]))\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], env=tool_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("kind", list(READERS))
def test_hostile_pickle_is_one_line_exit_2_and_runs_nothing(tmp_path, kind, attack):
    refused, make = ATTACKS[attack]
    target = tmp_path / "pwned"
    path = tmp_path / "hostile.pkl"
    if make is None:
        _length_bomb(path)
    else:
        path.write_bytes(pickle.dumps(_payload(kind, make(str(target)), target), protocol=2))
    res = _read_in_child(*READERS[kind], path)
    assert res.returncode == 2, (res.returncode, res.stderr)  # not a crash, not a traceback
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {kind} {path}: "), res.stderr
    assert refused in lines[0] and "nothing from it was run" in lines[0], lines[0]
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pkl"]


def test_plain_files_of_both_kinds_still_load(tmp_path):
    from wrn_det.data.proposals import load_proposal_file
    from wrn_det.models.convert import read_d2_pickle

    arrays = {"boxes": [np.zeros((2, 4), np.float32)], "objectness_logits": [np.ones(2, np.float32)], "ids": [7]}
    for protocol in (2, 4, 5):
        (tmp_path / "p.pkl").write_bytes(pickle.dumps(arrays, protocol=protocol))
        assert load_proposal_file(str(tmp_path / "p.pkl"))["ids"] == [7]
        weights = {"model": {"stem.conv1.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}, "__author__": "x"}
        (tmp_path / "w.pkl").write_bytes(pickle.dumps(weights, protocol=protocol))
        np.testing.assert_array_equal(read_d2_pickle(str(tmp_path / "w.pkl"))["model"]["stem.conv1.weight"],
                                      weights["model"]["stem.conv1.weight"])


def test_hostile_proposal_file_through_train_net(tmp_path):
    """The builtin engine's Fast R-CNN reads the proposal file before training: one line, exit 2, nothing run."""
    root = write_fake_coco(tmp_path / "root", {"train2017": (2, 1)}, **DRAW_64)
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_payload("proposal file", RunsShell(str(target)), target), protocol=2))
    res = run_tool("train_net", "--config-file", "shapes_wrn_fast_rcnn.yaml", "MODEL.DEVICE", "cpu",
                   "MODEL.WRN.NAME", "wrn_10_1", "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "()",
                   "DATASETS.PROPOSAL_FILES_TRAIN", f"('{evil}',)", "DATASETS.PROPOSAL_FILES_TEST", "()",
                   "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out"), datasets_root=root)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to load global posix.system" in lines[0] and str(evil) in lines[0], res.stderr
    assert not target.exists()


def test_hostile_weights_through_detectron2_eval_only(tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (build it from source, see the README)")
    target = tmp_path / "pwned"
    for attack in ("code", "hidden_object_field"):
        refused, make = ATTACKS[attack]
        evil = tmp_path / f"{attack}.pkl"
        evil.write_bytes(pickle.dumps(_payload("detectron2 weights file", make(str(target)), target), protocol=2))
        res = run_tool("train_net", "--engine", "detectron2", "--eval-only", "--config-file", "shapes_wrn_frcnn.yaml",
                       "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(evil), "OUTPUT_DIR", str(tmp_path / "out"),
                       datasets_root=tmp_path / "root")
        assert res.returncode == 2, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and refused in lines[0], res.stderr[-2000:]
        assert str(evil) in lines[0]
    assert not target.exists()
