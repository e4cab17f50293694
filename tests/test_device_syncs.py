"""The training steps do not wait for the device: the operations that make the host wait for a GPU, counted.

A ``TorchDispatchMode`` sees every operation a step runs, on the CPU too. Those that wait for a
GPU's results are the reads of a value (``aten._local_scalar_dense``: ``.item()``, ``float()``,
``bool()``), the ones whose output size depends on the data (``aten.nonzero``, boolean masks,
``unique``, NMS). Each one found is charged, by the Python stack it came from, to the data
loading (CPU work in the loader: never a GPU wait), the model (its forward and backward passes)
or the loop around it. The loop may read the device at log steps only; the model may wait no
more often than torchvision's own Faster R-CNN does on the same images.
"""
import sys
from collections import Counter

import pytest
import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DRAW_64, TINY_DET, write_fake_coco

from wrn_det.data.cls_synthetic import write_synthetic_cifar

aten = torch.ops.aten

#: operations that wait for the device whatever their arguments
_ALWAYS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2, aten._unique,
           aten.unique_consecutive, aten.equal, aten.repeat_interleave, torch.ops.torchvision.nms}
#: operations that wait when an index is a boolean mask (a nonzero inside)
_MASKED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _is_sync(func, args) -> bool:
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return True
    if packet in _MASKED and len(args) > 1:
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)
    return False


def _part(filename: str) -> str:
    name = filename.replace("\\", "/")
    if "/torch/utils/data/" in name or "/wrn_det/data/" in name:
        return "data"
    if any(p in name for p in ("/detection/modeling/", "/torchvision/", "/wrn_det/models/", "/torch/autograd/",
                               "/torch/_tensor.py", "/torch/nn/modules/")):
        return "model"
    return None


class SyncCounter(TorchDispatchMode):
    """Record every operation that waits for the device: ``(operation, part, iteration)``.

    ``part``: ``"data"``, ``"model"`` (forward and backward) or ``"loop"``, from the innermost
    frame that belongs to one; ``iteration``: the value of the variable ``loop_var`` in the
    frame of the function ``loop_fn`` (the training loop), None outside it.
    """

    def __init__(self, loop_fn: str = "", loop_var: str = ""):
        super().__init__()
        self.loop_fn, self.loop_var = loop_fn, loop_var
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _is_sync(func, args):
            part, iteration = None, None
            frame = sys._getframe(1)
            while frame is not None:
                if part is None:
                    part = _part(frame.f_code.co_filename)
                if frame.f_code.co_name == self.loop_fn:
                    iteration = frame.f_locals.get(self.loop_var)
                    break
                frame = frame.f_back
            self.events.append((str(func.overloadpacket).split(".")[-1], part or "loop", iteration))
        return func(*args, **(kwargs or {}))

    def count(self, part: str) -> int:
        """Return the number of waits charged to ``part``."""
        return sum(1 for _, p, _ in self.events if p == part)


@pytest.fixture(scope="module")
def det_root(tmp_path_factory):
    return write_fake_coco(tmp_path_factory.mktemp("det"), {"train2017": (12, 3)}, **DRAW_64)


def _det_trainer(root, out, monkeypatch, *extra):
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.train import Trainer
    from wrn_det.engine.config import load_config

    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml",
                      [*TINY_DET, "DATASETS.TEST", "()", "SEED", "2", "SOLVER.CHECKPOINT_PERIOD", "0",
                       "OUTPUT_DIR", str(out), *extra])
    return Trainer(cfg)


def test_detection_loop_reads_the_device_at_log_steps_only(det_root, tmp_path, monkeypatch, one_thread):
    # log steps: the first iteration (0), every 3rd (2, 5) and the last (6)
    trainer = _det_trainer(det_root, tmp_path, monkeypatch, "SOLVER.MAX_ITER", "7", "LOG_PERIOD", "3",
                           "MODEL_EMA.ENABLED", "True")
    trainer.resume_or_load(False)
    with SyncCounter("_loop", "it") as counter:
        trainer.train()
    loop = [(op, it) for op, part, it in counter.events if part == "loop"]
    assert {it for _, it in loop} <= {0, 2, 5, 6, None}, loop
    # the model's waits come with every iteration: they were seen and told apart from the loop's
    model_iterations = {it for _, part, it in counter.events if part == "model"}
    assert model_iterations == set(range(7)), counter.events


