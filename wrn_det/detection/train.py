"""The builtin engine's iteration-based training loop, checkpoints and the train_net entry point.

Mirrors detectron2's DefaultTrainer where users look: the solver keys, a log line every
20 iterations (losses, lr, time per iteration, ETA), ``metrics.json`` and the ``LOGGERS``
(TensorBoard events by default), ``model_XXXXXXX.pth`` every ``SOLVER.CHECKPOINT_PERIOD`` iterations plus
``model_final.pth``, ``last_checkpoint``, evaluation every ``TEST.EVAL_PERIOD`` and at the
end. Checkpoints (the schema of :mod:`wrn_det.engine.training`, shared with the
classification trainer) also hold the random-number states of every process and the data
seed, and the data stream is a function of (seed, iteration), so ``--resume`` after a
crash continues exactly as if the run had not stopped.
"""
import logging
import os
import time
from collections import OrderedDict, deque
from datetime import timedelta
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import nn

from wrn_det.data.catalog import MetadataCatalog, get_detection_dataset_dicts
from wrn_det.data.det_loader import build_detection_test_loader, build_detection_train_loader, check_dataset_images
from wrn_det.engine import comm
from wrn_det.engine.checkpoint import TrainingCheckpointer
from wrn_det.engine.comm import local_batch_size
from wrn_det.engine.config import load_config
from wrn_det.engine.ema import ModelEMA
from wrn_det.engine.errors import ConfigError, WrnDetError
from wrn_det.engine.events import MetricsWriter
from wrn_det.engine.launch import create_ddp_model
from wrn_det.engine.optim import OptimizerStep, amp_dtype, fused_if_supported, gradient_clipper, non_finite_error
from wrn_det.engine.run import open_output_dir, setup_run
from wrn_det.engine.schedules import LRSchedule, build_lr_multiplier
from wrn_det.engine.seed import seed_all
from wrn_det.engine.training import LogSync, StepValues, TrainerBase

from .config import get_det_cfg
from .evaluation import COCOEvaluator, ProposalEvaluator, VOCEvaluator, flatten_results, inference_on_dataset
from .evaluation.plots import PLOT_FILES
from .modeling import build_detector
from .weights import checkpoint_metadata, load_detector_weights, unwrap

__all__ = ["setup", "main", "Trainer", "build_optimizer", "build_lr_schedule", "build_evaluator", "prepare_test_sets",
           "EvaluationSet"]

logger = logging.getLogger("wrn_det")

