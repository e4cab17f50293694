"""``tools/train_net.py --engine detectron2``: the shipped configs on detectron2's trainer and evaluator.

Per process (:func:`main`): detectron2's ``get_cfg()``, :func:`add_wrn_config`, the YAML
file (a path or a name under ``configs/``), the ``KEY VALUE`` overrides; the project's run
set-up (:mod:`wrn_det.engine.run`: logging for detectron2's and the project's loggers,
seeding, output folder, ``config.yaml``), as on the builtin engine; then training with
``DefaultTrainer`` and evaluation with ``COCOEvaluator`` (``inference/`` under
``OUTPUT_DIR``), or ``--eval-only`` on ``MODEL.WEIGHTS``. :func:`run` launches it
(one process, ``--num-gpus N`` spawning, or under torchrun). Also runnable as
``python -m wrn_det.d2.train --config-file ... KEY VALUE ...``.

``MODEL.DEVICE`` left unset in the config means CUDA when present and the CPU
otherwise, as on the builtin engine (detectron2's own default is ``cuda``).
``TEST.COCO_EVAL_BACKEND``: ``faster_coco_eval`` selects detectron2's fast C++ COCOeval
(same numbers as pycocotools), ``pycocotools`` the reference implementation.
"""
import argparse
import logging
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator, verify_results
from detectron2.utils import comm as d2comm

from wrn_det.engine.config import load_config, resolve_config_file
from wrn_det.engine.cli import cli_main, default_argument_parser
from wrn_det.engine.errors import ConfigError
from wrn_det.engine.launch import launch
from wrn_det.engine.optim import amp_dtype
from wrn_det.engine.run import open_output_dir, setup_run

from .checkpoint import WRNDetectionCheckpointer, checkpoint_metadata
from .config import add_wrn_config
from .data import register_datasets

__all__ = ["setup", "Trainer", "main", "run"]

logger = logging.getLogger("wrn_det.d2")

EVAL_BACKENDS = ("faster_coco_eval", "pycocotools")


def _is_local_path(path: str) -> bool:
    return "://" not in path


def build_config(config_file: str = "", opts=None):
    """Return the frozen detectron2 config: ``get_cfg()`` + ``add_wrn_config`` + file + overrides.

    Raises :class:`ConfigError` (one line naming the file or key) for an unknown key, a
    bad value, a missing config file, an unknown ``TEST.COCO_EVAL_BACKEND`` or a local
    ``MODEL.WEIGHTS`` file that does not exist.
    """
    cfg = get_cfg()
    add_wrn_config(cfg)
    cfg.MODEL.DEVICE = ""  # resolved below, so that a config without MODEL.DEVICE behaves as on the builtin engine
    cfg = load_config(cfg, config_file or None, list(opts or []))
    cfg.defrost()
    if not cfg.MODEL.DEVICE:
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no CUDA device is available; set MODEL.DEVICE cpu")
    if cfg.TEST.COCO_EVAL_BACKEND not in EVAL_BACKENDS:
        raise ConfigError(f"TEST.COCO_EVAL_BACKEND must be one of {', '.join(EVAL_BACKENDS)}, "
                          f"got {cfg.TEST.COCO_EVAL_BACKEND!r}")
    if cfg.MODEL_EMA.ENABLED:
        raise ConfigError("MODEL_EMA.ENABLED: weight EMA is a builtin-engine option; detectron2's DefaultTrainer "
                          "has none (use --engine builtin, or set it False)")
    amp_dtype(cfg.SOLVER.AMP, torch.device(cfg.MODEL.DEVICE))  # a bad SOLVER.AMP.DTYPE is a one-line error here
    weights = cfg.MODEL.WEIGHTS
    if weights and _is_local_path(weights) and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS file {weights!r} does not exist")
    cfg.freeze()
    return cfg


def setup(args):
    """Build the config from ``args`` and run detectron2's ``default_setup``; returns the frozen config."""
    path = resolve_config_file(args.config_file) if args.config_file else ""
    cfg = build_config(path, args.opts)
    if d2comm.get_world_size() > 1:
        if cfg.MODEL.DEVICE == "cpu":
            raise ConfigError("the detectron2 engine runs several processes only on GPUs (detectron2's "
                              "DefaultTrainer wraps the model for one GPU per process); use --num-gpus 1 on the "
                              "CPU, or --engine builtin")
        if d2comm._LOCAL_PROCESS_GROUP is None:
            # detectron2's own launch() creates it; under wrn_det's launch or torchrun we do
            per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", getattr(args, "num_gpus", 1)))
            d2comm.create_local_process_group(per_machine)
    # detectron2's own messages and the project's (weights accounting, datasets) to the same console and log.txt
    loggers = ("wrn_det", "detectron2", "fvcore")
    setup_run(cfg, loggers)
    logging.getLogger("wrn_det").info("config file %s, command-line overrides: %s", path or "(none)",
                                      " ".join(args.opts or []))
    open_output_dir(cfg, loggers)
    register_datasets()
    return cfg


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with COCO or Pascal VOC evaluation and checked ``MODEL.WEIGHTS`` loading."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # swap in the checkpointer that accounts for every backbone tensor; the periodic
        # checkpoint hook saves through the same object
        old = self.checkpointer
        self.checkpointer = WRNDetectionCheckpointer(old.model, old.save_dir, strict=cfg.MODEL.WRN.STRICT_WEIGHTS,
                                                     **old.checkpointables)
        for h in self._hooks:
            if isinstance(h, hooks.PeriodicCheckpointer):
                h.checkpointer = self.checkpointer
        dtype = amp_dtype(cfg.SOLVER.AMP, torch.device(cfg.MODEL.DEVICE))
        if dtype is not None and hasattr(self._trainer, "precision"):
            self._trainer.precision = dtype  # detectron2's AMPTrainer autocasts to float16 unless told otherwise
        # the training set was loaded above: its classes go into every checkpoint, for wrn_det.Predictor
        self.checkpointer.extra_state = {"metadata": checkpoint_metadata(cfg)}

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """Return the dataset's evaluator: ``PascalVOCDetectionEvaluator`` for a Pascal VOC dataset, else a
        ``COCOEvaluator`` writing to ``OUTPUT_DIR/inference`` (or ``output_folder``) that counts up to
        ``TEST.DETECTIONS_PER_IMAGE`` detections per image, as the builtin engine's."""
        meta = MetadataCatalog.get(dataset_name)
        if meta.get("json_file") is None and meta.get("dirname") is None:
            DatasetCatalog.get(dataset_name)  # a project dataset fills in its metadata when loaded
        if meta.get("evaluator_type") == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder,
                             use_fast_impl=cfg.TEST.COCO_EVAL_BACKEND == "faster_coco_eval",
                             max_dets_per_image=int(cfg.TEST.DETECTIONS_PER_IMAGE))


def main(args):
    """Train (or, with ``--eval-only``, evaluate) in this process; returns the evaluation results."""
    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not args.resume:
            raise ConfigError("--eval-only needs MODEL.WEIGHTS (a detector checkpoint) or --resume")
        model = Trainer.build_model(cfg)
        WRNDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.WRN.STRICT_WEIGHTS).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if d2comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(args) -> None:
    """Launch :func:`main` as ``args`` ask (``--num-gpus``, ``--num-machines``, torchrun); returns None."""
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


def _cli(argv=None) -> None:
    parser = default_argument_parser("wrn-det detection training on detectron2's engine")
    parser.add_argument("--engine", default="detectron2", choices=["detectron2"], help=argparse.SUPPRESS)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(cli_main(_cli))
