"""The builtin engine's own fast pieces give the numbers of the pieces they replace.

RoIAlign (CPU kernel) against torchvision's ``roi_align`` and detectron2's ``ROIPooler``;
anchors against detectron2's ``DefaultAnchorGenerator``; Winograd convolutions against
``nn.Conv2d``; whole detectors (losses, boxes, scores) against the same detector with
torchvision's pooler, as the engine was before its own kernel. The pieces are chosen when a
detector is built (``MODEL.FAST_CPU``): with the keys off it is made of torchvision's.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, box_iou, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import LevelMapper

from wrn_det.detection.modeling import fast_conv
from wrn_det.detection.modeling import poolers as pooling
from wrn_det.detection.config import get_det_cfg
from wrn_det.detection.modeling.backbone import FeaturePyramid
from wrn_det.detection.modeling.fast_conv import FastConv2d, fast_convs
from wrn_det.detection.modeling import build_detector
from wrn_det.detection.modeling.roi_heads import FCBoxHead, ROIPooler
from wrn_det.detection.modeling.rpn import RPNConvHead
from wrn_det.detection.modeling.poolers import assign_boxes_to_levels, boxes_to_rois, multilevel_roi_align
from wrn_det.detection.modeling.rpn import AnchorGenerator
from wrn_det.engine.config import load_config

STRIDES = [4, 8, 16, 32]


def _features(seed=0, n=2, c=16, h=48, w=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, math.ceil(h / (s / 4)), math.ceil(w / (s / 4)), generator=g, dtype=dtype)
            for s in STRIDES]


def _boxes(n_images=2, per_image=60, seed=1, w=256, h=192):
    """Boxes of every kind: ordinary, tiny, empty, inverted, partly and wholly outside the image, huge."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        xy = torch.rand(per_image, 2, generator=g) * torch.tensor([w, h])
        wh = torch.rand(per_image, 2, generator=g) ** 2 * torch.tensor([w, h]) * 0.8
        b = torch.cat([xy, xy + wh], 1)
        b[:4, 2:] = b[:4, :2]                                   # empty
        b[4:6, 2:] = b[4:6, :2] - 5                             # inverted
        b[6:8] = torch.tensor([[-40.0, -30.0, 20.0, 10.0], [w - 10.0, h - 5.0, w + 60.0, h + 50.0]])
        b[8] = torch.tensor([-300.0, -300.0, -200.0, -250.0])   # wholly outside
        b[9] = torch.tensor([-50.0, -50.0, 3 * w, 3 * h])       # larger than the image
        b[10] = b[10, :2].repeat(2) + torch.tensor([0.0, 0.0, 0.3, 0.2])  # tiny
        out.append(b)
    return out


def _reference_pool(feats, boxes, aligned, sampling_ratio, size=7):
    """The engine's pooling before its own kernel: torchvision's level rule and roi_align per level."""
    rois = boxes_to_rois(boxes)
    levels = LevelMapper(2, 5)(boxes)
    out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], size, size))
    for lvl, (f, s) in enumerate(zip(feats, STRIDES)):
        idx = torch.where(levels == lvl)[0]
        out[idx] = roi_align(f, rois[idx], size, 1.0 / s, sampling_ratio, aligned)
    return out


@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 0), (False, 0), (True, 2), (False, 1)])
def test_multilevel_roi_align_equals_torchvision_forward_and_backward(aligned, sampling_ratio):
    feats, boxes = _features(), _boxes()
    rois = boxes_to_rois(boxes)
    levels = assign_boxes_to_levels(rois[:, 1:], 2, 5)
    assert torch.equal(levels, LevelMapper(2, 5)(boxes))
    ref_in = [f.clone().requires_grad_() for f in feats]
    our_in = [f.clone().requires_grad_() for f in feats]
    ref = _reference_pool(ref_in, boxes, aligned, sampling_ratio)
    ours = multilevel_roi_align(our_in, rois, levels, [1.0 / s for s in STRIDES], 7, sampling_ratio, aligned)
    assert ours.shape == ref.shape and ours.is_contiguous()
    # same sampling points and weights; only the order of the float sums differs
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(ref) > ref.numel() // 2  # the test pools real values, not zeros
    grad = torch.randn_like(ref)
    ref.backward(grad)
    ours.backward(grad)
    for a, b in zip(ref_in, our_in):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-4)
    # without gradients the CPU kernel may hand out channels-last memory: the same values
    with torch.no_grad():
        cl = multilevel_roi_align(feats, rois, levels, [1.0 / s for s in STRIDES], 7, sampling_ratio, aligned,
                                  channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref.detach(), rtol=1e-5, atol=1e-5)


