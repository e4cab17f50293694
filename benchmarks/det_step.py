"""Detection training time per iteration and inference time per image: builtin engine, torchvision, detectron2.

Same synthetic images (random pixels, six random boxes each, 4:3) and the same weights in
every row of one architecture; each training iteration is forward, backward and an SGD
step on ``--batch`` images; inference is one image at a time in eval mode.

Randomly initialised heads on random pixels do not load the engines as a trained
detector does (the RPN's random box deltas shrink most proposals to nothing, and no
class passes the score threshold), so the heads start as :func:`trained_like` sets
them: RPN box deltas zero (the proposals are the anchors, ranked by random objectness;
1000 per image survive NMS, as with trained weights) and a few classes favoured by the
classifier's bias (post-processing then has thousands of candidates to threshold and
suppress). Every row gets the same heads.
Rows (``--rows``, default all that can run):

* ``builtin``: the builtin engine, WRN-34-2-FPN (``configs/COCO-Detection/wrn34_2_frcnn.yaml``);
* ``d2``: detectron2's engine, the same config through ``wrn_det.d2``, with the builtin
  row's weights (so both see the same proposals);
* ``builtin-r50``: the builtin engine, ResNet-50-FPN (the same config with
  ``MODEL.WRN.NAME wide_resnet50_1``, torchvision's ResNet-50 layout);
* ``torchvision``: torchvision's own ``fasterrcnn_resnet50_fpn`` (FrozenBN, res3..res5
  trained as the builtin config's ``FREEZE_AT 2`` does: stem and res2 frozen, its own defaults)
  with the ``builtin-r50`` row's weights;
* ``d2-r50``: detectron2's own R50-FPN (``COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml``
  of its model zoo, with the stride in the 3x3 convolutions and the pixel statistics of
  the builtin config, so that it is the same network) with the ``builtin-r50`` row's weights.

The rows alternate (inference of ``--batch`` images with each row, in turn, ``--iters``
times, on the initial weights; then one training iteration of each, in turn) and the
medians are reported, so that load from other processes
falls on every row. Each ``--size`` gives one table: short side ``size``, long side
``4/3 size`` (at most 1333: ``--size 800`` is COCO's training size).

Goals (detectron2 time / builtin time, WRN-34-2-FPN, same config and precision): training
>= 1.2x on the CPU, >= 1.3x on a GPU, and inference >= 1.5x; builtin ResNet-50-FPN inference no
slower than torchvision's model (torchvision time / builtin time >= 1).

    python benchmarks/det_step.py [--size 256 800] [--batch 2 8] [--iters 3] [--device cpu]
                                  [--rows builtin,d2,builtin-r50,torchvision,d2-r50] [--amp bf16|fp16]
                                  [--builtin-opts MODEL.CHANNELS_LAST True ...]

Every table also gives images per second (training: batch / s per iteration; inference:
1 / s per image) and, on CUDA, each row's peak memory in training (``torch.cuda.max_memory_allocated``
around its iterations); each row prints a ``RESULT det_step_<row>_...`` line as its table is done.
``--amp fp16`` is float16 autocast with a gradient scaler (``torch.amp.GradScaler``), for the
builtin and detectron2 rows (torchvision's and detectron2's R50 rows run in fp32 and bf16 only).
``--builtin-opts``: config overrides for the builtin rows alone (``MODEL.CHANNELS_LAST True``,
``MODEL.COMPILE True``).

Ablation rows, by name only: the builtin row built with one fast CPU piece off by its
config key (same weights): ``builtin-no-fastconv`` (``MODEL.FAST_CPU.CONV False``: ``nn.Conv2d``,
plain oneDNN, for every convolution), ``builtin-no-packing`` (``MODEL.FAST_CPU.PACK_WEIGHTS False``:
inference without the packed weights) and ``builtin-tv-roialign`` (``MODEL.FAST_CPU.ROI_ALIGN False``:
torchvision's RoIAlign kernel); with the plain ``builtin`` row they show what each speed-up gains. Their RESULT lines:
``det_*_gain_fastconv``, ``det_*_gain_packing`` and ``det_*_gain_roialign`` (ablated time /
builtin time). Every image of a run has one size, so from its second image the builtin engine's
inference runs on packed weights (see :mod:`wrn_det.detection.modeling.fast_conv`); ``--vary-sizes``
gives each inference image its own padded size instead (a stream with no size twice: no packing).

The ``--eval-only`` row (``--eval-only-run``, instead of the tables) times the user's whole
evaluation command, ``tools/train_net.py --eval-only``, on each engine: from the start of the
process to its exit (imports, model and weights, dataset checks, inference with the DataLoader's
workers, results file, COCO evaluation, pictures). It writes COCO-layout JPEGs (``coco_2017_val``:
``--eval-images`` shapes images of short side ``--size``, 80 categories given at random; 400
training images alike), trains the builtin engine's model on them for ``--train-iters``
iterations with ``tools/train_net.py`` (printed; kept in ``--work-dir``, or pass ``--weights``),
copies its weights into detectron2's layout, and alternates the two commands; RESULT line
``det_evalonly_d2_over_builtin_wrn34_2_fpn_s<size>`` (goal 1.5x). ``--eval-batch N`` adds the
builtin engine with ``TEST.IMS_PER_BATCH N`` (RESULT ``det_evalonly_gain_batch<N>``, no goal)::

    python benchmarks/det_step.py --eval-only-run [--size 256] [--eval-images 60] [--train-iters 300]
                                  [--iters 3] [--eval-batch 2] [--weights model_final.pth] [--work-dir DIR]
"""
import argparse
import logging
import os
import sys
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_utils import alternate, median, result, timed  # noqa: E402

