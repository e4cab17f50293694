"""One config, two engines, one model: with the same weights and inputs the builtin engine gives detectron2's losses
(term by term, and their gradients), proposals and detections.

Run in the detectron2 venv; skipped where detectron2 is not installed. Each case builds detectron2's model from a
shipped config (``wrn_det.d2``), moves its weights into the builtin detector of the same config through the
loader users run (``load_detector_weights``: detectron2's keys, class order and RPN anchor order mapped), and feeds
both the same images and boxes. Both run plain convolutions and torchvision's RoIAlign
(``MODEL.FAST_CPU.CONV`` / ``ROI_ALIGN`` False), so their features are bit-identical and every difference left
is float summation order: losses agree within 1e-4 relative, gradients within 1e-3 of their largest value,
boxes within 1e-3 pixels and scores within 1e-5.

The sampling is made the same: both engines draw their anchors and proposals with ``torch.randperm`` on the
default generator, in the same order (per image: positives, then negatives; the RPN before the RoI heads), over
index lists in the same order, so seeding the generator before each forward pass draws the same samples. The
C4 case has several anchor sizes per level, which the builtin lists ratio-major and detectron2 size-major: the
index lists differ in order there, so that case samples every anchor (``MODEL.RPN.BATCH_SIZE_PER_IMAGE``
larger than the anchors), which makes the RPN's draw the same set on both; its proposals, and so the RoI
heads' draws, are the same again.
"""
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("detectron2", reason="detectron2 is not installed (build it from source, see the README); "
                                         "the engine comparison tests are skipped")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from wrn_det.d2.train import build_config  # noqa: E402
from wrn_det.data.proposals import load_proposal_file, save_proposal_file  # noqa: E402
from wrn_det.detection.config import get_det_cfg  # noqa: E402
from wrn_det.detection.modeling import build_detector  # noqa: E402
from wrn_det.detection.weights import load_detector_weights  # noqa: E402
from wrn_det.detection.weights.d2_keys import detectron2_key_plan  # noqa: E402
from wrn_det.engine.config import load_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

EXACT = ["MODEL.DEVICE", "cpu", "MODEL.FAST_CPU.CONV", "False", "MODEL.FAST_CPU.ROI_ALIGN", "False",
         "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
FPN = ("shapes_wrn_frcnn.yaml", ["MODEL.WRN.NAME", "wrn_10_1"])
C4 = ("Base-WRN-RCNN-C4.yaml", ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.WRN.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0",
                                "MODEL.WRN.OUT_FEATURES", "['stage2']", "MODEL.RPN.IN_FEATURES", "['stage2']",
                                "MODEL.ROI_HEADS.IN_FEATURES", "['stage2']", "MODEL.ANCHOR_GENERATOR.SIZES",
                                "[[8, 16, 32]]", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000",
                                "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
                                "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
                                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.PIXEL_MEAN", "[127.5, 127.5, 127.5]",
                                "MODEL.PIXEL_STD", "[64.0, 64.0, 64.0]"])
FAST_RCNN = ("shapes_wrn_fast_rcnn.yaml", ["MODEL.WRN.NAME", "wrn_10_1", "MODEL.WEIGHTS", ""])
RPN = ("shapes_wrn_rpn.yaml", ["MODEL.WRN.NAME", "wrn_10_1"])
# other losses than the configs' own, on the FPN shape
LOSS_KEYS = ["MODEL.RPN.SMOOTH_L1_BETA", "0.1", "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", "0.5",
             "MODEL.RPN.BBOX_REG_LOSS_WEIGHT", "2.0", "MODEL.RPN.LOSS_WEIGHT", "0.5",
             "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "3.0", "MODEL.RPN.BBOX_REG_WEIGHTS", "(2.0, 2.0, 1.0, 1.0)",
             "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", "(5.0, 5.0, 2.0, 2.0)", "MODEL.RPN.BOUNDARY_THRESH", "0",
             "MODEL.ANCHOR_GENERATOR.OFFSET", "0.5"]
GIOU = ["MODEL.RPN.BBOX_REG_LOSS_TYPE", "giou", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "diou"]
CIOU = ["MODEL.RPN.BBOX_REG_LOSS_TYPE", "ciou", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "ciou"]


def _models(case, extra=(), tmp_path=None):
    """Return (detectron2 model, builtin model) of ``case`` with the same weights (heads perturbed off their
    near-zero initialisation, so that deltas and scores are of order 1)."""
    config, opts = case
    opts = [*EXACT, *opts, *extra]
    torch.manual_seed(0)
    theirs = build_model(build_config(config, opts))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.startswith(("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.box_head.")):
                p.add_(torch.randn_like(p) * (0.05 if "box_predictor" in name else 0.02))
    path = tmp_path / "d2_weights.pth"
    torch.save({"model": theirs.state_dict()}, path)
    ours = build_detector(load_config(get_det_cfg(), config, opts))
    load_detector_weights(ours, str(path))
    return theirs, ours