def test_single_level_float64_huge_and_empty_inputs():
    f = _features(dtype=torch.float64)[2]
    rois = boxes_to_rois(_boxes(per_image=20)).double()
    ours = pooling.roi_align(f, rois, 14, 1 / 16, 0, True)
    torch.testing.assert_close(ours, roi_align(f, rois, 14, 1 / 16, 0, True), rtol=1e-10, atol=1e-10)
    empty = pooling.roi_align(f, rois[:0], 14, 1 / 16, 0, True)
    assert empty.shape == (0, f.shape[1], 14, 14)
    # a RoI a hundred times its map (more than MAX_GRID samples a side) is torchvision's to pool, gradient too
    rois[3, 1:] = torch.tensor([-9000.0, -100.0, 9000.0, 200.0], dtype=rois.dtype)
    a, b = f.clone().requires_grad_(), f.clone().requires_grad_()
    ours, ref = pooling.roi_align(a, rois, 14, 1 / 16, 0, True), roi_align(b, rois, 14, 1 / 16, 0, True)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_pooler_equals_detectron2_roi_pooler():
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from detectron2.modeling.poolers import ROIPooler as D2Pooler
    from detectron2.structures import Boxes

    feats, boxes = _features(c=8), _boxes()
    for pooler_type in ("ROIAlignV2", "ROIAlign"):
        theirs = D2Pooler(7, [1.0 / s for s in STRIDES], 0, pooler_type)(feats, [Boxes(b) for b in boxes])
        ours = ROIPooler(["p2", "p3", "p4", "p5"], STRIDES, 7, 0, aligned=pooler_type == "ROIAlignV2")(
            dict(zip(["p2", "p3", "p4", "p5"], feats)), boxes)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_anchors_are_detectron2s_and_know_each_stride():
    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    strides = [4, 8, 16, 32, 64]
    ours = AnchorGenerator(sizes, ratios, strides)
    maps = [torch.zeros(2, 1, 128 // s, 192 // s, dtype=torch.bfloat16) for s in strides]
    anchors = ours(maps)
    assert [a.dtype for a in anchors] == [torch.float32] * 5  # whatever the maps' dtype
    # detectron2's cell anchors, not rounded: w = sqrt(s^2 / a), h = a w, centred on each grid point (offset 0)
    w = math.sqrt(32 * 32 / 0.5)
    assert anchors[0][0].tolist() == pytest.approx([-w / 2, -w / 4, w / 2, w / 4], abs=1e-5)
    assert anchors[0][3 * 5 + 1].tolist() == pytest.approx([4 * 5 - 16, -16, 4 * 5 + 16, 16], abs=1e-5)
    try:
        from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
    except ImportError:
        pass
    else:
        theirs = DefaultAnchorGenerator(sizes=[list(s) for s in sizes], aspect_ratios=[list(r) for r in ratios],
                                        strides=strides, offset=0.0)
        assert all(torch.equal(a, b.tensor) for a, b in zip(anchors, theirs(maps)))
    # padded to 32 (as detectron2 pads): the max-pooled top level keeps its stride of 64
    maps = [torch.zeros(1, 1, math.ceil(96 / s), math.ceil(160 / s)) for s in strides]
    top = ours(maps)[-1]
    centres = (top[:, :2] + top[:, 2:]) / 2
    assert sorted(set(centres[:, 0].tolist())) == [0.0, 64.0, 128.0]
    # several sizes on a level: listed ratio-major, the order of every builtin checkpoint's RPN head
    (cells,) = AnchorGenerator(((32, 64),), ((0.5, 1.0),), (16,))([torch.zeros(1, 1, 1, 1)])
    assert (cells[:, 2] - cells[:, 0]).tolist() == pytest.approx([math.sqrt(2) * 32, math.sqrt(2) * 64, 32, 64])


def _nnpack_calls(monkeypatch) -> list:
    """Count the calls of NNPACK's convolution (appends one item per call)."""
    calls, nnpack = [], torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or nnpack(*a))
    return calls


def test_winograd_conv_is_nn_conv2d_outside_the_context_and_close_inside(one_thread, monkeypatch):
    if not fast_conv.winograd_available():
        pytest.skip("this PyTorch has no NNPACK")
    torch.manual_seed(0)
    ref = nn.Conv2d(32, 48, 3, padding=1)
    torch.manual_seed(0)
    conv = FastConv2d(32, 48, 3, padding=1)
    # nn.Conv2d's parameters, keys and initial draws
    assert list(conv.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(conv.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(2, 32, 40, 48)
    assert torch.equal(conv(x), ref(x))  # outside fast_convs(): exactly nn.Conv2d
    # a padding the fast paths do not take (reflect) is nn.Conv2d's computation inside the context too
    reflect = FastConv2d(32, 32, 3, padding=1, padding_mode="reflect")
    reflect_ref = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
    reflect_ref.load_state_dict(reflect.state_dict())
    xr, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(xr)
    small = torch.randn(1, 32, 8, 8)
    calls = _nnpack_calls(monkeypatch)
    with fast_convs():
        assert torch.equal(reflect(x), reflect_ref(x)) and not calls
        y = conv(xw)
        assert torch.equal(conv(small), ref(small))  # too small a map: the direct convolution
    assert len(calls) == 2  # one per image
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    # the input's gradient: NNPACK's convolution of the output gradient with the flipped kernel,
    # one per image; the weight's and bias's: the ordinary convolution's, for the whole batch
    assert len(calls) == 4
    torch.testing.assert_close(xw.grad, xr.grad, rtol=1e-4, atol=1e-4 * xr.grad.abs().max().item())
    assert torch.equal(conv.weight.grad, ref.weight.grad) and torch.equal(conv.bias.grad, ref.bias.grad)
    # padding 0: the input's gradient takes padding 2
    valid = FastConv2d(32, 32, 3)
    valid_ref = nn.Conv2d(32, 32, 3)
    valid_ref.load_state_dict(valid.state_dict())
    xv = torch.randn(2, 32, 40, 48, requires_grad=True)
    xv_ref = xv.detach().clone().requires_grad_()
    with fast_convs():
        yv = valid(xv)
    yv_ref = valid_ref(xv_ref)
    gv = torch.randn_like(yv)
    yv.backward(gv)
    yv_ref.backward(gv)
    assert len(calls) == 8 and xv.grad.shape == xv.shape
    torch.testing.assert_close(xv.grad, xv_ref.grad, rtol=1e-4, atol=1e-4 * xv_ref.grad.abs().max().item())
    # NNPACK runs on one thread: with two, only large maps take it; with more, none
    for threads, map_size, taken in ((2, (40, 48), False), (2, (112, 120), True), (4, (112, 120), False)):
        torch.set_num_threads(threads)
        xt = torch.randn(1, 32, *map_size)
        before = len(calls)
        with torch.no_grad(), fast_convs():
            conv(xt)
        assert (len(calls) > before) == taken, (threads, map_size)
    torch.set_num_threads(1)
    with fast_convs():
        traced = torch.jit.trace(conv, x, check_trace=False)
    assert "nnpack" not in str(traced.graph) and "mkldnn" not in str(traced.graph)
    # a small map with many channels in training: im2col + GEMM, the direct convolution's rounding,
    # and its gradient
    wide = FastConv2d(256, 256, 3, stride=2, padding=1)
    plain = nn.Conv2d(256, 256, 3, stride=2, padding=1)
    plain.load_state_dict(wide.state_dict())
    xg = torch.randn(2, 256, 7, 8, requires_grad=True)  # 56 pixels: at most a quarter of the channels
    xp = xg.detach().clone().requires_grad_()
    with fast_convs():
        yg = wide(xg)
    yp = plain(xp)
    torch.testing.assert_close(yg, yp, rtol=1e-5, atol=1e-5)
    assert not torch.equal(yg, yp)  # it did take the GEMM path
    g = torch.randn_like(yg)
    yg.backward(g)
    yp.backward(g)
    torch.testing.assert_close(xg.grad, xp.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wide.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1, bias=False), dict(kernel_size=1),
                                dict(kernel_size=7, stride=2, padding=3), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, padding=2, dilation=2, groups=4)],
                         ids=["3x3", "1x1", "7x7-s2", "3x3-s2", "dilated-grouped"])
