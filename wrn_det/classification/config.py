"""Default configuration of classification training (``get_cls_cfg``).

Keys follow detectron2's names where detectron2 has one (``OUTPUT_DIR``, ``SEED``,
``MODEL.WEIGHTS``, ``MODEL.DEVICE``, ``SOLVER.*``, ``TEST.*``, ``DATALOADER.NUM_WORKERS``);
the rest are this project's. The defaults are the paper's CIFAR recipe with WRN-28-10.
"""
from wrn_det.data.classification import CIFAR_MEAN, CIFAR_STD
from wrn_det.engine.config import CfgNode as CN
from wrn_det.engine.config import add_run_config

__all__ = ["get_cls_cfg"]

_C = CN()
_C.OUTPUT_DIR = "./output/cls"

_C.MODEL = CN()
# Any wrn_det.models name: wrn_28_10, wrn_16_8, preact_resnet164, wide_resnet50_2, ...
_C.MODEL.NAME = "wrn_28_10"
# 0 takes the number of classes from the dataset; otherwise it must match it.
_C.MODEL.NUM_CLASSES = 10
# Dropout between the two convolutions of a block (the paper: 0.3 on CIFAR, 0.4 on SVHN).
_C.MODEL.DROPOUT = 0.0
# Weights to start from (fine-tuning, --eval-only): a checkpoint of this trainer or a state dict.
_C.MODEL.WEIGHTS = ""
# "auto": the GPU of this rank when CUDA is available, else the CPU; or "cuda" / "cpu".
_C.MODEL.DEVICE = "auto"
# Recompute each block in the backward pass (activation checkpointing) to save memory.
_C.MODEL.MEMORY_EFFICIENT = False
# channels_last memory format (CUDA only).
_C.MODEL.CHANNELS_LAST = True
# torch.compile the model (CUDA only; the first epoch pays the compilation).
_C.MODEL.COMPILE = False
# Synchronise BatchNorm statistics over all processes of a distributed run, so the
# batch statistics are those of the global batch, as in a single process.
_C.MODEL.SYNC_BN = True

_C.DATASETS = CN()
# cifar10, cifar100, svhn, mnist or imagenet.
_C.DATASETS.NAME = "cifar10"
# The folder holding the dataset in torchvision's layout (see wrn_det.data.classification).
_C.DATASETS.ROOT = "datasets"
# Let torchvision download the dataset into ROOT (CIFAR, SVHN, MNIST).
_C.DATASETS.DOWNLOAD = False
# Check the official MD5 sums of CIFAR and SVHN files; turn off for generated data.
_C.DATASETS.VERIFY_CHECKSUMS = True
# SVHN: train on train + extra, as the paper did.
_C.DATASETS.SVHN_USE_EXTRA = True

_C.INPUT = CN()
# meanstd: (x - PIXEL_MEAN) / PIXEL_STD; div255: x / 255 (SVHN); zca: GCN + ZCA whitening.
_C.INPUT.PREPROCESS = "meanstd"
# On the 0-255 scale, one value per image channel.
_C.INPUT.PIXEL_MEAN = list(CIFAR_MEAN)
_C.INPUT.PIXEL_STD = list(CIFAR_STD)
# Random crop from the image padded by this many pixels (by reflection); 0 disables.
_C.INPUT.CROP_PADDING = 4
_C.INPUT.HFLIP = True
# ZCA: L2 norm of each image after global contrast normalisation, and the filter bias.
_C.INPUT.ZCA_GCN_SCALE = 55.0
_C.INPUT.ZCA_FILTER_BIAS = 0.1
# Where the ZCA fit is cached; empty: beside the training data.
_C.INPUT.ZCA_CACHE_DIR = ""
# ImageNet: RandomResizedCrop size for training; Resize then CenterCrop for testing.
_C.INPUT.TRAIN_CROP_SIZE = 224
_C.INPUT.TEST_RESIZE = 256
_C.INPUT.TEST_CROP_SIZE = 224
# ImageNet training, after the crop: colour jitter strengths (brightness, contrast, saturation;
# each factor drawn from [1 - s, 1 + s], the three in random order) and the std of the
# AlexNet-style PCA lighting noise with ImageNet's eigenvalues/eigenvectors. fb.resnet.torch,
# which trained the authors' WRN-50-2, uses [0.4, 0.4, 0.4] and 0.1 (the ImageNet configs do);
# 0 switches either off (torchvision's reference recipe has neither).
_C.INPUT.COLOR_JITTER = [0.0, 0.0, 0.0]
_C.INPUT.LIGHTING_STD = 0.0

_C.DATALOADER = CN()
# DataLoader workers per process (ImageNet only; the 32x32 sets need none).
_C.DATALOADER.NUM_WORKERS = 8
# ImageNet JPEG decoding (wrn_det.data.decode): pil (PIL transforms), torchvision or cv2 (in
# the workers), cuda (nvJPEG on the GPU, crops drawn in the workers)
_C.DATALOADER.DECODE = "pil"

_C.SOLVER = CN()
_C.SOLVER.EPOCHS = 200
# Images per iteration over all processes.
_C.SOLVER.IMS_PER_BATCH = 128
_C.SOLVER.BASE_LR = 0.1
# If > 0, BASE_LR is the rate for this many images and is scaled linearly to IMS_PER_BATCH
# (ImageNet: 0.1 per 256 images).
_C.SOLVER.REFERENCE_BATCH_SIZE = 0
# WarmupMultiStepLR or WarmupCosineLR.
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
# Epochs (counted from 1) at whose start the rate is multiplied by GAMMA: 60, 120, 160
# means epochs 1-59 use BASE_LR and epoch 60 already the reduced rate, as the original code.
_C.SOLVER.STEPS = (60, 120, 160)
_C.SOLVER.GAMMA = 0.2
# Clear the momentum buffers at each step, as the original code (it built a new optimizer).
_C.SOLVER.RESET_MOMENTUM_AT_STEPS = True
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = True
_C.SOLVER.DAMPENING = 0.0
_C.SOLVER.WEIGHT_DECAY = 5e-4
# Warm-up length in epochs (may be fractional), starting factor and method (linear/constant).
_C.SOLVER.WARMUP_EPOCHS = 0.0
_C.SOLVER.WARMUP_FACTOR = 0.001
_C.SOLVER.WARMUP_METHOD = "linear"
# Final rate of WarmupCosineLR, as a fraction of BASE_LR.
_C.SOLVER.COSINE_END = 0.0
# How many epoch checkpoints to keep (0: all); the newest is named by last_checkpoint. Two, so that
# --resume can fall back to the previous one when the newest is broken (a node died while writing it).
_C.SOLVER.CHECKPOINT_KEEP = 2

_C.TEST = CN()
# Images per evaluation step over all processes.
_C.TEST.IMS_PER_BATCH = 512
# Evaluate every EVAL_PERIOD epochs (and always after the last one).
_C.TEST.EVAL_PERIOD = 1

# SEED, CUDNN_BENCHMARK, LOG_PERIOD, PREEMPT_SIGNALS, MODEL_EMA.*, SOLVER.AMP.*: the run keys both trainers
# share (wrn_det.engine.config.add_run_config), with classification's defaults. Mixed precision is off by
# default, as in detectron2 and timm; the shipped GPU recipes (Base-CIFAR.yaml, imagenet_*.yaml) turn it on.
add_run_config(_C, "classification")


def get_cls_cfg() -> CN:
    """Return a fresh, mutable copy of the classification defaults."""
    return _C.clone()
