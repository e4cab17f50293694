"""detectron2-engine checkpoints -> builtin detectors: the key mapping (C4 and FPN), the RPN head's anchor order, and
a checkpoint file made to attack the reader. detectron2 itself is needed only to compare with its own key names."""
import math

import pytest
import torch

from wrn_det.engine.errors import WrnDetError

TINY_FPN = ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.FPN.OUT_CHANNELS", "16", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
            "MODEL.DEVICE", "cpu", "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "8",
            "MODEL.ROI_BOX_HEAD.NORM", "BN"]
TINY_C4 = ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.WRN.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0",
           "MODEL.WRN.OUT_FEATURES", "['stage2']", "MODEL.RPN.IN_FEATURES", "['stage2']",
           "MODEL.ROI_HEADS.IN_FEATURES", "['stage2']", "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64]]",
           "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu"]


def _cfg(name, opts):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    return load_config(get_det_cfg(), name, opts)


def _model(name, opts):
    from wrn_det.detection.modeling import build_detector

    torch.manual_seed(0)
    return build_detector(_cfg(name, opts)).eval()


def to_detectron2(model):
    """A detectron2-style state dict of ``model``: the inverse of the mapping, written out in the test."""
    from wrn_det.detection.weights.d2_keys import detectron2_key_plan, rpn_anchor_order

    own = model.state_dict()
    out = {}
    order = rpn_anchor_order(model)
    for d2, key, how in detectron2_key_plan(model):
        v = own[key].clone()
        if how == "cls_score":
            v = torch.cat([v[1:], v[:1]])  # background last
        elif how == "bbox_pred":
            v = v[4:]  # no background deltas
        elif how == "rpn_anchors":  # detectron2's row of anchor i is the builtin row of the anchor listed there
            rows = v.view(len(order), -1, *v.shape[1:])
            v = rows[torch.argsort(torch.tensor(order))].reshape(v.shape)
        out[d2] = v
    return out


CASES = [("shapes_wrn_frcnn.yaml", TINY_FPN), ("Base-WRN-RCNN-C4.yaml", TINY_C4)]


@pytest.mark.parametrize("name, opts", CASES, ids=["fpn", "c4"])
def test_detectron2_state_loads_every_tensor_of_the_detector(name, opts, tmp_path):
    from wrn_det.detection.weights.d2_keys import is_detectron2_state
    from wrn_det.detection.weights import load_inference_weights as load_detector_weights

    src = _model(name, opts)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # weights unlike any initialisation
    state = to_detectron2(src)
    assert is_detectron2_state(state) and not is_detectron2_state(src.state_dict())
    assert any(k.startswith("proposal_generator.rpn_head.") for k in state)
    if "C4" in name:
        assert any(k.startswith("roi_heads.res5.stage3.") for k in state) and "backbone.stem.0.weight" not in state
    else:
        assert "roi_heads.box_head.fc1.weight" in state and "roi_heads.box_head.conv1.norm.running_mean" in state
    path = tmp_path / "d2_model_final.pth"
    torch.save({"model": state, "iteration": 5, "trainer": {"iteration": 5}}, path)
    dst = _model(name, opts)
    got = load_detector_weights(dst, str(path))  # no config: no dataset to name the classes after
    assert got["engine"] == "detectron2" and got["thing_classes"] == [f"class {i}" for i in range(len(got["thing_classes"]))]
    a, b = src.state_dict(), dst.state_dict()
    bg_deltas = {"roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"}
    unused = [k for k in a if not torch.equal(a[k], b[k]) and k not in bg_deltas]
    # only tensors no part of the detector runs keep their own initialisation: the classifier of the network
    assert all(".fc." in k or k.split(".")[2] in ("fc",) for k in unused), unused
    for k in bg_deltas:
        assert torch.equal(a[k][4:], b[k][4:]) and not b[k][:4].any()
    # the strides stay known: images padded to 32 give a p6 grid that the padded size does not divide
    assert dst.rpn.anchor_generator.strides == src.rpn.anchor_generator.strides