def test_packed_weights_in_inference(kw, monkeypatch):
    if not fast_conv.packing_available():
        pytest.skip("this PyTorch has no oneDNN weight packing")
    fast_conv.clear_packed_weights()
    torch.manual_seed(0)
    ref = nn.Conv2d(128, 128, **kw)
    conv = FastConv2d(128, 128, **kw)
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(2, 128, 3, 3)  # a small map: the kernel has at least 12x one image's elements
    with torch.no_grad(), fast_convs():
        first, second, third = conv(x), conv(x), conv(x)
        large = torch.randn(1, 128, 32, 32)
        conv(large), conv(large)  # a large map: never packed
    expected = ref(x)
    assert torch.equal(first, expected)  # a shape's first call: the plain convolution
    assert len(fast_conv._PACKED.entries) == 1  # made on the second
    for y in (second, third):  # oneDNN's rounding on its own layout, handed back in the input's
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(y, expected) and y.is_contiguous()
    # the entry follows the weight: an in-place write (an optimizer step) and a load replace it
    with torch.no_grad():
        ref.weight.mul_(-2.0)
    conv.load_state_dict(ref.state_dict())
    with torch.no_grad(), fast_convs():
        conv(x)
        after = conv(x)
    torch.testing.assert_close(after, ref(x), rtol=1e-5, atol=1e-5)
    assert len(fast_conv._PACKED.entries) == 1  # the stale entry is gone
    # with gradients (training), never the packed weight
    with fast_convs():
        assert torch.equal(conv(x), ref(x))
    # built with pack_weights=False (MODEL.FAST_CPU.PACK_WEIGHTS False): plain calls, no entry
    unpacked = FastConv2d(128, 128, **kw, pack_weights=False)
    unpacked.load_state_dict(ref.state_dict())
    with torch.no_grad(), fast_convs():
        assert all(torch.equal(unpacked(x), ref(x)) for _ in range(3))
    assert len(fast_conv._PACKED.entries) == 1
    # a budget: the least recently used entries go
    monkeypatch.setattr(fast_conv, "PACKED_WEIGHT_BYTES", conv.weight.numel() * 4 * 2)
    with torch.no_grad(), fast_convs():
        for hw in ((2, 4), (2, 5), (3, 2)):
            xs = torch.randn(1, 128, *hw)
            conv(xs)
            torch.testing.assert_close(conv(xs), ref(xs), rtol=1e-5, atol=1e-5)
    assert len(fast_conv._PACKED.entries) == 2 and fast_conv._PACKED.bytes <= fast_conv.PACKED_WEIGHT_BYTES
    del conv
    fast_conv.clear_packed_weights()
    assert fast_conv._PACKED.bytes == 0 and not fast_conv._PACKED.entries


