"""RPN-only detector, proposal recall, proposals through the mapper, Fast R-CNN on given
proposals, and the one-line errors of proposal configs (tools/train_net.py)."""
import json
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from helpers import DRAW_64, run_tool_in_process, write_coco, write_fake_coco

from wrn_det.data.det_loader import DetectionMapper
from wrn_det.data.proposals import load_proposal_file, save_proposal_file
from wrn_det.detection.config import get_det_cfg
from wrn_det.detection.modeling import build_detector
from wrn_det.detection.evaluation.proposals import ProposalEvaluator, average_recall, load_gt_boxes
from wrn_det.detection.modeling.rpn import select_top_proposals
from wrn_det.engine.config import load_config

TINY = ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64"]


def cfg_of(config, opts=()):
    return load_config(get_det_cfg(), config, list(TINY) + list(opts))


def _image(h, w, seed=0):
    return torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_select_top_proposals_per_level_topk_nms_and_min_size():
    # two levels: level 0 holds 3 boxes, level 1 holds 2; image 20x20
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 9.5], [5, 5, 5.5, 15],   # level 0
                           [2, 2, 30, 30], [12, 12, 18, 18]]], dtype=torch.float32)  # level 1
    logits = torch.tensor([[3.0, 2.0, 5.0, 1.0, -1.0]])
    out = select_top_proposals(boxes, logits, [3, 2], [(20, 20)], pre_nms_topk=2, post_nms_topk=10,
                               nms_thresh=0.7, min_size=1.0)
    (b, s), = out
    # level 0 keeps its best 2 (logits 5 and 3); the 0.5-pixel-wide box is dropped by min_size;
    # level 1 keeps both; the box past the border is clipped to 20x20
    assert s.tolist() == [3.0, 1.0, -1.0]
    assert b.tolist() == [[0, 0, 10, 10], [2, 2, 20, 20], [12, 12, 18, 18]]
    # NMS works within a level only: a near-duplicate of level 0's box survives on level 1
    dup = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 10]]], dtype=torch.float32)
    (b, s), = select_top_proposals(dup, torch.tensor([[1.0, 0.5]]), [1, 1], [(20, 20)], 5, 10, 0.7, 0.0)
    assert len(b) == 2
    (b, s), = select_top_proposals(dup, torch.tensor([[1.0, 0.5]]), [2], [(20, 20)], 5, 10, 0.7, 0.0)
    assert len(b) == 1
    (b, s), = select_top_proposals(boxes, logits, [5], [(20, 20)], 5, post_nms_topk=2, nms_thresh=0.7, min_size=0)
    assert s.tolist() == [5.0, 3.0]


def test_proposal_network_trains_and_proposes_in_original_coordinates():
    cfg = cfg_of("shapes_wrn_rpn.yaml", ["MODEL.RPN.POST_NMS_TOPK_TEST", "40"])
    torch.manual_seed(0)
    model = build_detector(cfg)
    assert type(model).__name__ == "ProposalNetwork" and not hasattr(model, "roi_heads")
    batch = [{"image": _image(64, 96), "height": 128, "width": 192, "boxes": torch.tensor([[4.0, 4, 30, 40]]),
              "classes": torch.tensor([1])}, {"image": _image(64, 64, 1), "height": 64, "width": 64,
                                              "boxes": torch.tensor([[10.0, 10, 50, 50]]), "classes": torch.tensor([0])}]
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(batch)
    for o, (h, w) in zip(out, [(128, 192), (64, 64)]):
        p, s = o["proposals"], o["objectness_logits"]
        assert 0 < len(p) <= 40 and len(s) == len(p)
        assert torch.all(s[:-1] >= s[1:])  # best first
        assert p[:, 0::2].max() <= w and p[:, 1::2].max() <= h and p.min() >= 0
        assert torch.all(p[:, 2:] > p[:, :2])
    assert out[0]["proposals"][:, 2].max() > 96  # mapped back to the 192-pixel-wide original
    # the same parameter names as the Faster R-CNN: an RPN's weights load into it
    frcnn = build_detector(cfg_of("shapes_wrn_frcnn.yaml"))
    own = {k for k in model.state_dict()}
    assert own and own <= set(frcnn.state_dict())


