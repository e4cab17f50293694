"""Config defaults of the builtin detection engine.

The keys are detectron2's names with detectron2's defaults, restricted to those this
engine honours, so a shipped config runs on both engines and a key this engine would
silently ignore is an error instead. The project's own keys live under ``MODEL.WRN`` and
``MODEL.FAST_CPU`` (and ``TEST.COCO_EVAL_BACKEND``); :func:`add_wrn_config` adds them to any CfgNode,
including detectron2's ``get_cfg()``. ``TEST.IMS_PER_BATCH`` (images per forward pass in
evaluation) is the builtin engine's alone.
"""
from wrn_det.engine.config import CfgNode as CN
from wrn_det.engine.config import add_run_config

__all__ = ["get_det_cfg", "add_wrn_config"]

def add_wrn_config(cfg: CN) -> CN:
    """Add the project's keys to ``cfg`` (in place) and return it.

    ``MODEL.WRN.NAME``: a ``wrn_det.models`` network used as the backbone.
    ``MODEL.WRN.NORM``: ``FrozenBN`` (pretrained statistics kept), ``BN`` (trained, as
    when starting from scratch) or ``SyncBN`` (BN synchronised across processes).
    ``MODEL.WRN.OUT_FEATURES``: the bottom-up stages the backbone returns; for C4 the last
    one ends the trunk and the stage after it becomes the box head.
    ``MODEL.WRN.DROPOUT``: dropout of the CIFAR-style WRNs (0 for detection by default).
    ``MODEL.WRN.STRICT_WEIGHTS``: backbone weights in ``MODEL.WEIGHTS`` must hold every
    stem and stage tensor of the network and no unknown one (else an error); False loads
    what fits and warns.
    ``MODEL.FAST_CPU``: the builtin detector's fast CPU pieces, chosen when it is built
    (detectron2's engine runs its own kernels and plain convolutions whatever they say).
    ``CONV`` (True): every convolution of the detector (backbone, FPN, RPN head, box head)
    is a ``FastConv2d``, which inside the detector's ``forward`` runs float32 CPU inputs by
    Winograd (NNPACK), im2col + GEMM or packed oneDNN weights where those are faster (float
    rounding of about 1e-5 relative); False: ``nn.Conv2d``. ``PACK_WEIGHTS`` (True): with
    ``CONV``, inference reuses convolution weights packed in oneDNN's layout (memory: at most
    1 GiB per process); False: plain oneDNN calls there. ``ROI_ALIGN`` (True): the box
    pooler's own CPU RoIAlign kernel (torchvision's arithmetic, vectorised); False:
    torchvision's ``roi_align``. Same weights and state-dict keys either way; on a GPU the
    three change nothing (those paths are the CPU's).
    ``MODEL.CHANNELS_LAST`` (False): on CUDA, the detector's weights and feature maps in
    channels-last memory (the layout of cuDNN's fastest bfloat16/float16 convolutions); same
    results, no effect on the CPU. ``MODEL.COMPILE`` (False): ``torch.compile`` the backbone
    (with the FPN) and the box head in place (state-dict keys unchanged); the first
    iterations, and each new input size, pay the compilation. detectron2's engine ignores both.
    ``TEST.COCO_EVAL_BACKEND``: ``faster_coco_eval`` (default) or ``pycocotools``.
    ``DATALOADER.DECODE``: the builtin engine's JPEG decoder, ``torchvision`` (default) or
    ``cv2``/``pil`` (:mod:`wrn_det.data.decode`); detectron2's engine reads images with its own mapper.
    """
    # nodes of the caller's class: yacs merges a file only into nodes of the root's own class
    cfg.MODEL.WRN = type(cfg)()
    cfg.MODEL.WRN.NAME = "wide_resnet34_2"
    cfg.MODEL.WRN.NORM = "FrozenBN"
    cfg.MODEL.WRN.OUT_FEATURES = ["res4"]
    cfg.MODEL.WRN.DROPOUT = 0.0
    cfg.MODEL.WRN.STRICT_WEIGHTS = True
    cfg.MODEL.FAST_CPU = type(cfg)()
    cfg.MODEL.FAST_CPU.CONV = True
    cfg.MODEL.FAST_CPU.PACK_WEIGHTS = True
    cfg.MODEL.FAST_CPU.ROI_ALIGN = True
    cfg.MODEL.CHANNELS_LAST = False
    cfg.MODEL.COMPILE = False
    cfg.TEST.COCO_EVAL_BACKEND = "faster_coco_eval"
    cfg.DATALOADER.DECODE = "torchvision"
    return cfg