def _cfg(*opts, config="shapes_wrn_frcnn.yaml", net="wrn_10_1"):
    return load_config(get_det_cfg(), config,
                       ["MODEL.DEVICE", "cpu", "MODEL.WRN.NAME", net, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *opts])


class _TorchvisionPooler(nn.Module):
    """The engine's RoI pooler before its own kernel (torchvision's roi_align per level, LevelMapper)."""

    def __init__(self, pooler: ROIPooler):
        super().__init__()
        self.p = pooler

    def forward(self, x, boxes, image_shapes=None):
        feats = [x[n] for n in self.p.featmap_names]
        rois = boxes_to_rois(boxes)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.p.pooled_size, self.p.scales[0], self.p.sampling_ratio, self.p.aligned)
        levels = LevelMapper(self.p.min_level, self.p.max_level)(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], self.p.pooled_size, self.p.pooled_size))
        for lvl, (f, s) in enumerate(zip(feats, self.p.scales)):
            idx = torch.where(levels == lvl)[0]
            out[idx] = roi_align(f, rois[idx], self.p.pooled_size, s, self.p.sampling_ratio, self.p.aligned)
        return out


def _reference_detector(model):
    """The same detector (same weights) with torchvision's pooler (``model`` has plain convs)."""
    assert not any(isinstance(m, FastConv2d) for m in model.modules())
    ref = copy.deepcopy(model)
    ref.roi_heads.box_roi_pool = _TorchvisionPooler(model.roi_heads.box_roi_pool)
    return ref