def test_average_recall_hand_computed():
    gts = {1: (torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]], dtype=torch.float64),
               torch.tensor([100.0, 2000.0], dtype=torch.float64))}
    # IoU 0.81 with the first gt box; nothing near the second
    props = {1: torch.tensor([[0.0, 0, 9, 9], [50, 50, 60, 60]])}
    r = average_recall(gts, props, limit=100)
    # first box found at thresholds 0.50..0.80 (7 of 10), second never: AR = 7 / 10 / 2
    assert r["num_pos"] == 2 and r["ar"] == pytest.approx(0.35)
    assert average_recall(gts, props, limit=100, area=(0, 32 ** 2))["ar"] == pytest.approx(0.7)
    assert average_recall(gts, props, limit=100, area=(32 ** 2, 96 ** 2))["ar"] == 0.0
    assert np.isnan(average_recall(gts, props, limit=100, area=(96 ** 2, 1e10))["ar"])
    # one proposal cannot cover two boxes: matching is one to one
    two = {1: (torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float64), torch.tensor([100.0, 100.0]))}
    assert average_recall(two, {1: torch.tensor([[0.0, 0, 10, 10]])}, 100)["ar"] == pytest.approx(0.5)
    # limit: only the first proposal counts
    assert average_recall(gts, {1: torch.tensor([[50.0, 50, 60, 60], [0, 0, 9, 9]])}, limit=1)["ar"] == 0.0


ONE_CLASS = [{"id": 1, "name": "a"}]


def test_recall_equals_detectron2s(tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.evaluation.coco_evaluation import _evaluate_box_proposals
    from detectron2.structures import Boxes, Instances
    from pycocotools.coco import COCO

    g = torch.Generator().manual_seed(0)
    images, anns, preds = [], [], []
    for i in range(1, 21):
        images.append({"id": i, "file_name": f"{i}.jpg", "height": 300, "width": 300})
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            x, y = (torch.rand(2, generator=g) * 150).tolist()
            w, h = (torch.rand(2, generator=g) * 140 + 5).tolist()
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [x, y, w, h],
                         "area": w * h * 0.8, "iscrowd": int(len(anns) % 7 == 6)})
        n = int(torch.randint(1, 1500, (1,), generator=g))
        xy, wh = torch.rand(n, 2, generator=g) * 200, torch.rand(n, 2, generator=g) * 120 + 2
        inst = Instances((300, 300))
        inst.proposal_boxes, inst.objectness_logits = Boxes(torch.cat([xy, xy + wh], 1)), torch.randn(n, generator=g)
        preds.append({"image_id": i, "proposals": inst})
    path = str(tmp_path / "gt.json")
    write_coco(path, images, anns, ONE_CLASS)
    gts = load_gt_boxes(path)
    props = {p["image_id"]: p["proposals"].proposal_boxes.tensor[p["proposals"].objectness_logits.argsort(descending=True)]
             for p in preds}
    coco = COCO(path)
    for area, rng in (("all", (0, 1e10)), ("small", (0, 32 ** 2)), ("medium", (32 ** 2, 96 ** 2)), ("large", (96 ** 2, 1e10))):
        for limit in (100, 1000):
            theirs = _evaluate_box_proposals(preds, coco, area=area, limit=limit)
            ours = average_recall(gts, props, limit, rng)
            assert ours["num_pos"] == theirs["num_pos"]
            assert ours["ar"] == pytest.approx(float(theirs["ar"]), abs=1e-6)