CONFIG = "COCO-Detection/wrn34_2_frcnn.yaml"
D2_R50_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
# ablation rows: the builtin row built with one speed-up off,
# name -> (its config overrides, the name in the RESULT line)
ABLATIONS = {"builtin-no-fastconv": (["MODEL.FAST_CPU.CONV", "False"], "fastconv"),
             "builtin-no-packing": (["MODEL.FAST_CPU.PACK_WEIGHTS", "False"], "packing"),
             "builtin-tv-roialign": (["MODEL.FAST_CPU.ROI_ALIGN", "False"], "roialign")}
ROWS = ("builtin", "d2", "builtin-r50", "torchvision", "d2-r50") + tuple(ABLATIONS)
# rows run when --rows is not given (the ablation rows are asked for by name)
DEFAULT_ROWS = ROWS[:5]
LABELS = {"builtin": "builtin, WRN-34-2-FPN", "d2": "detectron2, WRN-34-2-FPN",
          "builtin-no-fastconv": "builtin WRN-34-2-FPN, oneDNN convs only",
          "builtin-no-packing": "builtin WRN-34-2-FPN, unpacked weights",
          "builtin-tv-roialign": "builtin WRN-34-2-FPN, torchvision RoIAlign",
          "builtin-r50": "builtin, ResNet-50-FPN", "torchvision": "torchvision fasterrcnn_resnet50_fpn",
          "d2-r50": "detectron2, its own R50-FPN"}
GOAL_TRAIN, GOAL_TRAIN_GPU, GOAL_INFER, GOAL_TV = 1.2, 1.3, 1.5, 1.0
# rows that run with --amp fp16 (float16 autocast and a gradient scaler)
FP16_ROWS = ("builtin", "d2") + tuple(ABLATIONS)


def make_inputs(n: int, size: int, seed: int = 0, vary: bool = False, num_classes: int = 80):
    """Return ``n`` dicts with a uint8 image of short side ``size`` (4:3, long side at most 1333),
    XYXY ``boxes`` and ``classes``. ``vary``: every image of another padded size (32 pixels
    less in height for every other image, 32 less in width every two images)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = size, min(size * 4 // 3, 1333)
        if vary:
            h, w = h - 32 * (i % 2), w - 32 * (i // 2)
        k = 6
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        out.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
                    "boxes": torch.cat([xy, xy + wh], 1), "classes": torch.randint(0, num_classes, (k,), generator=g),
                    "height": h, "width": w})
    return out


class Row:
    """One engine: ``train(batch)`` runs a training iteration, ``infer(x)`` detects on one image."""

    def __init__(self, model, train, infer):
        self.model, self.train, self.infer = model, train, infer


def _sgd(model):
    # learning rate 0: the step's arithmetic is done but the weights stay, so every round times the
    # same model and no engine can diverge on random pixels
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)


class Step:
    """Backward and SGD update of one row, through a gradient scaler under float16 (``AMP["scaler"]``)."""

    def __init__(self, model, device):
        self.opt = _sgd(model)
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=AMP["dtype"] == torch.float16)

    def __call__(self, loss) -> None:
        """Zero the gradients, backpropagate ``loss`` and update."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()


#: the autocast dtype of every row (None: float32), set by main()
AMP = {"dtype": None}
#: --builtin-opts: config overrides of the builtin rows, set by main()
BUILTIN_OPTS = []
#: --config: the project config of the builtin and d2 rows (and their ablations), set by main()
ROW_CONFIG = [CONFIG]