def _inputs(h, w, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 6 + torch.rand(3, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        out.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
                    "boxes": torch.cat([xy, xy + wh], 1), "classes": torch.randint(0, 3, (3,), generator=g),
                    "height": 2 * h, "width": 2 * w})
    return out


def _run(model, inputs):
    model.train()
    torch.manual_seed(7)  # the RPN's and RoI heads' samplers draw from the global generator
    losses = model(inputs)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        dets = model(inputs)
    return {k: v.item() for k, v in losses.items()}, grads, dets


def _matched(a, b):
    """Assert two detection sets are the same boxes, scores and classes (order may differ among equal scores)."""
    assert len(a["boxes"]) == len(b["boxes"]) > 0
    iou = box_iou(a["boxes"], b["boxes"])
    best = iou.max(dim=1)
    assert best.values.min() > 0.999
    torch.testing.assert_close(a["scores"], b["scores"][best.indices], rtol=1e-3, atol=1e-5)
    assert torch.equal(a["classes"], b["classes"][best.indices])


@pytest.mark.parametrize("opts, size", [
    ([], (64, 96)),
    (["MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign", "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", "2"], (64, 96)),
    (["config=Base-WRN-RCNN-FPN.yaml", "net=wide_resnet18_1", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
      "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "256", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128",
      "MODEL.RPN.POST_NMS_TOPK_TRAIN", "300", "MODEL.RPN.POST_NMS_TOPK_TEST", "300"], (128, 192)),
], ids=["shapes-v2", "shapes-legacy", "imagenet-style-p2-p6"])
def test_detector_equals_the_torchvision_pieces(opts, size, monkeypatch, one_thread):
    # one thread: the size from which the Winograd path is taken (these maps reach it only there)
    # inputs a multiple of the coarsest stride (8 and 64 here), where the old and new padding agree
    kw = dict(o.split("=") for o in opts if "=" in o)
    opts = [o for o in opts if "=" not in o]
    torch.manual_seed(0)
    # exact pieces first: plain convolutions, the CPU RoIAlign kernel
    model = build_detector(_cfg(*opts, "MODEL.FAST_CPU.CONV", "False", **kw))
    ref = _reference_detector(model)
    torch.manual_seed(0)
    winograd = build_detector(_cfg(*opts, **kw))  # FastConv2d (the default), the same initial weights
    assert all(torch.equal(a, b) for a, b in zip(winograd.state_dict().values(), model.state_dict().values()))
    inputs = _inputs(*size)
    losses, grads, dets = _run(model, inputs)
    ref_losses, ref_grads, ref_dets = _run(ref, inputs)
    assert losses.keys() == ref_losses.keys()
    for k in losses:
        assert losses[k] == pytest.approx(ref_losses[k], rel=1e-5, abs=1e-6), k
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5 * ref_grads[k].abs().max().item())
    for a, b in zip(dets, ref_dets):
        _matched(a, b)
    # Winograd convolutions: float rounding of 1e-5 relative per convolution
    calls = _nnpack_calls(monkeypatch)
    losses, _, dets = _run(winograd, inputs)
    assert calls or not fast_conv.winograd_available()  # the Winograd path was taken
    for k in losses:
        assert losses[k] == pytest.approx(ref_losses[k], rel=1e-4, abs=1e-6), k
    for a, b in zip(dets, ref_dets):
        _matched(a, b)