def test_proposal_evaluator_writes_detectron2_file_and_recall(tmp_path):
    from wrn_det.data.catalog import DatasetCatalog, MetadataCatalog
    from wrn_det.data.coco import register_coco_instances

    path = str(tmp_path / "gt.json")
    write_coco(path, [{"id": 7, "file_name": "a.jpg", "height": 50, "width": 50}],
               [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0}], ONE_CLASS)
    register_coco_instances("t_prop_eval", path, str(tmp_path))
    try:
        ev = ProposalEvaluator("t_prop_eval", str(tmp_path / "inference"))
        ev.process([{"image_id": 7}], [{"proposals": torch.tensor([[0.0, 0, 10, 10], [1, 1, 30, 30]]),
                                        "objectness_logits": torch.tensor([2.0, 1.0])}])
        res = ev.evaluate()["box_proposals"]
    finally:
        DatasetCatalog.remove("t_prop_eval")
        MetadataCatalog.remove("t_prop_eval")
    assert list(res) == ["AR@100", "ARs@100", "ARm@100", "ARl@100", "AR@1000", "ARs@1000", "ARm@1000", "ARl@1000"]
    assert res["AR@100"] == pytest.approx(100.0) and np.isnan(res["ARl@100"])
    written = str(tmp_path / "inference" / "box_proposals.pkl")
    props = load_proposal_file(written)
    assert props["ids"] == [7] and props["boxes"][0].tolist() == [[0, 0, 10, 10], [1, 1, 30, 30]]
    with open(written, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"ids", "boxes", "objectness_logits", "bbox_mode"} and raw["bbox_mode"] == 0


def _dataset_dict(tmp_path, box):
    path = str(tmp_path / "img.jpg")
    cv2.imwrite(path, np.full((64, 96, 3), 100, np.uint8))
    x0, y0, x1, y1 = box
    return {"file_name": path, "height": 64, "width": 96, "image_id": 1,
            "annotations": [{"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": 1, "category_id": 0, "iscrowd": 0}],
            # best first, as load_proposals_into_dataset leaves them; the last lies outside the image
            "proposal_boxes": np.array([box, [0, 0, 40, 30], [10, 10, 20, 20], [100, 0, 120, 10]], np.float32),
            "proposal_objectness_logits": np.array([4.0, 3.0, 2.0, 1.0], np.float32), "proposal_bbox_mode": 0}


def test_proposals_follow_the_image_through_resize_and_flip(tmp_path):
    box = [10.0, 6.0, 30.0, 50.0]
    d = _dataset_dict(tmp_path, box)
    cfg = cfg_of("shapes_wrn_fast_rcnn.yaml", ["INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "1000",
                                               "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN", "2"])
    mapper = DetectionMapper(cfg, is_train=True)
    flipped = set()
    for seed in range(8):
        out = mapper(dict(d), seed)
        assert out["image"].shape[-2:] == (32, 48)
        # the first proposal is the gt box: both went through the same resize and flip
        torch.testing.assert_close(out["proposals"][0], out["boxes"][0])
        assert out["proposals"].shape == (2, 4)  # top-k after dropping the box outside the image
        assert out["proposal_objectness_logits"].tolist() == [4.0, 3.0]
        x0 = float(out["proposals"][1, 0])
        assert x0 in (0.0, 48 - 20.0)  # [0, 0, 40, 30] halved, or halved and mirrored
        flipped.add(x0 != 0.0)
    assert flipped == {True, False}
    test_mapper = DetectionMapper(cfg_of("shapes_wrn_fast_rcnn.yaml", ["INPUT.MIN_SIZE_TEST", "32"]), is_train=False)
    out = test_mapper(dict(d), 0)
    assert "boxes" not in out
    assert out["proposals"].tolist() == [[5, 3, 15, 25], [0, 0, 20, 15], [5, 5, 10, 10]]
    # without LOAD_PROPOSALS the proposals stay out of the model input
    assert "proposals" not in DetectionMapper(cfg_of("shapes_wrn_frcnn.yaml"), is_train=True)(dict(d), 0)