def builtin_row(opts, device, autocast, config: str = CONFIG) -> Row:
    """The builtin engine's Faster R-CNN built from ``config`` with the ``KEY VALUE`` overrides ``opts``.

    Every row is built from the same seed, so rows of one network have the same weights
    (the ablation rows' ``MODEL.FAST_CPU`` keys change no weight).
    """
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.modeling import build_detector
    from wrn_det.engine.config import load_config

    torch.manual_seed(0)
    cfg = load_config(get_det_cfg(), config, ["MODEL.DEVICE", str(device)] + opts + BUILTIN_OPTS)
    model = build_detector(cfg)
    trained_like(model)
    step = Step(model, device)

    def train(batch):
        model.train()
        with autocast():
            loss = sum(model(batch).values())
        step(loss)

    @torch.no_grad()
    def infer(x):
        model.eval()
        with autocast():
            return model([x])[0]

    return Row(model, train, infer)


@torch.no_grad()
def trained_like(model, favoured: int = 8) -> None:
    """Set a builtin detector's heads as described in the module docstring (in place).

    RPN: box-delta layer zero; objectness layer as initialised. Box predictor: class
    scores from the bias alone, ``favoured`` classes raised so that their scores pass the
    test threshold for every proposal, box deltas from the bias alone (zero).
    """
    model.rpn.head.bbox_pred.weight.zero_()
    model.rpn.head.bbox_pred.bias.zero_()
    model.roi_heads.box_predictor.cls_score.weight.zero_()
    model.roi_heads.box_predictor.bbox_pred.weight.zero_()  # detections at the proposals
    bias = model.roi_heads.box_predictor.cls_score.bias
    bias.zero_()
    bias[1:1 + favoured] = 3.0  # torchvision's class 0 is the background


def torchvision_row(builtin_r50: Row, size: int, device, autocast) -> Row:
    """torchvision's fasterrcnn_resnet50_fpn (its defaults), with the builtin ResNet-50-FPN row's weights."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    # res3..res5 trained (layer2..layer4), as the builtin config's FREEZE_AT 2
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    # min_size = the images' short side: torchvision's transform then leaves them at that size
    model = FasterRCNN(backbone, num_classes=81, min_size=size, max_size=1333).to(device)
    copy_builtin_to_torchvision(builtin_r50.model, model)
    step = Step(model, device)

    def to_tv(batch):
        imgs = [x["image"].to(device).float() / 255 for x in batch]
        tg = [{"boxes": x["boxes"].to(device), "labels": x["classes"].to(device) + 1} for x in batch]
        return imgs, tg

    def train(batch):
        model.train()
        imgs, tg = to_tv(batch)
        with autocast():
            loss = sum(model(imgs, tg).values())
        step(loss)

    @torch.no_grad()
    def infer(x):
        model.eval()
        with autocast():
            return model(to_tv([x])[0])[0]

    return Row(model, train, infer)


def copy_builtin_to_torchvision(builtin, tv) -> None:
    """Load the builtin ResNet-50-FPN detector's weights into torchvision's FasterRCNN (every tensor)."""
    sd = {}
    for k, v in builtin.state_dict().items():
        k = k.replace("backbone.bottom_up.net.", "backbone.body.")
        k = k.replace("roi_heads.box_head.1.", "roi_heads.box_head.fc6.").replace("roi_heads.box_head.3.",
                                                                                    "roi_heads.box_head.fc7.")
        sd[k] = v
    _load_every_key(tv, sd, "torchvision")


def _d2_resnet_key(key: str):
    """Return detectron2's ResNet key of a torchvision ResNet key (None for the classifier)."""
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return "stem.conv1." + ("weight" if parts[0] == "conv1" else "norm." + parts[1])
    if not parts[0].startswith("layer"):
        return None
    stage, block, name = f"res{int(parts[0][5:]) + 1}", parts[1], parts[2]
    if name == "downsample":
        return f"{stage}.{block}.shortcut." + ("weight" if parts[3] == "0" else "norm." + parts[4])
    if name.startswith("conv"):
        return f"{stage}.{block}.{name}.weight"
    return f"{stage}.{block}.conv{name[2:]}.norm.{parts[3]}"