# detectron2's list of normalisation layers (get_default_optimizer_params); FrozenBatchNorm has no parameters
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Return SGD over the trainable parameters with detectron2's groups (``get_default_optimizer_params``).

    Every parameter gets ``SOLVER.BASE_LR`` and ``WEIGHT_DECAY``; those of normalisation layers
    ``WEIGHT_DECAY_NORM`` instead; then every parameter named ``bias`` (a normalisation layer's
    too) ``BASE_LR * BIAS_LR_FACTOR`` and, when set, ``WEIGHT_DECAY_BIAS``. Fused on CUDA.
    """
    s = cfg.SOLVER
    groups: Dict[tuple, list] = OrderedDict()
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if isinstance(module, _NORM_TYPES):
                wd = s.WEIGHT_DECAY_NORM
            if name == "bias":
                lr = s.BASE_LR * s.BIAS_LR_FACTOR
                if s.WEIGHT_DECAY_BIAS is not None:
                    wd = s.WEIGHT_DECAY_BIAS
            groups.setdefault((lr, wd), []).append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameter (check MODEL.BACKBONE.FREEZE_AT)")
    params = [p for ps in groups.values() for p in ps]
    return torch.optim.SGD([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                           lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV,
                           **fused_if_supported(params, params[0].device))


def build_lr_schedule(cfg, optimizer) -> LRSchedule:
    """Return the per-iteration learning rates of ``SOLVER.LR_SCHEDULER_NAME`` with warm-up."""
    s = cfg.SOLVER
    mult = build_lr_multiplier(s.LR_SCHEDULER_NAME, s.MAX_ITER, s.STEPS, s.GAMMA, warmup_iters=s.WARMUP_ITERS,
                               warmup_factor=s.WARMUP_FACTOR, warmup_method=s.WARMUP_METHOD,
                               cosine_end=s.BASE_LR_END / s.BASE_LR if s.BASE_LR else 0.0)
    return LRSchedule(optimizer, mult, s.MAX_ITER)


def _proposal_files(cfg, split: str) -> Optional[List[str]]:
    """Return ``DATASETS.PROPOSAL_FILES_<split>`` when ``MODEL.LOAD_PROPOSALS``, checked to give one file per dataset.

    Returns None when proposals are not loaded. Raises :class:`ConfigError` naming the key.
    """
    if not cfg.MODEL.LOAD_PROPOSALS:
        return None
    files, names = list(cfg.DATASETS[f"PROPOSAL_FILES_{split}"]), list(cfg.DATASETS[split])
    if len(files) != len(names):
        raise ConfigError(f"DATASETS.PROPOSAL_FILES_{split} has {len(files)} file(s) for the {len(names)} dataset(s) "
                          f"of DATASETS.{split} ({', '.join(names) or 'none'}); MODEL.LOAD_PROPOSALS needs one "
                          "proposal file per dataset")
    return files


def build_evaluator(cfg, dataset_name: str, output_dir: Optional[str] = None, dicts: Optional[List[dict]] = None):
    """Return the evaluator of the configured detector for one test dataset.

    A ``ProposalNetwork`` gets a :class:`~wrn_det.detection.evaluation.proposals.ProposalEvaluator`
    (proposal recall, and the proposal file ``box_proposals.pkl``); the detectors the box AP
    evaluator the dataset's metadata ``evaluator_type`` names: a
    :class:`~wrn_det.detection.evaluation.VOCEvaluator` for ``"pascal_voc"`` (the VOC datasets),
    a :class:`~wrn_det.detection.evaluation.COCOEvaluator` otherwise, which scores
    ``TEST.DETECTIONS_PER_IMAGE`` detections per image. Either reads and checks the dataset's
    ground truth once, when built (the VOC one from ``dicts`` when given: the dataset dicts
    already read); ``output_dir`` may be changed between evaluations.
    """
    if cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork":
        return ProposalEvaluator(dataset_name, output_dir)
    if MetadataCatalog.get(dataset_name).get("evaluator_type") == "pascal_voc":
        return VOCEvaluator(dataset_name, output_dir, dicts=dicts)
    return COCOEvaluator(dataset_name, output_dir, cfg.TEST.COCO_EVAL_BACKEND, max_dets=cfg.TEST.DETECTIONS_PER_IMAGE)


class EvaluationSet(NamedTuple):
    """One dataset of ``DATASETS.TEST``, ready to evaluate on: its dicts, its loader, its evaluator."""

    dicts: List[dict]
    loader: object
    evaluator: object


def prepare_test_sets(cfg) -> "OrderedDict[str, EvaluationSet]":
    """Return ``dataset -> EvaluationSet`` of ``DATASETS.TEST``, every file checked as training's are.

    Run before training, so that a missing or broken test set, a bad
    ``TEST.COCO_EVAL_BACKEND`` or an unreadable test image stops the run at the start rather
    than after it: the annotation files are read and checked, the evaluators built once for the
    whole run (which reads and checks the ground truth and the backend), and with
    ``DATALOADER.CHECK_IMAGES`` every image header read.
    """
    out = OrderedDict()
    proposal_files = _proposal_files(cfg, "TEST")
    for f in proposal_files or []:
        if not os.path.isfile(f):
            raise WrnDetError(f"DATASETS.PROPOSAL_FILES_TEST: proposal file {f} not found")
    for i, name in enumerate(cfg.DATASETS.TEST):
        files = [proposal_files[i]] if proposal_files is not None else None
        dicts = get_detection_dataset_dicts([name], filter_empty=False, proposal_files=files,
                                            proposal_key="DATASETS.PROPOSAL_FILES_TEST")
        evaluator = build_evaluator(cfg, name, dicts=dicts)
        if cfg.DATALOADER.CHECK_IMAGES:
            check_dataset_images(dicts, name)
        out[name] = EvaluationSet(dicts, build_detection_test_loader(cfg, dicts), evaluator)
    return out


def check_num_classes(cfg, datasets) -> None:
    """Raise :class:`ConfigError` when ``MODEL.ROI_HEADS.NUM_CLASSES`` is below a dataset's number of categories."""
    want = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    for name in datasets:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            continue
        if want < len(classes):
            raise ConfigError(f"MODEL.ROI_HEADS.NUM_CLASSES is {want} but dataset {name} has {len(classes)} categories; "
                              f"set it to {len(classes)}")
        if want > len(classes):
            logger.warning("MODEL.ROI_HEADS.NUM_CLASSES is %d, dataset %s has %d categories: %d outputs stay unused",
                           want, name, len(classes), want - len(classes))