def test_detectron2_class_order_and_class_agnostic_deltas(tmp_path):
    from wrn_det.detection.weights.d2_keys import detectron2_to_builtin

    model = _model(*CASES[0])
    state = to_detectron2(model)
    k, d = 3, state["roi_heads.box_predictor.cls_score.weight"].shape[1]
    state["roi_heads.box_predictor.cls_score.weight"] = torch.arange(k + 1.0)[:, None].expand(k + 1, d)
    state["roi_heads.box_predictor.bbox_pred.weight"] = torch.ones(4, d)  # class-agnostic regression
    state["roi_heads.box_predictor.bbox_pred.bias"] = torch.arange(4.0)
    out = detectron2_to_builtin(state, model)
    # detectron2's background (its last row, k) becomes row 0; class i moves to row i + 1
    assert out["roi_heads.box_predictor.cls_score.weight"][:, 0].tolist() == [3.0, 0.0, 1.0, 2.0]
    assert out["roi_heads.box_predictor.bbox_pred.bias"].tolist() == [0.0] * 4 + [0.0, 1.0, 2.0, 3.0] * 3


def test_rpn_rows_follow_the_anchors_from_detectron2s_order():
    """The builtin lists a level's anchors ratio-major, detectron2 size-major: loading reorders the RPN head's rows
    so that every objectness row and every 4 delta rows stay with their anchor."""
    from wrn_det.detection.modeling.rpn import cell_anchors
    from wrn_det.detection.weights.d2_keys import detectron2_to_builtin, rpn_anchor_order

    model = _model(*CASES[1])  # C4: sizes 16, 32, 64 and ratios 0.5, 1, 2 on one level
    order = rpn_anchor_order(model)
    ours = cell_anchors((16, 32, 64), (0.5, 1.0, 2.0))
    theirs = []
    for size in (16, 32, 64):  # detectron2's generate_cell_anchors: size-major
        for a in (0.5, 1.0, 2.0):
            w = math.sqrt(size * size / a)
            theirs.append([-w / 2, -a * w / 2, w / 2, a * w / 2])
    assert order != list(range(9)) and all(ours[j] == pytest.approx(theirs[order[j]]) for j in range(9))
    state = to_detectron2(model)
    state["proposal_generator.rpn_head.objectness_logits.bias"] = torch.arange(9.0)  # detectron2 row i: value i
    state["proposal_generator.rpn_head.anchor_deltas.bias"] = torch.arange(36.0)
    out = detectron2_to_builtin(state, model)
    assert out["rpn.head.cls_logits.bias"].tolist() == [float(i) for i in order]
    assert out["rpn.head.bbox_pred.bias"].tolist() == [float(4 * i + c) for i in order for c in range(4)]
    assert rpn_anchor_order(_model(*CASES[0])) == [0, 1, 2]  # one size per level: the same order