def _tv_roi_align_calls(monkeypatch) -> list:
    """Count the calls of torchvision's roi_align made by the pooling module (one item per call)."""
    calls, tv = [], pooling.tv_roi_align
    monkeypatch.setattr(pooling, "tv_roi_align", lambda *a, **k: calls.append(1) or tv(*a, **k))
    return calls


@pytest.mark.parametrize("config, net, size", [("shapes_wrn_frcnn.yaml", "wrn_10_1", (64, 96)),
                                               ("Base-WRN-RCNN-C4.yaml", "wide_resnet18_1", (128, 192))],
                         ids=["fpn", "c4"])
def test_the_keys_choose_the_pieces_when_the_detector_is_built(config, net, size, monkeypatch, one_thread):
    # one thread: maps of these sizes take the Winograd path there
    torch.manual_seed(0)
    plain = build_detector(_cfg("MODEL.FAST_CPU.CONV", "False", "MODEL.FAST_CPU.ROI_ALIGN", "False",
                                config=config, net=net)).eval()
    torch.manual_seed(0)
    fast = build_detector(_cfg(config=config, net=net)).eval()  # the defaults: every fast piece
    torch.manual_seed(0)
    unpacked = build_detector(_cfg("MODEL.FAST_CPU.PACK_WEIGHTS", "False", config=config, net=net))
    convs = [n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(isinstance(m, FastConv2d) for m in plain.modules())
    # every convolution (backbone, FPN, RPN head, box head) is a FastConv2d, under the same names and weights
    assert [n for n, m in fast.named_modules() if isinstance(m, FastConv2d)] == convs
    assert all(m.pack_weights for m in fast.modules() if isinstance(m, FastConv2d))
    assert [n for n, m in unpacked.named_modules() if isinstance(m, FastConv2d) and not m.pack_weights] == convs
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    assert not plain.roi_heads.box_roi_pool.cpu_kernel and fast.roi_heads.box_roi_pool.cpu_kernel
    inputs = [{k: v for k, v in x.items() if k in ("image", "height", "width")} for x in _inputs(*size, n=1)]
    tv_calls, nnpack_calls = _tv_roi_align_calls(monkeypatch), _nnpack_calls(monkeypatch)
    with torch.no_grad():
        (a,) = plain(inputs)
        assert tv_calls and not nnpack_calls  # torchvision's roi_align, plain convolutions
        del tv_calls[:]
        (b,) = fast(inputs)
    assert not tv_calls  # the CPU kernel pooled every box
    assert nnpack_calls or not fast_conv.winograd_available()
    _matched(a, b)


def test_torchvision_blocks_built_with_the_conv_class_are_torchvisions():
    """FPN, RPN head and box head: torchvision's keys, initial weights (the box head's fully connected layers
    excepted: detectron2's) and outputs, built with FastConv2d."""
    x = [torch.randn(1, c, s, s) for c, s in ((16, 24), (32, 12), (64, 6))]
    for ours_of, theirs_of, run in [
        (lambda conv: FeaturePyramid([16, 32, 64], 24, LastLevelMaxPool(), nn.BatchNorm2d, conv_layer=conv),
         lambda: FeaturePyramidNetwork([16, 32, 64], 24, LastLevelMaxPool(), nn.BatchNorm2d),
         lambda m: list(m(dict(zip("abc", x))).values())),
        (lambda conv: RPNConvHead(64, 3, conv_depth=2, conv_layer=conv), lambda: RPNHead(64, 3, conv_depth=2),
         lambda m: [t for ts in m(x[2:]) for t in ts]),
        (lambda conv: FCBoxHead((64, 6, 6), [32, 32], [48], nn.BatchNorm2d, conv_layer=conv),
         lambda: FastRCNNConvFCHead((64, 6, 6), [32, 32], [48], nn.BatchNorm2d), lambda m: [m(x[2])]),
    ]:
        torch.manual_seed(0)
        theirs = theirs_of().eval()
        torch.manual_seed(0)
        ours = ours_of(FastConv2d).eval()
        assert list(ours.state_dict()) == list(theirs.state_dict()) and isinstance(ours, type(theirs))
        fcs = [n for n, m in ours.named_modules() if isinstance(m, nn.Linear)]
        assert all(torch.equal(a, b) for k, a, b in zip(ours.state_dict(), ours.state_dict().values(),
                                                         theirs.state_dict().values()) if k.rsplit(".", 1)[0] not in fcs)
        for name in fcs:  # detectron2's c2_xavier_fill: U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), zero bias
            fc = ours.get_submodule(name)
            bound = math.sqrt(3.0 / fc.in_features)
            assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound and not fc.bias.any()
        theirs.load_state_dict(ours.state_dict())
        assert all(type(m) is FastConv2d for m in ours.modules() if isinstance(m, nn.Conv2d))
        assert not any(type(m) is FastConv2d for m in ours_of(None).modules())
        with torch.no_grad(), fast_convs():
            for a, b in zip(run(ours), run(theirs)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_detectron2_engine_builds_plain_convolutions():
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from detectron2.modeling import build_model

    from wrn_det.d2.train import build_config

    for config in ("shapes_wrn_frcnn.yaml", "Base-WRN-RCNN-C4.yaml"):
        cfg = build_config(config, ["MODEL.DEVICE", "cpu", "MODEL.WRN.NAME", "wrn_10_1" if "shapes" in config
                                    else "wide_resnet18_1", "MODEL.FAST_CPU.CONV", "True"])
        model = build_model(cfg)
        assert any(isinstance(m, nn.Conv2d) for m in model.backbone.modules())
        assert not any(isinstance(m, FastConv2d) for m in model.modules()), config
        assert cfg.MODEL.FAST_CPU.CONV  # the caller's config is left as it was


def test_fc_box_head_reads_channels_last_features_as_contiguous_ones():
    model = build_detector(_cfg()).eval()
    head = model.roi_heads.box_head
    x = torch.randn(5, 64, 7, 7)
    with torch.no_grad():
        a = head(x)
        b = head(x.contiguous(memory_format=torch.channels_last))
        head[1].weight.mul_(2)  # a changed weight is seen (the permuted copy follows it)
        c = head(x.contiguous(memory_format=torch.channels_last))
        d = head(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(c, b)


def test_fpn_input_is_padded_to_the_bottom_up_stride():
    cfg = load_config(get_det_cfg(), "Base-WRN-RCNN-FPN.yaml", ["MODEL.DEVICE", "cpu", "MODEL.WRN.NAME", "wide_resnet18_1",
                                                                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    model = build_detector(cfg).eval()
    assert model.size_divisibility == 32
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    with torch.no_grad():
        batch = model.preprocess_image([{"image": image}])
        (out,) = model([{"image": image, "height": 100, "width": 150}])
    assert tuple(batch.tensors.shape[-2:]) == (128, 160)
    assert len(out["boxes"]) > 0 and torch.isfinite(out["boxes"]).all()
    assert out["boxes"][:, 2].max() <= 150 and out["boxes"][:, 3].max() <= 100