def test_classification_loop_reads_the_device_at_log_steps_only(tmp_path, one_thread):
    from helpers import cls_cfg

    from wrn_det.classification import ClsTrainer

    root = write_synthetic_cifar(str(tmp_path / "data"), n_train=64, n_test=16, seed=4)
    cfg = cls_cfg(["MODEL.NAME", "wrn_10_1", "DATASETS.ROOT", root, "DATASETS.VERIFY_CHECKSUMS", "False",
                   "OUTPUT_DIR", str(tmp_path / "run"), "SOLVER.EPOCHS", "1", "SOLVER.STEPS", "()",
                   "SOLVER.IMS_PER_BATCH", "8", "TEST.IMS_PER_BATCH", "16", "LOG_PERIOD", "3",
                   "MODEL_EMA.ENABLED", "True", "MODEL.DROPOUT", "0.1"])
    trainer = ClsTrainer(cfg)
    trainer.resume_or_load(False)
    trainer.prepare_training(0)
    with trainer.running():
        with SyncCounter("train_one_epoch", "i") as counter:
            trainer.train_one_epoch(1)
    # 8 iterations, logged after the 3rd, 6th and 8th (i = 2, 5, 7); the epoch's sums are read after the loop
    loop = [(op, i) for op, part, i in counter.events if part == "loop"]
    assert {i for _, i in loop} <= {2, 5, 7}, loop


def _batch(root, monkeypatch):
    """Return (config, two model inputs of the training set): the detector as a GPU run builds it."""
    from wrn_det.data.catalog import get_detection_dataset_dicts
    from wrn_det.data.det_loader import DetectionMapper
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.engine.config import load_config

    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    # the fast CPU pieces plan on the host by design; a GPU run has torchvision's kernels and plain convolutions
    cfg = load_config(get_det_cfg(), "shapes_wrn_frcnn.yaml",
                      [*TINY_DET, "MODEL.FAST_CPU.CONV", "False", "MODEL.FAST_CPU.ROI_ALIGN", "False"])
    dicts = get_detection_dataset_dicts(["coco_2017_train"])[:2]
    mapper = DetectionMapper(cfg, True)
    return cfg, [mapper(d, seed=i) for i, d in enumerate(dicts)]


def _count_model_waits(fn) -> Counter:
    with SyncCounter() as counter:
        losses = fn()
        sum(losses.values()).backward()
    return Counter(op for op, _, _ in counter.events)


class _Features(torch.nn.Module):
    """Our FPN backbone as torchvision's detectors take one: an ``out_channels`` attribute."""

    def __init__(self, backbone, channels: int):
        super().__init__()
        self.body, self.out_channels = backbone, channels

    def forward(self, x):
        return self.body(x)


def test_the_detector_waits_no_more_than_torchvision_faster_rcnn(det_root, monkeypatch, one_thread):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import MultiScaleRoIAlign

    from wrn_det.detection.modeling import build_detector

    cfg, inputs = _batch(det_root, monkeypatch)
    torch.manual_seed(0)
    ours = build_detector(cfg).train()
    ours_waits = _count_model_waits(lambda: ours(inputs))

    # torchvision's Faster R-CNN with the same backbone, anchors, sampling and pooler, on the same images
    m = cfg.MODEL
    tv = FasterRCNN(
        _Features(ours.backbone, m.FPN.OUT_CHANNELS), num_classes=m.ROI_HEADS.NUM_CLASSES + 1,
        rpn_anchor_generator=AnchorGenerator(tuple(tuple(s) for s in m.ANCHOR_GENERATOR.SIZES),
                                             (tuple(m.ANCHOR_GENERATOR.ASPECT_RATIOS[0]),) * 3),
        rpn_pre_nms_top_n_train=m.RPN.PRE_NMS_TOPK_TRAIN, rpn_post_nms_top_n_train=m.RPN.POST_NMS_TOPK_TRAIN,
        rpn_batch_size_per_image=m.RPN.BATCH_SIZE_PER_IMAGE, box_batch_size_per_image=m.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        box_roi_pool=MultiScaleRoIAlign(list(m.ROI_HEADS.IN_FEATURES), m.ROI_BOX_HEAD.POOLER_RESOLUTION,
                                        m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO)).train()
    # past torchvision's resizing (host-side work on host tensors): the normalised images of our detector
    with torch.no_grad():
        image_list = ours.preprocess_image(inputs)
    image_list = ImageList(image_list.tensors, image_list.image_sizes)
    targets = [{"boxes": x["boxes"], "labels": x["classes"] + 1} for x in inputs]

    def torchvision_step():
        features = tv.backbone(image_list.tensors)
        proposals, rpn_losses = tv.rpn(image_list, features, targets)
        _, det_losses = tv.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **det_losses}

    tv_waits = _count_model_waits(torchvision_step)
    assert tv_waits["nonzero"] > 0  # both were seen waiting
    assert sum(ours_waits.values()) <= sum(tv_waits.values()), (ours_waits, tv_waits)
    assert ours_waits["_local_scalar_dense"] <= tv_waits["_local_scalar_dense"], (ours_waits, tv_waits)
