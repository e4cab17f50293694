"""The one weights reader (wrn_det.engine.weights_file): .pth, detectron2 .pkl and .safetensors read once, with
their metadata and kind; .safetensors written and read back; hostile .safetensors refused in one line each."""
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from wrn_det.engine.errors import WrnDetError

pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e '.[hub]')")

from wrn_det.engine.weights_file import read_weights_file, save_safetensors  # noqa: E402

TINY_FPN = ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
            "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
TINY_C4 = ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.WRN.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0",
           "MODEL.WRN.OUT_FEATURES", "['stage2']", "MODEL.RPN.IN_FEATURES", "['stage2']",
           "MODEL.ROI_HEADS.IN_FEATURES", "['stage2']", "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64]]",
           "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu"]
CASES = [("shapes_wrn_frcnn.yaml", TINY_FPN), ("Base-WRN-RCNN-C4.yaml", TINY_C4)]
META = {"thing_classes": ["square", "circle", "triangle"], "contiguous_id_to_thing_dataset_id": {0: 1, 1: 2, 2: 7},
        "datasets": ["coco_2017_train"]}


def _cfg(name, opts):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    return load_config(get_det_cfg(), name, opts)


def _detector(name, opts, seed):
    from wrn_det.detection.modeling import build_detector

    torch.manual_seed(seed)
    model = build_detector(_cfg(name, opts)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # weights unlike any initialisation
    return model


def _detections(model, seed=3):
    torch.manual_seed(seed)
    image = (torch.rand(3, 64, 80) * 255).to(torch.uint8)
    with torch.no_grad():
        return model([{"image": image, "height": 64, "width": 80}])[0]


@pytest.mark.parametrize("name, opts", CASES, ids=["fpn", "c4"])
def test_detector_safetensors_load_to_the_same_tensors_and_detections(name, opts, tmp_path):
    """A detector's .safetensors (the C4 head's res5 shares the network's stage: stored once) loads back whole."""
    from wrn_det.detection.weights import detector_file_fields, load_detector_weights, load_inference_weights

    src = _detector(name, opts, 0)
    state = src.state_dict()
    shared = len(state) - len({(t.untyped_storage().data_ptr(), t.shape) for t in state.values() if t.numel()})
    assert (shared > 0) == ("C4" in name)
    path = str(tmp_path / "detector.safetensors")
    save_safetensors(path, state, **detector_file_fields(src, _cfg(name, opts), META))
    wf = read_weights_file(path)
    assert (wf.format, wf.kind, wf.engine, wf.training) == ("safetensors", "detector", "builtin", False)
    assert wf.metadata == META and "MODEL:" in wf.config and wf.model_name == "wrn_10_1"
    assert len(wf.model) == len(state) - shared
    dst = _detector(name, opts, 1)
    ckpt = load_detector_weights(dst, path)
    assert ckpt["metadata"] == META
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k
    got = load_inference_weights(_detector(name, opts, 2), path)
    assert got["thing_classes"] == META["thing_classes"] and got["contiguous_id_to_thing_dataset_id"] == {0: 1, 1: 2, 2: 7}
    assert got["classes_from"] == "checkpoint"
    a, b = _detections(src), _detections(dst)
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_reader_tells_what_each_file_is(tmp_path):
    from wrn_det.models import build_model
    from wrn_det.models.convert import builtin_checkpoint, d2_checkpoint

    net = build_model("wrn_10_1")
    state = net.state_dict()
    files = {
        "train.pth": ({"model": state, "optimizer": {}, "iteration": 3, "ema": state, "config": "MODEL:\n  NAME: x\n"},
                      ("torch", "classifier", None, True)),
        "plain.pth": ({"module." + k: v for k, v in state.items()}, ("torch", "classifier", None, False)),
        "timm.pth": ({"state_dict": state, "state_dict_ema": state}, ("torch", "classifier", None, False)),
        "backbone.pth": (builtin_checkpoint({k: v for k, v in state.items() if not k.startswith("fc.")}, "wrn_10_1"),
                         ("torch", "backbone", None, False)),
        "d2.pkl": (d2_checkpoint({k: v for k, v in state.items() if not k.startswith("fc.")}, net, "wrn_10_1"),
                   ("detectron2_pickle", "backbone", None, False)),
        "zoo.pth": ({"params": {"w": torch.zeros(1)}}, ("torch", "unknown", None, False)),
    }
    for name, (obj, expected) in files.items():
        path = tmp_path / name
        if name.endswith(".pkl"):
            path.write_bytes(pickle.dumps(obj, protocol=4))
        else:
            torch.save(obj, path)
        wf = read_weights_file(str(path))
        assert (wf.format, wf.kind, wf.engine, wf.training) == expected, name
        if wf.kind != "unknown":
            assert all(isinstance(v, torch.Tensor) for v in wf.model.values()) and "stage1.0.conv1.weight" in wf.model
    assert read_weights_file(str(tmp_path / "train.pth")).ema is not None
    assert read_weights_file(str(tmp_path / "backbone.pth")).model_name == "wrn_10_1"


def test_classifier_safetensors_in_the_classification_loader(tmp_path):
    from wrn_det.models import build_model, load_classifier_weights

    torch.manual_seed(0)
    src = build_model("wrn_10_1", num_classes=7)
    path = str(tmp_path / "cls.safetensors")
    save_safetensors(path, src.state_dict(), config="MODEL:\n  NAME: wrn_10_1\n")
    dst = build_model("wrn_10_1", num_classes=7)
    assert load_classifier_weights(dst, path)["config"].startswith("MODEL:")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(src.eval()(x), dst.eval()(x))
    # integers where the network has floats: load_state_dict would cast them; the matcher refuses them
    bad = dict(src.state_dict(), **{"stage2.0.conv1.weight": src.state_dict()["stage2.0.conv1.weight"].to(torch.int32)})
    save_safetensors(str(tmp_path / "int.safetensors"), bad)
    with pytest.raises(WrnDetError) as e:
        load_classifier_weights(build_model("wrn_10_1", num_classes=7), str(tmp_path / "int.safetensors"))
    assert "of another dtype 1: stage2.0.conv1.weight int32 (the model has float32)" in str(e.value)


# --- hostile .safetensors --------------------------------------------------------------------------------------


def _raw_safetensors(path, header: dict, data: bytes, length=None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _good():
    """A real detector file's tensors and header, to attack."""
    from wrn_det.detection.weights import detector_file_fields

    model = _detector(*CASES[0], 0)
    return model.state_dict(), detector_file_fields(model, _cfg(*CASES[0]), META)


@pytest.mark.parametrize("case, expected", [
    ("truncated_header", "its header claims"),
    ("truncated_data", "cannot be read as safetensors"),
    ("too_short", "fewer than its header's length field"),
    ("header_lies_about_sizes", "cannot be read as safetensors"),
    ("offsets_past_the_end", "cannot be read as safetensors"),
    ("huge_header", "its header claims 4611686018427387904 bytes"),
    ("nan", "holds non-finite values"),
    ("unknown_dtype", "cannot be read as safetensors"),
    ("integer_weights", "of another dtype 1: roi_heads.box_predictor.cls_score.weight int64 (the model has float32)"),
    ("metadata_not_strings", "cannot be read as safetensors"),
    ("metadata_not_json", "header field 'metadata' is not JSON text"),
    ("metadata_not_a_dict", "'metadata' is a str"),
    ("names_not_strings", "thing_classes must be a list of strings"),
    ("missing_tensor", "missing 1 of"),
])
def test_hostile_safetensors_is_one_line(tmp_path, case, expected):
    from wrn_det.detection.weights import load_inference_weights

    state, fields = _good()
    path = tmp_path / f"{case}.safetensors"
    save_safetensors(str(path), state, **fields)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if case == "truncated_header":
        path.write_bytes(raw[:8 + n // 2])
    elif case == "truncated_data":
        path.write_bytes(raw[:-100])
    elif case == "too_short":
        path.write_bytes(raw[:5])
    elif case == "header_lies_about_sizes":  # 1000 floats announced in 8 bytes
        _raw_safetensors(path, {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}}, bytes(8))
    elif case == "offsets_past_the_end":
        _raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4000]}}, bytes(8))
    elif case == "huge_header":
        _raw_safetensors(path, {}, b"", length=2 ** 62)
    elif case == "unknown_dtype":
        _raw_safetensors(path, {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    elif case == "metadata_not_strings":
        _raw_safetensors(path, {"__metadata__": {"metadata": {"thing_classes": ["a"]}, "format": 1}}, b"")
    else:
        st = dict(state)
        meta = dict(fields)
        if case == "nan":
            w = st["roi_heads.box_head.1.weight"].clone()
            w[0, 0] = float("nan")
            st["roi_heads.box_head.1.weight"] = w
        elif case == "integer_weights":
            st["roi_heads.box_predictor.cls_score.weight"] = st["roi_heads.box_predictor.cls_score.weight"].long()
        elif case == "metadata_not_json":
            meta["metadata"] = "{'thing_classes': oops"
        elif case == "metadata_not_a_dict":
            meta["metadata"] = "square,circle,triangle"
        elif case == "names_not_strings":
            meta["metadata"] = dict(META, thing_classes=[1, 2, 3])
        elif case == "missing_tensor":
            del st["rpn.head.cls_logits.weight"]
        if case == "metadata_not_json":
            save_safetensors(str(path), st, **{k: v for k, v in meta.items() if k != "metadata"})
            raw = path.read_bytes()
            n = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8:8 + n])
            header["__metadata__"]["metadata"] = meta["metadata"]
            text = json.dumps(header).encode()
            path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        elif case == "metadata_not_a_dict":
            save_safetensors(str(path), st, **{k: v for k, v in meta.items() if k != "metadata"},
                             metadata=json.dumps(meta["metadata"]))
        else:
            save_safetensors(str(path), st, **meta)
    assert header  # the file attacked was a real one
    with pytest.raises(WrnDetError) as e:
        load_inference_weights(_detector(*CASES[0], 1), str(path))
    msg = str(e.value)
    assert expected in msg and str(path) in msg and "\n" not in msg, msg


