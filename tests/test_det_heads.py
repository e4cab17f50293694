"""The builtin RPN and RoI heads: box geometry in float32 under bfloat16 autocast, detectron2's loss keys and their
errors, matching and sampling rules. (Equality with detectron2 itself: test_engines_agree.py, in its venv.)"""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from wrn_det.detection.config import get_det_cfg
from wrn_det.detection.modeling import build_detector
from wrn_det.detection.modeling.box_ops import BoxTransform, Matcher, box_regression_loss, pairwise_iou
from wrn_det.engine.config import load_config
from wrn_det.engine.errors import ConfigError

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _cfg(config="Base-WRN-RCNN-FPN.yaml", *opts):
    return load_config(get_det_cfg(), config, ["MODEL.DEVICE", "cpu", "MODEL.WRN.NAME", "wide_resnet18_1",
                                               "MODEL.ROI_HEADS.NUM_CLASSES", "3", *opts])


class _FixedHead(nn.Module):
    """An RPN head that predicts given values: logits as they are, deltas in the autocast dtype (when autocast is on)."""

    def __init__(self, logits, deltas):
        super().__init__()
        self.logits, self.deltas = logits, deltas

    def forward(self, feats):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        return list(self.logits), [d.to(dtype) for d in self.deltas]


def test_anchors_and_proposals_are_float32_and_exact_under_bfloat16_at_800_pixels():
    """At 800 x 1216 the RPN under bfloat16 autocast gives the fp32 run's anchors and proposals, in float32.

    The head predicts the same values in both runs (deltas rounded to bfloat16 first, as a bfloat16 head
    outputs them), so any difference is the box geometry's: bfloat16 anchors or decoding would put the
    centres near x = 1200 on an 8-pixel grid.
    """
    torch.manual_seed(0)
    rpn = build_detector(_cfg()).rpn.eval()
    h, w = 800, 1216
    strides = [4, 8, 16, 32, 64]
    g = torch.Generator().manual_seed(1)
    feats = OrderedDict((f"p{int(math.log2(s))}", torch.randn(1, 8, math.ceil(h / s), math.ceil(w / s), generator=g))
                        for s in strides)
    logits = [torch.randn(1, 3, f.shape[2], f.shape[3], generator=g) for f in feats.values()]
    deltas = [(torch.randn(1, 12, f.shape[2], f.shape[3], generator=g) * 0.3).bfloat16().float() for f in feats.values()]
    rpn.head = _FixedHead(logits, deltas)
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])

    fp32_anchors = rpn.anchor_generator(list(feats.values()))
    (fp32,), _ = rpn(images, feats)
    with torch.autocast(**BF16):
        bf16_feats = OrderedDict((k, v.bfloat16()) for k, v in feats.items())
        anchors = rpn.anchor_generator(list(bf16_feats.values()))
        (bf16,), _ = rpn(images, bf16_feats)
    assert all(a.dtype == torch.float32 for a in anchors)
    assert all(torch.equal(a, b) for a, b in zip(anchors, fp32_anchors))
    assert bf16.dtype == torch.float32 and len(bf16) == len(fp32) == 1000
    assert torch.equal(bf16, fp32)
    assert fp32[:, 2].max() > 1100  # proposals reach where bfloat16 spacing is 8 pixels


def test_detections_and_losses_are_float32_under_bfloat16():
    """A whole detector under bfloat16 autocast: float32 anchors, matching, losses and decoded boxes; the box head's
    decoding of given deltas equals the fp32 one."""
    torch.manual_seed(0)
    model = build_detector(_cfg("shapes_wrn_frcnn.yaml", "MODEL.WRN.NAME", "wrn_10_1"))
    seen = []
    model.rpn.anchor_generator.register_forward_hook(lambda m, i, out: seen.extend(a.dtype for a in out))
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=g),
               "boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 8.0, 90.0, 40.0]]),
               "classes": torch.tensor([0, 2])} for _ in range(2)]
    model.train()
    with torch.autocast(**BF16):
        losses = model(inputs)
    assert seen and set(seen) == {torch.float32}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    heads = model.roi_heads
    props = [torch.tensor([[10.0, 12.0, 900.0, 700.0], [1000.0, 20.0, 1190.0, 300.0]])]
    deltas = (torch.randn(2, 16, generator=g) * 0.2).bfloat16()
    with torch.autocast(**BF16):
        boxes = heads.box_coder.decode(deltas, props)
    assert boxes.dtype == torch.float32 and torch.equal(boxes, heads.box_coder.decode(deltas.float(), props))