def _fmt_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class Trainer(TrainerBase):
    """Iteration-based training of a detector built from ``cfg``: ``resume_or_load``, ``train``, ``test``.

    Everything is built in ``__init__`` (model, datasets, test sets and their evaluators,
    optimizer, schedule, mixed precision, EMA), so a bad config or a missing dataset fails
    before the first iteration; nothing is written to ``OUTPUT_DIR`` yet. With ``eval_only``
    only what evaluation needs is built (no training data is read). Checkpoints follow the
    schema of :mod:`wrn_det.engine.training`, with the class ``metadata`` for
    :class:`~wrn_det.detection.predictor.Predictor`.
    """

    task = "detection"

    def __init__(self, cfg, eval_only: bool = False):
        super().__init__(cfg, eval_only)
        if eval_only and not cfg.DATASETS.TEST:
            raise ConfigError("--eval-only needs DATASETS.TEST")
        if int(cfg.SEED) >= 0:
            # the initial weights follow SEED however the trainer is made (tools/train_net.py's set-up seeds
            # the same way); otherwise they would depend on what the process drew before
            seed_all(int(cfg.SEED) + self.rank)
        self.model = build_detector(cfg)
        self.device = self.model.device
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        logger.info("model %s with %s backbone %s: %.2fM parameters (%.2fM trainable) on %s",
                    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.NAME, cfg.MODEL.WRN.NAME,
                    n_all / 1e6, n_train / 1e6, self.device)
        if not eval_only:
            local_batch_size(int(cfg.SOLVER.IMS_PER_BATCH), self.world_size)
            self.train_dicts = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN),
                                                           cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                                                           proposal_files=_proposal_files(cfg, "TRAIN"))
            check_num_classes(cfg, cfg.DATASETS.TRAIN)
            if cfg.DATALOADER.CHECK_IMAGES:
                t0 = time.perf_counter()
                check_dataset_images(self.train_dicts, ", ".join(cfg.DATASETS.TRAIN))
                logger.info("checked the %d training images in %.1f s", len(self.train_dicts),
                            time.perf_counter() - t0)
        # the test sets are used after training: everything about them is checked now, their evaluators built once
        self.test_sets = prepare_test_sets(cfg)
        if eval_only:
            check_num_classes(cfg, self.test_sets)
        else:
            logger.info("training on %d images of %s", len(self.train_dicts), ", ".join(cfg.DATASETS.TRAIN))
            self.optimizer = build_optimizer(cfg, self.model)
            self.schedule = build_lr_schedule(cfg, self.optimizer)
            dtype = amp_dtype(cfg.SOLVER.AMP, self.device)
            if dtype is not None:
                logger.info("mixed precision: autocast to %s on %s", dtype, self.device)
            self.step = OptimizerStep(self.optimizer, self.device, dtype, gradient_clipper(cfg.SOLVER.CLIP_GRADIENTS))
            self.ema = ModelEMA(self.model, cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None
        self.checkpointer = TrainingCheckpointer(cfg.OUTPUT_DIR, prefix="model_")
        self.metadata = checkpoint_metadata(cfg)  # class names and ids, for wrn_det.Predictor
        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        if int(cfg.LOG_PERIOD) < 1:
            raise ConfigError(f"LOG_PERIOD must be a positive number of iterations, got {cfg.LOG_PERIOD}")

    # ------------------------------------------------------------------ the training state

    def load_weights(self, path: str) -> None:
        """Load ``MODEL.WEIGHTS`` (the EMA weights with ``--eval-only`` and ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``)."""
        load_detector_weights(self.model, path, strict=self.cfg.MODEL.WRN.STRICT_WEIGHTS,
                              use_ema=self.eval_only and self.cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY)

    def restore(self, ckpt: dict) -> int:
        """Load a training checkpoint; an ``--eval-only`` run with ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``
        takes its EMA weights as the model's. Returns the first iteration to train."""
        if self.eval_only and self.cfg.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY:
            if ckpt.get("ema") is None:
                raise WrnDetError(f"MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY: {self.resumed_from} holds no EMA weights "
                                  "(the run had MODEL_EMA.ENABLED False)")
            ckpt = dict(ckpt, model=ckpt["ema"])
        return super().restore(ckpt)

    def restore_position(self, ckpt: dict):
        """Return (first iteration, its description) of a resumed checkpoint: the one after its ``iteration``."""
        start = int(ckpt["iteration"]) + 1
        return start, f"iteration {start}"

    def save(self, name: str, iteration: int) -> Optional[str]:
        """Write the training checkpoint ``name`` after ``iteration``; returns the run's newest checkpoint."""
        return self.save_checkpoint(name, iteration, metadata=self.metadata)

    # ------------------------------------------------------------------ training

    def prepare_training(self, start: int) -> None:
        """Wrap the model for distributed training and start the data stream at iteration ``start``."""
        self.train_model = create_ddp_model(self.model, self.device)
        self.data = iter(build_detection_train_loader(self.cfg, self.train_dicts, self.seed, start))

    def run_loop(self, start: int, writer: MetricsWriter) -> Dict:
        """Train to ``SOLVER.MAX_ITER``, then the final evaluation; returns its results.

        With ``MODEL_EMA.ENABLED`` the EMA weights are evaluated too, under ``"ema"`` (their
        result files in ``inference/ema``).
        """
        if start < self.max_iter:
            self._loop(start, writer)
        results = self.test() if self.cfg.DATASETS.TEST else {}
        if results and comm.is_main_process():
            self._write_evaluation(writer, results, self.max_iter - 1)
        return results

    def _write_evaluation(self, writer: MetricsWriter, results: Dict, step: int) -> None:
        """Write an evaluation's numbers at ``step``, and its pictures (``inference/**.png``) for the trackers."""
        writer.write(flatten_results(results), step=step)
        root = os.path.join(self.cfg.OUTPUT_DIR, "inference")
        pictures = {}
        for folder, _, files in os.walk(root):
            for f in sorted(files):
                if f in PLOT_FILES:
                    path = os.path.join(folder, f)
                    pictures[os.path.splitext(os.path.relpath(path, self.cfg.OUTPUT_DIR))[0]] = path
        writer.write_images(pictures, step)

    def test(self) -> Dict:
        """Evaluate the model (and the EMA weights, under ``"ema"``) on every dataset of ``DATASETS.TEST``.

        Returns ``{"bbox": {...}}`` for one dataset, ``{dataset: {"bbox": {...}}}`` for several
        (on rank 0; empty dicts elsewhere); a ProposalNetwork gives ``"box_proposals"`` in place
        of ``"bbox"``. Results files (``coco_instances_results.json``, or the proposal file
        ``box_proposals.pkl``) go to ``OUTPUT_DIR/inference`` (``inference/ema`` for the EMA),
        one folder further per dataset with several.
        """
        self.resume_or_load()
        results = self._evaluate(self.model, "inference")
        if self.ema is not None:
            ema = self._evaluate(self.ema.module, os.path.join("inference", "ema"))
            if comm.is_main_process():
                results = {**results, "ema": ema}
        return results

    def _evaluate(self, model: nn.Module, inference_dir: str) -> Dict:
        results = OrderedDict()
        for name, test_set in self.test_sets.items():
            out_dir = os.path.join(self.cfg.OUTPUT_DIR, inference_dir)
            test_set.evaluator.output_dir = out_dir if len(self.test_sets) == 1 else os.path.join(out_dir, name)
            results[name] = inference_on_dataset(unwrap(model), test_set.loader, test_set.evaluator)
        if len(results) == 1:
            return next(iter(results.values()))
        return results

    def _loop(self, start_iter: int, writer: MetricsWriter) -> None:
        """Train from ``start_iter`` to ``SOLVER.MAX_ITER``, then write ``model_final``.

        Nothing in an iteration waits for the device: the losses stay on it (:class:`StepValues`)
        until a log step (every ``LOG_PERIOD`` iterations, the first and the last, and before
        every checkpoint or evaluation) reads them all in one all-reduce, checks them for
        non-finite values (naming the iteration it happened at) and carries the preemption flags.
        """
        cfg = self.cfg
        model, data = self.train_model, self.data
        window: Dict[str, deque] = {}
        values: Optional[StepValues] = None
        log_period = int(cfg.LOG_PERIOD)
        period = int(cfg.SOLVER.CHECKPOINT_PERIOD)
        eval_period = int(cfg.TEST.EVAL_PERIOD)
        logger.info("starting training from iteration %d", start_iter)
        model.train()
        t_start = t_sync = time.perf_counter()
        for it in range(start_iter, self.max_iter):
            t0 = time.perf_counter()
            batch = next(data)
            data_time = time.perf_counter() - t0
            lr = self.schedule.apply(it)
            with self.step.autocast():
                loss_dict = model(batch)
            if values is None:
                values = StepValues(list(loss_dict))
            losses = sum(loss_dict.values())
            values.add(it, torch.stack([loss_dict[k].detach().float() for k in values.names]))
            self.step.step(losses)
            if self.ema is not None:
                self.ema.update(self.model)
            window.setdefault("data_time", deque(maxlen=log_period)).append(data_time)
            nxt = it + 1
            checkpoint = period > 0 and nxt % period == 0 and nxt != self.max_iter
            evaluate = eval_period > 0 and nxt % eval_period == 0 and nxt != self.max_iter and bool(cfg.DATASETS.TEST)
            synced = nxt % log_period == 0 or nxt == self.max_iter or it == start_iter or checkpoint or evaluate
            if synced:
                # the one wait for the device: every iteration's losses since the last log step
                sync = values.collect(self.preempt_flag())
                now = time.perf_counter()
                self._check_finite(sync, values.names)
                per_iter = (now - t_sync) / max(len(sync.rows), 1)
                for row in sync.rows:
                    for k, v in zip(values.names + ["total_loss", "time"], row + [sum(row), per_iter]):
                        window.setdefault(k, deque(maxlen=log_period)).append(v)
                self._log(it, lr, window, writer, now - t_start, nxt - start_iter)
                if nxt != self.max_iter:
                    self.stop_if_preempted(it, lambda: self.save(f"model_{it:07d}", it), sync.preempted)
            elif nxt != self.max_iter:
                self.stop_if_preempted(it, lambda: self._save_checked(values, it))
            if checkpoint:
                self.save(f"model_{it:07d}", it)
            if evaluate:
                res = self.test()
                if comm.is_main_process():
                    self._write_evaluation(writer, res, it)
                model.train()
            if synced:  # the time per iteration counts training alone, not logging, checkpoints or evaluation
                t_sync = time.perf_counter()
        self.save("model_final", self.max_iter - 1)

    def _check_finite(self, sync: LogSync, names: List[str]) -> None:
        """Raise the non-finite-loss error when an iteration of ``sync`` had a NaN or infinite loss."""
        bad = sync.first_non_finite()
        if bad is not None:
            it, row = bad
            detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, row))
            raise non_finite_error("non-finite", f"at iteration {it}", detail, self.last_checkpoint)

    def _save_checked(self, values: StepValues, it: int) -> Optional[str]:
        """Save after ``it`` for a preemption between log steps (one process): the losses since the last are checked first."""
        self._check_finite(values.collect(), values.names)
        return self.save(f"model_{it:07d}", it)

    def _log(self, it: int, lr: float, window: Dict[str, deque], writer: MetricsWriter, elapsed: float, done: int):
        med = {k: sorted(v)[len(v) // 2] for k, v in window.items() if v}
        per_iter = elapsed / max(done, 1)
        eta = per_iter * (self.max_iter - it - 1)
        losses = {k: v for k, v in med.items() if k.startswith("loss") or k == "total_loss"}
        loss_txt = "  ".join(f"{k}: {v:.4g}" for k, v in sorted(losses.items(), key=lambda kv: kv[0] != "total_loss"))
        mem = ""
        if self.device.type == "cuda":
            mem = f"  max_mem: {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f}M"
        logger.info("eta: %s  iter: %d  %s  time: %.4f  data_time: %.4f  lr: %.5g%s",
                    _fmt_eta(eta), it, loss_txt, med["time"], med["data_time"], lr, mem)
        writer.write({**{k: v for k, v in med.items()}, "lr": lr, "eta_seconds": eta}, step=it)


def setup(args):
    """Return the frozen config of ``args`` (file + overrides) after setting up logging and seeds.

    ``OUTPUT_DIR`` is not touched yet: :func:`main` opens it once the run has passed its checks.
    """
    cfg = load_config(get_det_cfg(), args.config_file, args.opts)
    setup_run(cfg)
    logger.info("command-line overrides: %s", " ".join(args.opts or []))
    return cfg


def main(args) -> Dict:
    """Train (or, with ``--eval-only``, evaluate) as configured by ``args``; returns the evaluation results.

    Everything is built and checked first (config, model, weights or the checkpoint to resume,
    every dataset and its images); only then is ``OUTPUT_DIR`` created and written to, so a
    rejected run leaves no folder behind and a finished run's ``config.yaml`` is not replaced.
    ``--eval-only`` evaluates ``MODEL.WEIGHTS`` (with ``--resume``: the newest checkpoint of ``OUTPUT_DIR``).
    """
    cfg = setup(args)
    trainer = Trainer(cfg, eval_only=args.eval_only)
    trainer.resume_or_load(args.resume)
    open_output_dir(cfg)
    return trainer.test() if args.eval_only else trainer.train()