def copy_builtin_to_d2(builtin, d2, resnet: bool = False) -> None:
    """Load a builtin FPN detector's weights into detectron2's model of the same network (every tensor).

    The keys are the project's detectron2 mapping (:func:`wrn_det.detection.weights.d2_keys.detectron2_key_plan`),
    written in the other direction: detectron2 puts the background class last and has no
    background box deltas. ``resnet``: detectron2's own ResNet and FPN names for the backbone.
    """
    from wrn_det.detection.weights.d2_keys import detectron2_key_plan

    own = builtin.state_dict()
    sd = {}
    for key, own_key, how in detectron2_key_plan(builtin):
        v = own[own_key]
        if how == "cls_score":
            v = torch.cat([v[1:], v[:1]])
        elif how == "bbox_pred":
            v = v[4:]
        if resnet and own_key.startswith("backbone.bottom_up.net."):
            key = "backbone.bottom_up." + _d2_resnet_key(own_key[len("backbone.bottom_up.net."):])
        elif resnet and key.startswith("backbone.fpn."):
            kind, i = key.split(".")[2:4]
            key = f"backbone.fpn_{'lateral' if kind == 'inner_blocks' else 'output'}{int(i) + 2}.{key.split('.')[-1]}"
        sd[key] = v
    _load_every_key(d2, sd, "detectron2")


def _load_every_key(model, state: dict, what: str) -> None:
    """Load ``state`` into ``model``, which must find every one of its keys there (extra keys are ignored)."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    if missing:
        raise RuntimeError(f"{what} keys without a builtin tensor: {missing[:5]}")
    model.load_state_dict({k: state[k] for k in target})


def detectron2_row(config: str, opts, device, autocast, builtin: Row) -> Row:
    """detectron2's GeneralizedRCNN from ``config`` (``wrn_det.d2`` for the project's configs), ``builtin``'s weights."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    if config == D2_R50_CONFIG:
        import detectron2
        from detectron2.config import get_cfg

        cfg = get_cfg()
        # the model zoo's file, found without detectron2.model_zoo (it imports pkg_resources, which
        # recent setuptools no longer has)
        cfg.merge_from_file(os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", config))
        mean, std = list(builtin.model.pixel_mean.flatten().tolist()), list(builtin.model.pixel_std.flatten().tolist())
        cfg.merge_from_list(["MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "", "MODEL.RESNETS.STRIDE_IN_1X1", False,
                             "MODEL.PIXEL_MEAN", mean, "MODEL.PIXEL_STD", std, "INPUT.FORMAT", "RGB"] + opts)
    else:
        from wrn_det.d2.train import build_config

        cfg = build_config(config, ["MODEL.DEVICE", str(device)] + opts)
    model = build_model(cfg)
    copy_builtin_to_d2(builtin.model, model, resnet=config == D2_R50_CONFIG)
    step = Step(model, device)

    def to_d2(x):
        h, w = x["image"].shape[-2:]
        inst = Instances((h, w), gt_boxes=Boxes(x["boxes"]), gt_classes=x["classes"])
        return {"image": x["image"], "instances": inst, "height": h, "width": w}

    def train(batch):
        model.train()
        with EventStorage(0), autocast():  # detectron2's heads log their statistics into the storage
            loss = sum(model([to_d2(x) for x in batch]).values())
        step(loss)

    @torch.no_grad()
    def infer(x):
        model.eval()
        with autocast():
            return model([{"image": x["image"], "height": x["height"], "width": x["width"]}])[0]

    return Row(model, train, infer)


def have_detectron2() -> bool:
    """Return True when detectron2 imports."""
    try:
        import detectron2.modeling  # noqa: F401
        return True
    except ImportError:
        return False


def build_rows(names, size: int, device, autocast):
    """Return ``name -> Row`` for the requested rows that can run here (detectron2 rows need detectron2)."""
    rows = {}
    d2 = have_detectron2()
    if "builtin" in names or "d2" in names:
        rows["builtin"] = builtin_row([], device, autocast, ROW_CONFIG[0])
    if "d2" in names and d2:
        rows["d2"] = detectron2_row(ROW_CONFIG[0], [], device, autocast, builtin=rows["builtin"])
    for name, (overrides, _) in ABLATIONS.items():
        if name in names:
            rows[name] = builtin_row(overrides, device, autocast, ROW_CONFIG[0])
    if "builtin-r50" in names or "torchvision" in names or ("d2-r50" in names and d2):
        rows["builtin-r50"] = builtin_row(["MODEL.WRN.NAME", "wide_resnet50_1"], device, autocast)
    if "torchvision" in names:
        rows["torchvision"] = torchvision_row(rows["builtin-r50"], size, device, autocast)
    if "d2-r50" in names and d2:
        rows["d2-r50"] = detectron2_row(D2_R50_CONFIG, [], device, autocast, builtin=rows["builtin-r50"])
    return {k: v for k, v in rows.items() if k in names}


def run_size(size: int, batch: int, a, device, autocast) -> dict:
    """Time every row at one size and batch; print the table and each row's RESULT line.

    Returns ``name -> (s/iter, s/image, detections/image, peak training memory in MiB or NaN)``.
    """
    # --vary-sizes: the warm-up round has images of its own, so that no size comes twice
    first = 1 if a.vary_sizes else 0
    inputs = make_inputs(batch * (max(a.iters, 1) + first), size, vary=a.vary_sizes, num_classes=a.num_classes)
    rows = build_rows(a.rows, size, device, autocast)
    h, w = inputs[0]["image"].shape[-2:]
    sizes = " and smaller, each its own size" if a.vary_sizes else ""
    precision = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}[a.amp]
    print(f"\n{device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{precision}; images {h}x{w}{sizes}, batch {batch}, median of {a.iters} alternating rounds", flush=True)
    cuda = device.type == "cuda"
    peaks = {}

    def train_side(name, row):
        def run(r):
            b = inputs[(max(r + first, 0) * batch) % len(inputs):][:batch]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t = timed(lambda: row.train(b), device)
            if cuda:
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
            return t
        return run

    dets = {}

    def infer_side(name, row):
        def run(r):
            b = inputs[(max(r + first, 0) * batch) % len(inputs):][:batch]
            outs = []
            t = sum(timed(lambda: outs.append(row.infer(x)), device) for x in b)
            dets.setdefault(name, []).extend(len(_boxes(o)) for o in outs)
            return t / len(b)
        return run

    # inference first, on the initial weights (training moves each engine's weights its own way)
    infer = alternate({k: infer_side(k, r) for k, r in rows.items()}, a.iters)
    train = alternate({k: train_side(k, r) for k, r in rows.items()}, a.iters) if not a.no_train else {}
    print(f"{'engine, backbone':<38}{'s/iter (train)':>15}{'img/s':>8}{'s/image (test)':>16}{'img/s':>8}"
          f"{'detections/image':>18}{'peak MiB':>10}")
    out = {}
    for k in rows:
        tr, inf = median(train.get(k, [])), median(infer[k])
        nd = sum(dets[k]) / max(len(dets[k]), 1)
        peak = peaks.get(k, float("nan"))
        out[k] = (tr, inf, nd, peak)
        print(f"{LABELS[k]:<38}{tr:>15.3f}{batch / tr:>8.2f}{inf:>16.3f}{1 / inf:>8.2f}{nd:>18.1f}{peak:>10.0f}",
              flush=True)
    for k in ("d2", "d2-r50"):
        if k in a.rows and k not in rows:
            print(f"{LABELS[k]:<38}{'detectron2 not installed':>31}")
    tag = _tag(a, batch)
    for k, (tr, inf, _, peak) in out.items():
        print(f"RESULT det_step_{k}_s{size}{tag} train {batch / tr:.3g} img/s, inference {1 / inf:.3g} img/s, "
              f"peak {peak:.0f} MiB (no goal)", flush=True)
    del rows
    if cuda:
        torch.cuda.empty_cache()
    return out