def test_pickles_still_go_through_the_restricted_unpickler(tmp_path):
    """A detectron2 .pkl detector checkpoint holding numpy arrays loads; one holding code is refused, nothing run."""
    import os

    from wrn_det.detection.weights import load_detector_weights

    model = _detector(*CASES[0], 0)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    good = tmp_path / "builtin_keys.pkl"
    good.write_bytes(pickle.dumps({"model": arrays, "__author__": "someone"}, protocol=4))
    dst = _detector(*CASES[0], 1)
    load_detector_weights(dst, str(good))
    assert all(torch.equal(torch.from_numpy(np.asarray(arrays[k])), v) for k, v in dst.state_dict().items())

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"w": Evil()}, "__author__": "x"}))
    with pytest.raises(WrnDetError, match=r"MODEL.WEIGHTS: .*refused to load global (posix|nt|os)\.system"):
        load_detector_weights(_detector(*CASES[0], 1), str(evil))
    assert not (tmp_path / "pwned").exists()


def test_finite_check_tells_nan_and_inf_from_large_finite_weights(tmp_path):
    """Weights whose sum overflows float32 are finite and load; a single NaN, inf or -inf is refused."""
    big = torch.full((4, 3), 3e38)  # every value finite, their sum inf
    for name, bad in (("finite", None), ("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        w = big.clone()
        if bad is not None:
            w[2, 1] = bad
        path = tmp_path / f"{name}.pth"
        torch.save({"model": {"w": w, "b": torch.zeros(3), "n": torch.arange(3)}}, path)
        if bad is None:
            assert torch.equal(read_weights_file(str(path)).model["w"], w)
        else:
            with pytest.raises(WrnDetError, match="w holds non-finite values"):
                read_weights_file(str(path)).model