def _attack(state, case):
    state = dict(state)
    if case == "missing":
        del state["proposal_generator.rpn_head.anchor_deltas.weight"]
    elif case == "wrong_shape":
        state["roi_heads.box_head.fc1.weight"] = torch.zeros(5, 5)
    elif case == "wrong_classes":
        w = state["roi_heads.box_predictor.cls_score.weight"]
        state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(w.shape[0] + 2, w.shape[1])
    elif case == "wrong_deltas":
        w = state["roi_heads.box_predictor.bbox_pred.weight"]
        state["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(w.shape[0] + 4, w.shape[1])
    elif case == "mask_head":
        state["roi_heads.mask_head.mask_fcn1.weight"] = torch.zeros(1)
    elif case == "not_a_tensor":
        state["proposal_generator.rpn_head.conv.bias"] = "0.0"
    elif case == "nan":
        w = state["backbone.fpn.layer_blocks.0.0.weight"].clone()
        w.view(-1)[3] = float("inf")
        state["backbone.fpn.layer_blocks.0.0.weight"] = w
    return state


@pytest.mark.parametrize("case, expected", [
    ("missing", "lacks 1 tensors of the configured detector (e.g. proposal_generator.rpn_head.anchor_deltas.weight)"),
    ("wrong_shape", "roi_heads.box_head.fc1.weight has shape (5, 5)"),
    ("wrong_classes", "roi_heads.box_predictor.cls_score.weight has shape (6, 32); this detector needs (4, 32)"),
    ("wrong_deltas", "needs 12 class-specific rows (or 4 class-agnostic ones) for 3 classes"),
    ("mask_head", "tensors this detector does not have (e.g. roi_heads.mask_head.mask_fcn1.weight)"),
    ("not_a_tensor", "proposal_generator.rpn_head.conv.bias is a str, not a tensor"),
    ("nan", "backbone.fpn.layer_blocks.0.0.weight holds non-finite values"),
    ("truncated", "cannot be read as a torch checkpoint"),
])
def test_hostile_detectron2_checkpoint_is_one_line(case, expected, tmp_path):
    from wrn_det.detection.weights import load_inference_weights as load_detector_weights

    model = _model(*CASES[0])
    path = tmp_path / f"{case}.pth"
    torch.save({"model": _attack(to_detectron2(model), case), "iteration": 1}, path)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-300])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WrnDetError) as e:
        load_detector_weights(model, str(path))
    msg = str(e.value)
    assert expected in msg and str(path) in msg and "\n" not in msg, msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


@pytest.mark.parametrize("name, opts", CASES, ids=["fpn", "c4"])
def test_mapping_covers_detectron2s_own_model(name, opts):
    """The detectron2 model of the same config (wrn_det.d2) has exactly the keys the mapping reads."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed: its key names cannot be compared")
    from detectron2.modeling import build_model

    from wrn_det.d2.train import build_config
    from wrn_det.detection.weights.d2_keys import detectron2_key_plan

    d2 = build_model(build_config(name, opts))
    plan = {d2_key for d2_key, _, _ in detectron2_key_plan(_model(name, opts))}
    theirs = set(d2.state_dict())
    assert plan == theirs, (sorted(plan - theirs)[:5], sorted(theirs - plan)[:5])


def test_detectron2_checkpoint_as_safetensors_keeps_its_anchors_through_a_hub_file(tmp_path):
    """A detectron2-engine detector in .safetensors loads as its .pth does; written back out (a Hub folder's weights)
    it says its anchors are detectron2's (as every builtin RPN's are), so it loads again to the same detections."""
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install -e '.[hub]')")
    from wrn_det.detection.weights import detector_file_fields, load_detector_weights
    from wrn_det.detection.weights.loading import detector_description
    from wrn_det.engine.weights_file import read_weights_file, save_safetensors

    name, opts = CASES[0]
    src = _model(name, opts)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_safetensors(str(tmp_path / "d2.safetensors"), to_detectron2(src))
    torch.save({"model": to_detectron2(src)}, tmp_path / "d2.pth")
    wf = read_weights_file(str(tmp_path / "d2.safetensors"))
    assert (wf.kind, wf.engine) == ("detector", "detectron2")
    a, b = _model(name, opts), _model(name, opts)
    load_detector_weights(a, str(tmp_path / "d2.pth"))
    load_detector_weights(b, str(tmp_path / "d2.safetensors"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    save_safetensors(str(tmp_path / "builtin.safetensors"), b.state_dict(), **detector_file_fields(b, _cfg(name, opts), {}))
    c = _model(name, opts)
    load_detector_weights(c, str(tmp_path / "builtin.safetensors"))
    assert detector_description(read_weights_file(str(tmp_path / "builtin.safetensors")))["anchors"] == "detectron2"
    image = (torch.rand(3, 64, 80) * 255).to(torch.uint8)
    with torch.no_grad():
        want, got = (m([{"image": image, "height": 64, "width": 80}])[0] for m in (b, c))
    assert torch.equal(want["boxes"], got["boxes"]) and torch.equal(want["scores"], got["scores"])