def test_fast_rcnn_detects_at_the_given_proposals():
    cfg = cfg_of("shapes_wrn_fast_rcnn.yaml", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    model = build_detector(cfg)
    assert model.rpn is None and not any(k.startswith("rpn.") for k in model.state_dict())
    proposal = torch.tensor([[8.0, 12.0, 40.0, 44.0]])
    x = {"image": _image(64, 64), "height": 128, "width": 128, "proposals": proposal,
         "boxes": torch.tensor([[10.0, 10, 40, 40]]), "classes": torch.tensor([2])}
    model.train()
    losses = model([x])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    model.eval()
    with torch.no_grad():
        (det,) = model([x])
    # an untrained box head barely moves boxes: every detection sits at the one proposal (x2 to the original)
    assert len(det["boxes"]) > 0
    torch.testing.assert_close(det["boxes"], (proposal * 2).expand_as(det["boxes"]), atol=0.5, rtol=0)


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_fake_coco(tmp_path_factory.mktemp("d2root"), {"train2017": (6, 1), "val2017": (4, 2)},
                           **dict(DRAW_64, max_objects=3))


def run_cli(argv, root, monkeypatch, capsys):
    """Run tools/train_net.py's entry point in this process; returns (exit status, stderr)."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    return run_tool_in_process("train_net", argv, capsys)


def _proposals_for(root, split, path, skip=()):
    with open(os.path.join(root, "coco", "annotations", f"instances_{split}.json")) as f:
        ids = [im["id"] for im in json.load(f)["images"] if im["id"] not in skip]
    save_proposal_file(path, ids, [np.array([[0, 0, 30, 30], [10, 10, 60, 60]], np.float32)] * len(ids),
                       [np.array([1.0, 0.5], np.float32)] * len(ids))
    return path


def fast_rcnn_args(out, train_file, test_file, *extra):
    return ["--config-file", "shapes_wrn_fast_rcnn.yaml", *TINY, "MODEL.WEIGHTS", "",
            "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST", "('coco_2017_val',)",
            "DATASETS.PROPOSAL_FILES_TRAIN", f"('{train_file}',)", "DATASETS.PROPOSAL_FILES_TEST", f"('{test_file}',)",
            "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out), *extra]


def test_cli_fast_rcnn_on_proposal_files_runs(coco_root, tmp_path, monkeypatch, capsys):
    train = _proposals_for(coco_root, "train2017", str(tmp_path / "train.pkl"))
    val = _proposals_for(coco_root, "val2017", str(tmp_path / "val.pkl"))
    status, err = run_cli(fast_rcnn_args(tmp_path / "out", train, val), coco_root, monkeypatch, capsys)
    assert status == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.json")]
    assert "bbox/AP" in rows[-1]


@pytest.mark.parametrize("case, expected", [
    ("load_without_precomputed", "PrecomputedProposals and LOAD_PROPOSALS True go together"),
    ("precomputed_without_load", "PrecomputedProposals and LOAD_PROPOSALS True go together"),
    ("two_files_one_dataset", "DATASETS.PROPOSAL_FILES_TRAIN has 2 file(s) for the 1 dataset(s)"),
    ("image_missing_from_file", "has no proposals for image id"),
    ("test_file_missing", "DATASETS.PROPOSAL_FILES_TEST: proposal file"),
    ("code_in_file", "refused to load global posix.system"),
])
def test_cli_proposal_errors_are_one_line(coco_root, tmp_path, monkeypatch, capsys, case, expected):
    train = _proposals_for(coco_root, "train2017", str(tmp_path / "train.pkl"))
    val = _proposals_for(coco_root, "val2017", str(tmp_path / "val.pkl"))
    extra = []
    if case == "load_without_precomputed":
        extra = ["MODEL.PROPOSAL_GENERATOR.NAME", "RPN"]
    elif case == "precomputed_without_load":
        extra = ["MODEL.LOAD_PROPOSALS", "False"]
    elif case == "two_files_one_dataset":
        extra = ["DATASETS.PROPOSAL_FILES_TRAIN", f"('{train}', '{train}')"]
    elif case == "image_missing_from_file":
        first = json.load(open(os.path.join(coco_root, "coco", "annotations", "instances_train2017.json")))["images"][0]
        _proposals_for(coco_root, "train2017", train, skip={first["id"]})
    elif case == "test_file_missing":
        val = str(tmp_path / "absent.pkl")
    elif case == "code_in_file":
        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {tmp_path / 'pwned'}",)
        with open(train, "wb") as f:
            pickle.dump({"ids": [1], "boxes": [Evil()], "objectness_logits": [np.zeros(1)]}, f)
    status, err = run_cli(fast_rcnn_args(tmp_path / "out", train, val, *extra), coco_root, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status != 0 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0]
    if case == "code_in_file":
        assert train in lines[0]
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out" / "model_final.pth").exists()


@pytest.mark.parametrize("config, rpn", [("wrn34_2_rpn.yaml", True), ("wrn34_2_fast_rcnn.yaml", False),
                                         ("shapes_wrn_rpn.yaml", True), ("shapes_wrn_fast_rcnn.yaml", False)])
def test_shipped_proposal_configs_build(config, rpn):
    cfg = load_config(get_det_cfg(), config, ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):  # full-size networks: shapes only
        model = build_detector(cfg)
    if rpn:
        assert type(model).__name__ == "ProposalNetwork" and cfg.MODEL.RPN.POST_NMS_TOPK_TEST >= 1000
    else:
        assert model.rpn is None and cfg.MODEL.LOAD_PROPOSALS
        assert len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) == len(cfg.DATASETS.TRAIN)
        assert len(cfg.DATASETS.PROPOSAL_FILES_TEST) == len(cfg.DATASETS.TEST)


@pytest.mark.parametrize("rpn_config, fast_config, sub", [("shapes_wrn_rpn.yaml", "shapes_wrn_fast_rcnn.yaml", ""),
                                                          ("wrn34_2_rpn.yaml", "wrn34_2_fast_rcnn.yaml", "proposals")])
def test_fast_rcnn_configs_read_where_the_rpn_configs_write(rpn_config, fast_config, sub):
    rpn = load_config(get_det_cfg(), rpn_config, [])
    fast = load_config(get_det_cfg(), fast_config, [])
    where = os.path.join(rpn.OUTPUT_DIR, sub, "inference")
    for names, files in ((fast.DATASETS.TRAIN, fast.DATASETS.PROPOSAL_FILES_TRAIN),
                         (fast.DATASETS.TEST, fast.DATASETS.PROPOSAL_FILES_TEST)):
        assert [os.path.normpath(f) for f in files] == \
            [os.path.normpath(os.path.join(where, n, "box_proposals.pkl")) for n in names]
    if not sub:  # the demo RPN writes both sets when its training ends
        assert set(fast.DATASETS.TRAIN + fast.DATASETS.TEST) <= set(rpn.DATASETS.TEST)


def test_plot_draws_proposal_recall_and_per_dataset_ap():
    from wrn_det.engine.curves import eval_keys

    rows = [{"iteration": 9, "total_loss": 1.0},
            {"iteration": 9, "shapes_val/box_proposals/AR@100": 50.0, "shapes_val/box_proposals/ARs@100": 40.0,
             "shapes_train/box_proposals/AR@1000": 60.0, "bbox/AP": 30.0, "a/bbox/AP75": 20.0, "bbox/APs": 5.0}]
    assert eval_keys(rows) == ["a/bbox/AP75", "bbox/AP", "shapes_train/box_proposals/AR@1000",
                               "shapes_val/box_proposals/AR@100"]


def test_proposal_network_with_a_c4_backbone():
    cfg = cfg_of("Base-WRN-RCNN-C4.yaml", [
        "MODEL.META_ARCHITECTURE", "ProposalNetwork", "MODEL.WRN.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.WRN.OUT_FEATURES", "['stage2']", "MODEL.RPN.IN_FEATURES", "['stage2']",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16, 32, 64]]", "MODEL.RPN.POST_NMS_TOPK_TEST", "30"])
    model = build_detector(cfg)
    x = [{"image": _image(64, 64), "height": 64, "width": 64, "boxes": torch.tensor([[10.0, 10, 50, 50]]),
          "classes": torch.tensor([0])}]
    assert set(model(x)) == {"loss_rpn_cls", "loss_rpn_loc"}
    model.eval()
    with torch.no_grad():
        (out,) = model(x)
    assert 0 < len(out["proposals"]) <= 30
    assert not hasattr(model, "roi_heads")