def test_loss_keys_have_detectron2s_defaults_and_bad_values_are_one_line():
    cfg = get_det_cfg()
    for node in (cfg.MODEL.RPN, cfg.MODEL.ROI_BOX_HEAD):
        assert (node.SMOOTH_L1_BETA, node.BBOX_REG_LOSS_TYPE, node.BBOX_REG_LOSS_WEIGHT) == (0.0, "smooth_l1", 1.0)
    for opts, expected in [
        (["MODEL.RPN.BBOX_REG_LOSS_TYPE", "focal"], "MODEL.RPN.BBOX_REG_LOSS_TYPE must be one of smooth_l1, giou"),
        (["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "l2"], "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE must be one of"),
        (["MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", "-1.0"], "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA must be >= 0"),
        (["MODEL.RPN.IOU_THRESHOLDS", "[0.7, 0.3]"], "MODEL.RPN.IOU_THRESHOLDS must be increasing"),
        (["MODEL.ROI_HEADS.IOU_LABELS", "[0, 2]"], "MODEL.ROI_HEADS.IOU_LABELS must give one label"),
        (["MODEL.ANCHOR_GENERATOR.OFFSET", "1.0"], "MODEL.ANCHOR_GENERATOR.OFFSET must be in [0, 1)"),
        (["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"], "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG True is not"),
        (["MODEL.RPN.BBOX_REG_WEIGHTS", "(1.0, 1.0, 0.0, 1.0)"], "MODEL.RPN.BBOX_REG_WEIGHTS must be 4 positive"),
    ]:
        with pytest.raises(ConfigError) as e:
            build_detector(_cfg("shapes_wrn_frcnn.yaml", "MODEL.WRN.NAME", "wrn_10_1", *opts))
        assert expected in str(e.value) and "\n" not in str(e.value), (opts, str(e.value))
    # detectron2 keys the builtin engine does not implement are unknown keys, named
    with pytest.raises(ConfigError, match="MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"):
        _cfg("shapes_wrn_frcnn.yaml", "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True")


def test_matcher_labels_low_quality_matches_and_no_ground_truth():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    preds = torch.tensor([[0.0, 0.0, 10.0, 10.0],      # IoU 1 with box 0: positive
                          [0.0, 0.0, 10.0, 20.0],      # 0.5: between the thresholds, ignored
                          [50.0, 50.0, 60.0, 60.0],    # 0: negative
                          [100.0, 100.0, 130.0, 130.0],  # 1/9 with box 1, its best: positive as a low-quality match
                          [100.0, 100.0, 140.0, 140.0]])  # 1/16: negative
    iou = pairwise_iou(gt, preds)
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [1, -1, 0, 1, 0] and matches[[0, 3]].tolist() == [0, 1]
    _, labels = Matcher([0.3, 0.7], [0, -1, 1])(iou)
    assert labels.tolist() == [1, -1, 0, 0, 0]
    matches, labels = Matcher([0.5], [0, 1])(pairwise_iou(torch.zeros(0, 4), preds))
    assert labels.tolist() == [0] * 5 and matches.tolist() == [0] * 5
    # a degenerate ground-truth box matches nothing rather than giving NaN
    assert pairwise_iou(torch.tensor([[5.0, 5.0, 5.0, 9.0]]), preds).tolist() == [[0.0] * 5]


def test_box_losses_are_detectron2s_and_masked_rows_stay_out():
    t = BoxTransform((10.0, 10.0, 5.0, 5.0))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0], [0.0, 0.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0, 11.0, 12.0], [20.0, 20.0, 40.0, 30.0], [0.0, 0.0, 0.0, 0.0]])  # last: no target
    deltas = t.get_deltas(boxes[:2], targets[:2])
    assert deltas[0].tolist() == pytest.approx([1.0, 1.5, 0.0, 5 * math.log(1.1)], abs=1e-6)
    assert torch.allclose(t.apply_deltas(deltas, boxes[:2]), targets[:2], atol=1e-5)
    pred = torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0], [5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    fg = torch.tensor([True, True, False])
    l1 = box_regression_loss("smooth_l1", 0.0, t, pred, boxes, targets, fg)
    assert l1.item() == pytest.approx(0.5 + 0.5 + 5 * math.log(1.1) + 0.2, rel=1e-5)  # an L1 loss, beta 0
    smooth = box_regression_loss("smooth_l1", 1.0, t, pred, boxes, targets, fg)
    assert smooth.item() == pytest.approx(0.125 + 0.125 + 0.5 * (5 * math.log(1.1)) ** 2 + 0.02, rel=1e-5)
    l1.backward()
    assert torch.isfinite(pred.grad).all() and not pred.grad[2].any()  # the masked row: no gradient, no NaN


def test_an_image_without_proposals_gets_no_detection():
    """A batch whose images have no proposal left (an untrained RPN under AMP, say) evaluates to empty results."""
    model = build_detector(_cfg("shapes_wrn_frcnn.yaml", "MODEL.WRN.NAME", "wrn_10_1")).eval()
    heads = model.roi_heads
    k = heads.box_predictor.cls_score.out_features
    with torch.no_grad():
        out = heads.inference(torch.zeros(0, k), torch.zeros(0, 4 * k), [torch.zeros(0, 4), torch.zeros(0, 4)],
                              [(64, 80), (64, 80)])
    assert [len(r["boxes"]) for r in out] == [0, 0] and out[0]["boxes"].shape == (0, 4)