def _tag(a, batch: int) -> str:
    """Return the suffix of the RESULT names: precision, batch (when not 2), varied sizes."""
    return (("" if a.amp == "none" else f"_{a.amp}") + ("" if batch == 2 else f"_b{batch}")
            + ("_varied" if a.vary_sizes else ""))


def _boxes(out):
    if "instances" in out:
        return out["instances"].pred_boxes.tensor
    return out["boxes"]


# ---------------------------------------------------------------------------------------------- the --eval-only row
# the user's evaluation command, whole: tools/train_net.py --eval-only on COCO-layout JPEGs, timed from the start of
# the process to its exit (start-up, model build, dataset checks, inference, results file, COCO eval, pictures)

EVAL_CLASSES = 80
GOAL_EVAL_ONLY = 1.5


def coco_categories() -> list:
    """Return COCO's 80 categories (ids 1..90 with gaps, names) from detectron2, or 80 numbered ones without it.

    detectron2 registers ``coco_2017_val`` with COCO's names and ids and refuses a file with
    other ones, so its side of the row needs these.
    """
    try:
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    except ImportError:
        return [{"id": i + 1, "name": f"class{i + 1:02d}"} for i in range(EVAL_CLASSES)]
    return [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]


def write_eval_dataset(root: str, size: int, n_train: int, n_val: int, seed: int = 0) -> str:
    """Write ``coco/{train2017,val2017}`` (JPEGs and instances files, detectron2's layout) under ``root``; returns it.

    Shapes images (:func:`wrn_det.data.shapes.draw_image`) of short side ``size`` (4:3, wide and
    tall), up to 8 objects each, every object given one of :func:`coco_categories` at random, so
    a lightly trained detector spreads its scores over COCO's classes. Written once: a folder
    holding the same request is kept.
    """
    import json

    import cv2
    import numpy as np

    from wrn_det.data.shapes import draw_image

    categories = coco_categories()
    stamp = os.path.join(root, "coco", "request.json")
    request = {"size": size, "train": n_train, "val": n_val, "seed": seed, "categories": categories}
    if os.path.isfile(stamp) and json.load(open(stamp)) == request:
        return root
    rng = np.random.default_rng(seed)
    long_side = size * 4 // 3
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        folder = os.path.join(root, "coco", split)
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img, objs = draw_image(rng, sides=(size, long_side), min_size=size / 10, max_frac=0.5, max_objects=8)
            while img.shape[0] == img.shape[1]:  # each side is drawn from ``sides``: keep the 4:3 pictures
                img, objs = draw_image(rng, sides=(size, long_side), min_size=size / 10, max_frac=0.5, max_objects=8)
            name = f"{i:06d}.jpg"
            cv2.imwrite(os.path.join(folder, name), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            images.append({"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
            for o in objs:
                cat = categories[int(rng.integers(len(categories)))]["id"]
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **o,
                                    "category_id": cat})
        ann = os.path.join(root, "coco", "annotations", f"instances_{split}.json")
        os.makedirs(os.path.dirname(ann), exist_ok=True)
        with open(ann, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    with open(stamp, "w") as f:
        json.dump(request, f)
    return root


def eval_overrides(size: int, device: str) -> list:
    """Return the ``KEY VALUE`` overrides of CONFIG that the --eval-only row's model is trained and evaluated with.

    Images of short side ``size`` (long side at most 4/3 of it), COCO's 80 categories, and
    trained BatchNorm: the row's model starts from random weights, where FrozenBN (identity
    statistics, the shipped config's choice for pretrained backbones) lets the activations grow
    until the loss is not finite within ten iterations.
    """
    return ["MODEL.DEVICE", device, "MODEL.WRN.NORM", "BN", "MODEL.ROI_HEADS.NUM_CLASSES", str(EVAL_CLASSES),
            "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(size * 4 // 3),
            "INPUT.MIN_SIZE_TEST", str(size), "INPUT.MAX_SIZE_TEST", str(size * 4 // 3)]


def train_command(python: str, out: str, size: int, iters: int, device: str) -> list:
    """Return the ``tools/train_net.py`` command line that trains the row's model for ``iters`` iterations into ``out``."""
    return [python, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG,
            *eval_overrides(size, device), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.005",
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", str(min(50, iters)),
            "SOLVER.CHECKPOINT_PERIOD", "100000", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "5.0",
            "DATASETS.TEST", "()", "OUTPUT_DIR", out]


def eval_command(python: str, engine: str, weights: str, out: str, size: int, device: str, opts=()) -> list:
    """Return the user's ``tools/train_net.py --eval-only`` command line on the row's validation images."""
    return [python, os.path.join(ROOT, "tools", "train_net.py"), "--engine", engine, "--config-file", CONFIG,
            "--eval-only", *eval_overrides(size, device), "DATASETS.TEST", "('coco_2017_val',)",
            "MODEL.WEIGHTS", weights, *opts, "OUTPUT_DIR", out]


def _run_logged(cmd: list, env: dict, log: str) -> None:
    """Run ``cmd`` with its output in ``log``; raise RuntimeError naming the log when it fails."""
    import subprocess

    with open(log, "w") as f:
        status = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {status}; see {log}")


def detectron2_weights(builtin_weights: str, out: str, size: int, device: str) -> str:
    """Write the builtin checkpoint ``builtin_weights`` in detectron2's layout to ``out`` (once); returns ``out``.

    Both models are built from CONFIG with the row's overrides and every tensor is copied
    (:func:`copy_builtin_to_d2`), so both engines evaluate the same weights.
    """
    if os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(builtin_weights):
        return out
    from detectron2.modeling import build_model

    from wrn_det.d2.train import build_config
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.modeling import build_detector
    from wrn_det.detection.weights import load_detector_weights
    from wrn_det.engine.config import load_config

    opts = eval_overrides(size, device)
    builtin = build_detector(load_config(get_det_cfg(), CONFIG, opts))
    load_detector_weights(builtin, builtin_weights)
    d2 = build_model(build_config(CONFIG, opts))
    copy_builtin_to_d2(builtin, d2)
    torch.save({"model": d2.state_dict()}, out)
    return out


def _results_summary(folder: str) -> str:
    """Return "N detections, AP x" of an --eval-only run's ``inference`` folder."""
    import json

    with open(os.path.join(folder, "inference", "coco_instances_results.json")) as f:
        n = len(json.load(f))
    ap = None
    metrics = os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics):  # the builtin engine's; detectron2's --eval-only writes none
        for line in open(metrics):
            ap = json.loads(line).get("bbox/AP", ap)
    return f"{n} detections" + (f", AP {ap:.2f}" if ap is not None else "")


def run_eval_only(a) -> dict:
    """The --eval-only row: time the user's evaluation command on each engine; returns ``side -> seconds``.

    Writes the images (``--eval-images`` validation images and 400 training images of short
    side ``--size[0]``) and, unless ``--weights`` names one, trains the model with
    :func:`train_command` (``--train-iters`` iterations; kept in ``--work-dir`` for later
    runs); then runs ``tools/train_net.py --eval-only`` on the builtin engine and on
    detectron2's (the same weights in its layout) in turns, ``--iters`` times after one
    unrecorded run of each, and reports the median wall time of each, from the start of the
    process to its exit (start-up, model and weights, dataset checks, inference, results
    file, COCO evaluation, pictures). ``--eval-batch N`` adds the builtin engine with
    ``TEST.IMS_PER_BATCH N``.
    """
    import shutil
    import time

    size, work, device = a.size[0], os.path.abspath(a.work_dir), a.device
    root = write_eval_dataset(os.path.join(work, "datasets"), size, 400, a.eval_images)
    env = dict(os.environ, DETECTRON2_DATASETS=root)
    weights = a.weights
    if not weights:
        train_dir = os.path.join(work, f"train_s{size}_i{a.train_iters}")
        weights = os.path.join(train_dir, "model_final.pth")
        stamp = os.path.join(root, "coco", "request.json")
        if not os.path.isfile(weights) or os.path.getmtime(weights) < os.path.getmtime(stamp):  # none, or older data's
            cmd = train_command(sys.executable, train_dir, size, a.train_iters, device)
            print("training the row's model:", f"DETECTRON2_DATASETS={root}", " ".join(cmd), flush=True)
            _run_logged(cmd, env, os.path.join(work, "train.log"))
    sides = {"builtin": ("builtin", weights, [])}
    if a.eval_batch > 1:
        sides[f"builtin-batch{a.eval_batch}"] = ("builtin", weights, ["TEST.IMS_PER_BATCH", str(a.eval_batch)])
    if have_detectron2():
        sides["d2"] = ("detectron2", detectron2_weights(weights, os.path.join(work, "model_final_d2.pth"), size,
                                                        device), [])

    def side(name):
        engine, w, opts = sides[name]

        def run(r):
            out = os.path.join(work, f"eval_{name}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = eval_command(sys.executable, engine, w, out, size, device, opts)
            if r < 0:
                print(f"{name}: DETECTRON2_DATASETS={root} {' '.join(cmd)}", flush=True)
            t = time.perf_counter()
            _run_logged(cmd, env, out + ".log")
            dt = time.perf_counter() - t
            print(f"  {name} round {r}: {dt:.1f} s, {_results_summary(out)}", flush=True)
            return dt
        return run

    times = alternate({k: side(k) for k in sides}, a.iters)
    print(f"\n--eval-only on {a.eval_images} images at {size} px, {EVAL_CLASSES} classes, {torch.get_num_threads()} "
          f"threads, median of {a.iters} alternating runs (wall time of the command)")
    out = {k: median(v) for k, v in times.items()}
    for k, v in out.items():
        print(f"{k:<24}{v:>10.1f} s")
    if "d2" not in sides:
        print(f"{'d2':<24}{'detectron2 not installed':>30}")
    ours, d2 = out.get("builtin"), out.get("d2")
    result(f"det_evalonly_d2_over_builtin_wrn34_2_fpn_s{size}", d2 / ours if d2 and ours else None, GOAL_EVAL_ONLY,
           note="" if d2 else "detectron2 not installed")
    if a.eval_batch > 1:
        print(f"RESULT det_evalonly_gain_batch{a.eval_batch}_s{size} {ours / out[f'builtin-batch{a.eval_batch}']:.2f}x "
              "(no goal)")
    return out


def main() -> int:
    """Print one table per size and batch and the RESULT lines; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs="+", default=[256], help="short side(s) of the images (800: COCO)")
    p.add_argument("--batch", type=int, nargs="+", default=[2], help="images per training iteration (several: a "
                   "table each)")
    p.add_argument("--iters", type=int, default=3, help="alternating rounds (the median is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=lambda s: [r for r in s.split(",") if r], default=list(DEFAULT_ROWS),
                   help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast for every row: bf16, or fp16 with a gradient scaler (builtin and d2 rows)")
    p.add_argument("--no-train", action="store_true", help="inference rows only")
    p.add_argument("--vary-sizes", action="store_true",
                   help="every image of its own padded size (no packed weights: see the module docstring)")
    p.add_argument("--config", default=CONFIG, help="project config of the builtin and d2 rows (the R50 rows keep "
                   f"{CONFIG}); a small one checks the script quickly, e.g. demo/shapes_wrn_frcnn.yaml")
    p.add_argument("--builtin-opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="config overrides for the builtin rows (e.g. MODEL.CHANNELS_LAST True)")
    p.add_argument("--eval-only-run", action="store_true",
                   help="the --eval-only row instead of the tables: tools/train_net.py --eval-only on each engine")
    p.add_argument("--eval-images", type=int, default=60, help="--eval-only row: validation images")
    p.add_argument("--train-iters", type=int, default=300, help="--eval-only row: iterations of its model's training")
    p.add_argument("--weights", default="", help="--eval-only row: a trained builtin model (no training then)")
    p.add_argument("--eval-batch", type=int, default=1,
                   help="--eval-only row: also the builtin engine with TEST.IMS_PER_BATCH this (if above 1)")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "output", "det_step_eval"),
                   help="--eval-only row: its images, model and runs (kept for later runs)")
    a = p.parse_args()
    bad = [r for r in a.rows if r not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {', '.join(ROWS)}")
    if len(a.builtin_opts) % 2:
        p.error("--builtin-opts takes KEY VALUE pairs")
    BUILTIN_OPTS[:] = a.builtin_opts
    ROW_CONFIG[:] = [a.config]
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    a.num_classes = min(load_config(get_det_cfg(), a.config, []).MODEL.ROI_HEADS.NUM_CLASSES, 80)
    if a.amp == "fp16":
        skipped = [r for r in a.rows if r not in FP16_ROWS]
        if skipped:
            print(f"--amp fp16: rows {', '.join(skipped)} left out (fp16 rows: {', '.join(FP16_ROWS)})")
        a.rows = [r for r in a.rows if r in FP16_ROWS]
    logging.getLogger("wrn_det").setLevel(logging.WARNING)
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    device = torch.device(a.device)
    AMP["dtype"] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.amp]

    def autocast():
        if AMP["dtype"] is not None:
            return torch.autocast(device.type, dtype=AMP["dtype"])
        return nullcontext()

    if a.eval_only_run:
        run_eval_only(a)
        return 0
    goal_train = GOAL_TRAIN_GPU if device.type == "cuda" else GOAL_TRAIN
    for size in a.size:
        for batch in a.batch:
            tag = _tag(a, batch)
            res = run_size(size, batch, a, device, autocast)
            ours, d2 = res.get("builtin"), res.get("d2")
            note = "" if d2 else "detectron2 not installed or row not run"
            if not a.no_train:
                result(f"det_train_d2_over_builtin_wrn34_2_fpn_s{size}{tag}", d2[0] / ours[0] if d2 and ours else None,
                       goal_train, note=note)
            result(f"det_infer_d2_over_builtin_wrn34_2_fpn_s{size}{tag}", d2[1] / ours[1] if d2 and ours else None,
                   GOAL_INFER, note=note)
            for k, (_, what) in ABLATIONS.items():
                if k in res and ours:
                    if not a.no_train:
                        print(f"RESULT det_train_gain_{what}_s{size}{tag} {res[k][0] / ours[0]:.2f}x (no goal)")
                    print(f"RESULT det_infer_gain_{what}_s{size}{tag} {res[k][1] / ours[1]:.2f}x (no goal)")
            tv, r50 = res.get("torchvision"), res.get("builtin-r50")
            if a.amp != "fp16":
                result(f"det_infer_torchvision_over_builtin_r50_fpn_s{size}{tag}",
                       tv[1] / r50[1] if tv and r50 else None, GOAL_TV, note="" if tv and r50 else "rows not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