def _inputs(n=2, h=64, w=96, seed=0, proposals=None):
    """Return (detectron2 inputs, builtin inputs): the same uint8 images and ground-truth boxes in both formats."""
    g = torch.Generator().manual_seed(seed)
    ours, theirs = [], []
    for i in range(n):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat([xy, xy + 8 + torch.rand(3, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])], 1)
        classes = torch.randint(0, 3, (3,), generator=g)
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        x = {"image": image, "height": h, "width": w}
        instances = Instances((h, w), gt_boxes=Boxes(boxes.clone()), gt_classes=classes.clone())
        theirs.append({**x, "instances": instances})
        ours.append({**x, "boxes": boxes.clone(), "classes": classes.clone()})
        if proposals is not None:
            p, logits = proposals[i]
            theirs[-1]["proposals"] = Instances((h, w), proposal_boxes=Boxes(p.clone()), objectness_logits=logits)
            ours[-1]["proposals"] = p.clone()
    return theirs, ours


def _train_step(model, inputs, seed=7):
    """Return (losses as floats, gradients by parameter name) of one forward and backward pass in training."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # both engines' samplers draw from the default generator
    with EventStorage():
        losses = model(inputs)
    sum(losses.values()).backward()
    return ({k: v.item() for k, v in losses.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def _assert_same_training(theirs, ours, d2_inputs, our_inputs):
    loss_d2, grad_d2 = _train_step(theirs, d2_inputs)
    loss_ours, grad_ours = _train_step(ours, our_inputs)
    assert loss_ours.keys() == loss_d2.keys()
    for k in loss_d2:
        assert loss_ours[k] == pytest.approx(loss_d2[k], rel=1e-4, abs=1e-7), (k, loss_ours, loss_d2)
    compared = 0
    for d2_key, key, how in detectron2_key_plan(ours):
        if how == "same" and d2_key in grad_d2:
            a, b = grad_ours[key], grad_d2[d2_key]
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item() + 1e-9, msg=key)
            compared += 1
    assert compared > 20
    return loss_ours


def _assert_same_detections(theirs, ours, d2_inputs, our_inputs):
    theirs.eval(), ours.eval()
    with torch.no_grad():
        a, b = theirs(d2_inputs), ours(our_inputs)
    total = 0
    for x, y in zip(a, b):
        inst = x["instances"]
        assert len(inst) == len(y["scores"]), (len(inst), len(y["scores"]))
        torch.testing.assert_close(y["boxes"], inst.pred_boxes.tensor, rtol=0, atol=1e-3)
        torch.testing.assert_close(y["scores"], inst.scores, rtol=0, atol=1e-5)
        assert torch.equal(y["classes"], inst.pred_classes)
        total += len(inst)
    assert total > 20


def _proposals_of(model, inputs, training: bool):
    """Return the proposal boxes of every image from the model's proposal generator (network-input coordinates),
    with the training or the test top-k."""
    model.train(training)
    torch.manual_seed(3)
    with torch.no_grad(), EventStorage():
        images = model.preprocess_image(inputs)
        if hasattr(model, "proposal_generator"):  # detectron2's
            gt = [x["instances"] for x in inputs] if training else None
            props, _ = model.proposal_generator(images, model.backbone(images.tensor), gt)
            return [p.proposal_boxes.tensor for p in props]
        features = model.backbone(images.tensors)
        targets = model.targets(inputs) if training else None
        boxes, _ = model.rpn(images, OrderedDict((f, features[f]) for f in model.rpn.in_features), targets)
        return boxes


def _assert_same_proposals(theirs, ours, d2_inputs, our_inputs):
    for training in (True, False):
        for a, b in zip(_proposals_of(theirs, d2_inputs, training), _proposals_of(ours, our_inputs, training)):
            assert len(a) == len(b) > 10, (training, len(a), len(b))
            torch.testing.assert_close(b, a, rtol=0, atol=1e-3)


@pytest.mark.parametrize("case", [FPN, C4], ids=["fpn", "c4"])
def test_faster_rcnn_losses_are_detectron2s_term_by_term(case, tmp_path):
    theirs, ours = _models(case, tmp_path=tmp_path)
    losses = _assert_same_training(theirs, ours, *_inputs())
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(v > 0 for v in losses.values())


@pytest.mark.parametrize("case", [FPN, C4], ids=["fpn", "c4"])
def test_faster_rcnn_proposals_are_detectron2s(case, tmp_path):
    theirs, ours = _models(case, tmp_path=tmp_path)
    _assert_same_proposals(theirs, ours, *_inputs(h=61, w=91))  # sizes no stride divides: padding counts


@pytest.mark.parametrize("case", [FPN, C4], ids=["fpn", "c4"])
def test_faster_rcnn_detections_are_detectron2s(case, tmp_path):
    theirs, ours = _models(case, tmp_path=tmp_path)
    _assert_same_detections(theirs, ours, *_inputs(h=61, w=91))


@pytest.mark.parametrize("extra", [LOSS_KEYS, GIOU, CIOU], ids=["beta-weights-boundary-offset", "giou-diou", "ciou"])
def test_loss_keys_mean_the_same_on_both_engines(extra, tmp_path):
    theirs, ours = _models(FPN, extra, tmp_path=tmp_path)
    d2_inputs, our_inputs = _inputs(seed=1)
    _assert_same_training(theirs, ours, d2_inputs, our_inputs)


def test_rpn_only_losses_and_proposal_files_are_detectron2s(tmp_path):
    theirs, ours = _models(RPN, tmp_path=tmp_path)
    d2_inputs, our_inputs = _inputs(h=64, w=80, seed=2)
    loss_d2, _ = _train_step(theirs, d2_inputs)
    loss_ours, _ = _train_step(ours, our_inputs)
    assert loss_ours.keys() == loss_d2.keys() == {"loss_rpn_cls", "loss_rpn_loc"}
    for k in loss_d2:
        assert loss_ours[k] == pytest.approx(loss_d2[k], rel=1e-4), k
    # what the evaluation writes into proposal files: boxes in original-image pixels, objectness logits
    for x in d2_inputs + our_inputs:
        x["height"], x["width"] = 128, 160
    theirs.eval(), ours.eval()
    with torch.no_grad():
        a, b = theirs(d2_inputs), ours(our_inputs)
    for x, y in zip(a, b):
        p = x["proposals"]
        assert len(p) == len(y["proposals"]) > 10
        torch.testing.assert_close(y["proposals"], p.proposal_boxes.tensor, rtol=0, atol=1e-3)
        torch.testing.assert_close(y["objectness_logits"], p.objectness_logits, rtol=1e-5, atol=1e-5)


def test_fast_rcnn_on_a_proposal_file_is_detectron2s(tmp_path):
    """Proposals written in detectron2's file format and read back: both engines' box heads train and detect alike."""
    g = torch.Generator().manual_seed(4)
    boxes, logits = [], []
    for _ in range(2):
        xy = torch.rand(40, 2, generator=g) * torch.tensor([70.0, 45.0])
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(40, 2, generator=g) * 30], 1).clamp(max=torch.tensor(
            [96.0, 64.0, 96.0, 64.0])).numpy())
        logits.append(torch.randn(40, generator=g).numpy())
    path = save_proposal_file(str(tmp_path / "box_proposals.pkl"), [1, 2], boxes, logits)
    data = load_proposal_file(path)
    proposals = [(torch.as_tensor(b, dtype=torch.float32), torch.as_tensor(s, dtype=torch.float32))
                 for b, s in zip(data["boxes"], data["objectness_logits"])]
    theirs, ours = _models(FAST_RCNN, tmp_path=tmp_path)
    assert ours.rpn is None
    d2_inputs, our_inputs = _inputs(seed=5, proposals=proposals)
    losses = _assert_same_training(theirs, ours, d2_inputs, our_inputs)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    _assert_same_detections(theirs, ours, d2_inputs, our_inputs)


def test_optimizer_groups_and_learning_rates_are_detectron2s():
    """Weight decay of norm and bias parameters, the bias learning rate and the warm-up: every parameter's rate and
    decay at every iteration, from each engine's optimizer and schedule built on the same model."""
    from detectron2.solver import build_lr_scheduler as d2_schedule
    from detectron2.solver import build_optimizer as d2_optimizer

    from wrn_det.detection.train import build_lr_schedule, build_optimizer

    config, opts = FPN
    opts = [*EXACT, *opts, "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.NORM", "BN",
            "MODEL.FPN.NORM", "GN", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
            "SOLVER.BASE_LR", "0.02", "SOLVER.BIAS_LR_FACTOR", "2.0", "SOLVER.WEIGHT_DECAY_BIAS", "0.0003",
            "SOLVER.WEIGHT_DECAY_NORM", "0.00005", "SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.01",
            "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(25, 35)"]
    d2_cfg, our_cfg = build_config(config, opts), load_config(get_det_cfg(), config, opts)
    model = build_model(d2_cfg)
    theirs, ours = d2_optimizer(d2_cfg, model), build_optimizer(our_cfg, model)

    def per_param(opt):
        return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    a, b = per_param(theirs), per_param(ours)
    assert a == b and len(a) == len([p for p in model.parameters() if p.requires_grad])
    # weights; norm weights (WEIGHT_DECAY_NORM); every bias, a norm layer's too (BIAS_LR_FACTOR, WEIGHT_DECAY_BIAS)
    assert set(b.values()) == {(0.02, 0.0001), (0.02, 0.00005), (0.04, 0.0003)}
    schedule, scheduler = build_lr_schedule(our_cfg, ours), d2_schedule(d2_cfg, theirs)
    for it in range(40):
        schedule.apply(it)
        a, b = per_param(theirs), per_param(ours)
        assert a.keys() == b.keys() and all(a[k][0] == pytest.approx(b[k][0], rel=1e-9) for k in a), it
        scheduler.step()