def get_det_cfg() -> CN:
    """Return a new CfgNode with the builtin engine's defaults (detectron2's names and values)."""
    _C = CN()
    _C.VERSION = 2

    _C.MODEL = CN()
    _C.MODEL.LOAD_PROPOSALS = False
    _C.MODEL.MASK_ON = False
    _C.MODEL.KEYPOINT_ON = False
    # "" (or "auto") = this process's GPU when CUDA is present, else the CPU (detectron2 defaults to "cuda")
    _C.MODEL.DEVICE = ""
    _C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    _C.MODEL.WEIGHTS = ""
    _C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    _C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]

    _C.INPUT = CN()
    _C.INPUT.MIN_SIZE_TRAIN = (800,)
    _C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    _C.INPUT.MAX_SIZE_TRAIN = 1333
    _C.INPUT.MIN_SIZE_TEST = 800
    _C.INPUT.MAX_SIZE_TEST = 1333
    _C.INPUT.RANDOM_FLIP = "horizontal"
    _C.INPUT.FORMAT = "BGR"

    _C.DATASETS = CN()
    _C.DATASETS.TRAIN = ()
    # one proposal file (detectron2's format) per dataset of TRAIN / TEST, read when
    # MODEL.LOAD_PROPOSALS; the best TOPK of an image are kept after resizing and flipping
    _C.DATASETS.PROPOSAL_FILES_TRAIN = ()
    _C.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = 2000
    _C.DATASETS.TEST = ()
    _C.DATASETS.PROPOSAL_FILES_TEST = ()
    _C.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = 1000

    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = 4
    _C.DATALOADER.ASPECT_RATIO_GROUPING = True
    _C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    _C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    # read every image's header before the first iteration (missing, truncated or mis-sized files stop the
    # run at the start; 0.17 ms per image measured here, about 20 s for COCO train with the files cached)
    _C.DATALOADER.CHECK_IMAGES = True

    _C.MODEL.BACKBONE = CN()
    _C.MODEL.BACKBONE.NAME = "build_wrn_backbone"
    _C.MODEL.BACKBONE.FREEZE_AT = 2

    _C.MODEL.FPN = CN()
    _C.MODEL.FPN.IN_FEATURES = []
    _C.MODEL.FPN.OUT_CHANNELS = 256
    _C.MODEL.FPN.NORM = ""
    _C.MODEL.FPN.FUSE_TYPE = "sum"

    _C.MODEL.PROPOSAL_GENERATOR = CN()
    # "RPN", or "PrecomputedProposals" (Fast R-CNN on the proposals of DATASETS.PROPOSAL_FILES_*)
    _C.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
    # proposals with a side of at most this many pixels (of the network input) are dropped
    _C.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 0

    _C.MODEL.ANCHOR_GENERATOR = CN()
    _C.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    _C.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
    _C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    _C.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0

    _C.MODEL.RPN = CN()
    _C.MODEL.RPN.HEAD_NAME = "StandardRPNHead"
    _C.MODEL.RPN.IN_FEATURES = ["res4"]
    _C.MODEL.RPN.BOUNDARY_THRESH = -1
    _C.MODEL.RPN.IOU_THRESHOLDS = [0.3, 0.7]
    _C.MODEL.RPN.IOU_LABELS = [0, -1, 1]
    _C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
    _C.MODEL.RPN.POSITIVE_FRACTION = 0.5
    # the box loss of the RPN and of the box head (detectron2's keys and defaults): "smooth_l1" (an L1 loss with
    # SMOOTH_L1_BETA 0), "giou", "diou" or "ciou"; the losses are sums divided by BATCH_SIZE_PER_IMAGE x images
    # (RPN) and by the number of sampled proposals (box head)
    _C.MODEL.RPN.BBOX_REG_LOSS_TYPE = "smooth_l1"
    _C.MODEL.RPN.BBOX_REG_LOSS_WEIGHT = 1.0
    _C.MODEL.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    _C.MODEL.RPN.SMOOTH_L1_BETA = 0.0
    _C.MODEL.RPN.LOSS_WEIGHT = 1.0
    _C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 12000
    _C.MODEL.RPN.PRE_NMS_TOPK_TEST = 6000
    _C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000
    _C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    _C.MODEL.RPN.NMS_THRESH = 0.7
    _C.MODEL.RPN.CONV_DIMS = [-1]

    _C.MODEL.ROI_HEADS = CN()
    _C.MODEL.ROI_HEADS.NAME = "WRNRes5ROIHeads"
    _C.MODEL.ROI_HEADS.NUM_CLASSES = 80
    _C.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    _C.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.5]
    _C.MODEL.ROI_HEADS.IOU_LABELS = [0, 1]
    _C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    _C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
    _C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    _C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
    _C.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True

    _C.MODEL.ROI_BOX_HEAD = CN()
    _C.MODEL.ROI_BOX_HEAD.NAME = ""
    _C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "smooth_l1"
    _C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT = 1.0
    _C.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    _C.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0
    _C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
    _C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
    _C.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    _C.MODEL.ROI_BOX_HEAD.NUM_FC = 0
    _C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
    _C.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
    _C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
    _C.MODEL.ROI_BOX_HEAD.NORM = ""
    _C.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False

    _C.SOLVER = CN()
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    _C.SOLVER.MAX_ITER = 40000
    _C.SOLVER.BASE_LR = 0.001
    _C.SOLVER.BASE_LR_END = 0.0
    _C.SOLVER.MOMENTUM = 0.9
    _C.SOLVER.NESTEROV = False
    _C.SOLVER.WEIGHT_DECAY = 0.0001
    _C.SOLVER.WEIGHT_DECAY_NORM = 0.0
    _C.SOLVER.GAMMA = 0.1
    _C.SOLVER.STEPS = (30000,)
    _C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
    _C.SOLVER.WARMUP_ITERS = 1000
    _C.SOLVER.WARMUP_METHOD = "linear"
    _C.SOLVER.CHECKPOINT_PERIOD = 5000
    _C.SOLVER.IMS_PER_BATCH = 16
    _C.SOLVER.BIAS_LR_FACTOR = 1.0
    _C.SOLVER.WEIGHT_DECAY_BIAS = None
    _C.SOLVER.CLIP_GRADIENTS = CN({"ENABLED": False})
    _C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    _C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    _C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0

    _C.TEST = CN()
    _C.TEST.EVAL_PERIOD = 0
    _C.TEST.DETECTIONS_PER_IMAGE = 100
    # images per forward pass in evaluation, batched among images of one size (one at a time is
    # detectron2's way; the builtin engine's own key, which detectron2's engine does not accept)
    _C.TEST.IMS_PER_BATCH = 1

    _C.OUTPUT_DIR = "./output"
    # SEED, CUDNN_BENCHMARK, LOG_PERIOD, PREEMPT_SIGNALS, MODEL_EMA.*, SOLVER.AMP.*: the run keys both
    # trainers share, with detection's defaults (detectron2's, d2go's EMA)
    add_run_config(_C, "detection")
    return add_wrn_config(_C)
