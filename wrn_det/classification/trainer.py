"""The classification trainer: epochs of SGD over an in-memory set or an ImageNet loader.

One :class:`ClsTrainer` does a whole run from a config: data, model, optimizer,
schedule, distributed wrapping, and per epoch: training, evaluation, ``metrics.json``
and TensorBoard, an atomic checkpoint (everything ``--resume`` needs to continue
bit for bit, in the schema of :mod:`wrn_det.engine.training`), ``model_best.pth``; at
the end ``model_final.pth``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from wrn_det.data.classification import ArraySet, build_cls_datasets
from wrn_det.data.cls_loader import InMemoryLoader, build_imagenet_loader, imagenet_transforms
from wrn_det.data.cls_preprocess import normalizer_from_cfg, zca_whiten
from wrn_det.engine import comm
from wrn_det.engine.checkpoint import TrainingCheckpointer
from wrn_det.engine.device import prepare_device, resolve_device
from wrn_det.engine.ema import ModelEMA
from wrn_det.engine.errors import ConfigError, NonFiniteLossError, WrnDetError
from wrn_det.engine.events import MetricsWriter, trim_metrics
from wrn_det.engine.fileio import atomic_save, write_json
from wrn_det.engine.launch import create_ddp_model
from wrn_det.engine.optim import OptimizerStep, amp_dtype, fused_if_supported, non_finite_error
from wrn_det.engine.progress import progress
from wrn_det.engine.schedules import LRSchedule, build_lr_multiplier
from wrn_det.engine.seed import seed_all
from wrn_det.engine.training import LogSync, StepValues, TrainerBase, rank_seed
from wrn_det.models import build_model, count_parameters
from wrn_det.models.norm import get_norm
from wrn_det.models.pretrained import load_classifier_weights as load_weights  # MODEL.WEIGHTS of this trainer

from .curves import append_json_stats
from .evaluation import accuracy_counts, evaluate

__all__ = ["ClsTrainer", "NonFiniteLossError", "build_cls_model", "load_weights"]

logger = logging.getLogger("wrn_det.cls")

CHECKPOINT_PREFIX = "model_epoch_"


def build_cls_model(cfg, num_classes: int) -> nn.Module:
    """Return ``wrn_det.models.build_model`` for ``cfg.MODEL``; bad names or options raise ConfigError.

    With ``MODEL.SYNC_BN`` in a run of several processes the network is built with
    :class:`~wrn_det.models.norm.SyncBatchNorm` (statistics of the global batch, on GPUs and
    on CPUs with gloo), else with BatchNorm.
    """
    kwargs = {"memory_efficient": cfg.MODEL.MEMORY_EFFICIENT}
    if cfg.MODEL.SYNC_BN and comm.get_world_size() > 1:
        kwargs["norm_layer"] = get_norm("SyncBN")
    if cfg.MODEL.DROPOUT > 0:
        kwargs["dropout"] = cfg.MODEL.DROPOUT
    try:
        return build_model(cfg.MODEL.NAME, num_classes=num_classes, **kwargs)
    except ValueError as e:
        raise ConfigError(f"MODEL.NAME {cfg.MODEL.NAME!r} with MODEL.DROPOUT {cfg.MODEL.DROPOUT}: {e}") from None


class ClsTrainer(TrainerBase):
    """Train and evaluate one classification run described by ``cfg``: ``resume_or_load``, ``train``, ``test``.

    Everything (data, model, optimizer, schedule) is built in ``__init__``; nothing is written
    to ``OUTPUT_DIR`` yet. ``resume_or_load(True)`` continues from the newest intact checkpoint
    of ``OUTPUT_DIR`` when there is one (model, optimizer, schedule position, EMA, gradient
    scaler, best error and the random-number states of every process), so the run ends exactly
    as if it had never stopped. With ``eval_only``, :meth:`test` evaluates ``MODEL.WEIGHTS`` (or
    the resumed checkpoint) and writes ``eval_metrics.json``.
    """

    task = "classification"

    def __init__(self, cfg, eval_only: bool = False):
        super().__init__(cfg, eval_only)
        self.device = prepare_device(resolve_device(cfg.MODEL.DEVICE))
        self.output_dir = cfg.OUTPUT_DIR
        self.is_imagenet = cfg.DATASETS.NAME.lower() == "imagenet"
        self.checkpointer = TrainingCheckpointer(self.output_dir, prefix=CHECKPOINT_PREFIX,
                                                 keep=cfg.SOLVER.CHECKPOINT_KEEP)
        seed = cfg.SEED
        if seed < 0:
            seed = comm.all_gather(seed_all(-1))[0]  # one seed for every rank
        self.seed = seed_all(seed)  # a resumed run takes its checkpoint's (resume_or_load)

        self._build_data()
        self._build_model()
        # per-rank streams for dropout etc., decided after the (identical) initialisation
        seed_all(rank_seed(self.seed, self.rank))
        self._build_optimizer()
        self.start_epoch = 1
        self.start_batch, self.start_sums = 0, None  # where a mid-epoch (preempted) checkpoint stopped
        self.best_top1_err = math.inf
        self.train_model = self.model if eval_only else self._wrap()

    # ------------------------------------------------------------------ building

    def _build_data(self) -> None:
        cfg = self.cfg
        self.test_batch = cfg.TEST.IMS_PER_BATCH
        if self.is_imagenet:
            tr_tf, te_tf = imagenet_transforms(cfg.INPUT.TRAIN_CROP_SIZE, cfg.INPUT.TEST_RESIZE, cfg.INPUT.TEST_CROP_SIZE,
                                               cfg.INPUT.COLOR_JITTER, cfg.INPUT.LIGHTING_STD)
            train_set, test_set = build_cls_datasets(cfg, tr_tf, te_tf)
            classes, channels = train_set.classes, 3
        else:
            # with DATASETS.DOWNLOAD, rank 0 fetches the files before the other ranks read them
            first = cfg.DATASETS.DOWNLOAD and self.world_size > 1
            if first and self.rank != 0:
                comm.synchronize()
            train_set, test_set = build_cls_datasets(cfg)
            if first and self.rank == 0:
                comm.synchronize()
            if cfg.INPUT.PREPROCESS == "zca":
                # rank 0 fits and caches the whitening; the others then read the cache
                if self.rank != 0:
                    comm.synchronize()
                train_set, test_set = zca_whiten(
                    train_set, test_set, cfg.INPUT.ZCA_GCN_SCALE, cfg.INPUT.ZCA_FILTER_BIAS,
                    cfg.INPUT.ZCA_CACHE_DIR or None, self.device)
                if self.rank == 0:
                    comm.synchronize()
            self._check_labels(train_set)
            self._check_labels(test_set)
            classes, channels = train_set.classes, train_set.images.shape[1]
        self._sets = (train_set, test_set)
        self._build_loaders()
        self.num_classes = cfg.MODEL.NUM_CLASSES or len(classes)
        if self.num_classes != len(classes):
            raise ConfigError(
                f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but {cfg.DATASETS.NAME} in {cfg.DATASETS.ROOT} has "
                f"{len(classes)} classes (set it to {len(classes)}, or 0 to take it from the data)")
        self.channels_last = cfg.MODEL.CHANNELS_LAST and self.device.type == "cuda"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.normalizer = normalizer_from_cfg(cfg, channels, 3, fmt).to(self.device)
        self.iters_per_epoch = len(self.train_loader)
        if self.iters_per_epoch == 0:
            raise ConfigError(f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) leaves no full batch in the training set")

    def _build_loaders(self) -> None:
        """Build the loaders of the training and test sets; their order and augmentation follow ``self.seed``."""
        cfg = self.cfg
        train_set, test_set = self._sets
        self._loader_seed = self.seed
        if self.is_imagenet:
            pin = self.device.type == "cuda"
            self.train_loader = build_imagenet_loader(
                train_set, cfg.SOLVER.IMS_PER_BATCH, True, cfg.DATALOADER.NUM_WORKERS, self.seed, self.rank,
                self.world_size, pin)
            self.test_loader = build_imagenet_loader(
                test_set, cfg.TEST.IMS_PER_BATCH, False, cfg.DATALOADER.NUM_WORKERS, self.seed, self.rank,
                self.world_size, pin)
        else:
            self.train_loader = InMemoryLoader(
                train_set, cfg.SOLVER.IMS_PER_BATCH, self.device, True, cfg.INPUT.CROP_PADDING, cfg.INPUT.HFLIP,
                self.seed, self.rank, self.world_size)
            self.test_loader = InMemoryLoader(
                test_set, cfg.TEST.IMS_PER_BATCH, self.device, False, seed=self.seed, rank=self.rank,
                world_size=self.world_size)

    def _check_labels(self, data: ArraySet) -> None:
        if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= len(data.classes)):
            raise WrnDetError(
                f"{data.source}: labels range over [{int(data.labels.min())}, {int(data.labels.max())}] but the "
                f"dataset has {len(data.classes)} classes")

    def _build_model(self) -> None:
        cfg = self.cfg
        model = build_cls_model(cfg, self.num_classes)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: state dicts, evaluation
        self.n_parameters = count_parameters(model)
        self.ema = ModelEMA(model, cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None

        self.amp_dtype = amp_dtype(cfg.SOLVER.AMP, self.device)

    def _autocast(self):
        return self.step.autocast()

    def _build_optimizer(self) -> None:
        s = self.cfg.SOLVER
        self.base_lr = s.BASE_LR * (s.IMS_PER_BATCH / s.REFERENCE_BATCH_SIZE if s.REFERENCE_BATCH_SIZE > 0 else 1.0)
        try:
            params = list(self.model.parameters())
            self.optimizer = torch.optim.SGD(
                params, lr=self.base_lr, momentum=s.MOMENTUM, dampening=s.DAMPENING,
                weight_decay=s.WEIGHT_DECAY, nesterov=s.NESTEROV, **fused_if_supported(params, self.device))
        except ValueError as e:
            raise ConfigError(f"SOLVER (BASE_LR/MOMENTUM/DAMPENING/WEIGHT_DECAY/NESTEROV): {e}") from None
        steps = [int(x) for x in s.STEPS]
        if any(x < 2 for x in steps) or steps != sorted(set(steps)):
            raise ConfigError(
                f"SOLVER.STEPS must be increasing epochs >= 2 (counted from 1) at whose start the rate drops, got {tuple(s.STEPS)}")
        if s.EPOCHS < 1:
            raise ConfigError(f"SOLVER.EPOCHS must be >= 1, got {s.EPOCHS}")
        ipe = self.iters_per_epoch
        self.max_iter = s.EPOCHS * ipe
        kept = [x for x in steps if x <= s.EPOCHS]
        if s.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and len(kept) < len(steps):
            # said here in epochs (the schedule itself counts iterations)
            logger.warning("SOLVER.STEPS %s come after the last epoch (%d) and are ignored", steps[len(kept):], s.EPOCHS)
        self.lr_steps = kept if s.LR_SCHEDULER_NAME == "WarmupMultiStepLR" else []
        multiplier = build_lr_multiplier(
            s.LR_SCHEDULER_NAME, self.max_iter, [(x - 1) * ipe for x in kept], s.GAMMA,
            warmup_iters=int(round(s.WARMUP_EPOCHS * ipe)), warmup_factor=s.WARMUP_FACTOR,
            warmup_method=s.WARMUP_METHOD, cosine_end=s.COSINE_END, length_key="SOLVER.EPOCHS")
        self.schedule = LRSchedule(self.optimizer, multiplier, self.max_iter)
        self.step = OptimizerStep(self.optimizer, self.device, self.amp_dtype)

    def _wrap(self) -> nn.Module:
        model = create_ddp_model(self.model, self.device)
        if self.cfg.MODEL.COMPILE:
            model = torch.compile(model)
        return model

    # ------------------------------------------------------------------ the training state

    def load_weights(self, path: str) -> None:
        """Load ``MODEL.WEIGHTS``: all of it for ``--eval-only``, else all but a classifier of another shape."""
        load_weights(self.model, path, with_classifier=self.eval_only)
        logger.info("loaded weights from %s", path)

    def _task_keys(self, epoch: int, iterations_done: int) -> dict:
        """Return this task's checkpoint keys after ``epoch`` (``iterations_done`` iterations in all)."""
        return {
            "config": self.cfg.dump(),
            "epoch": epoch,
            "best_top1_err": self.best_top1_err,
            "scheduler": {"name": self.cfg.SOLVER.LR_SCHEDULER_NAME, "iteration": iterations_done,
                          "max_iter": self.max_iter, "base_lr": self.base_lr},
        }

    def restore_position(self, state: dict):
        """Take the epoch (and batch, after a preemption), best error and seed of a resumed checkpoint.

        Returns (first iteration, where in words).
        """
        if state["scheduler"]["max_iter"] != self.max_iter:
            logger.warning("the schedule changed since the checkpoint (%d -> %d iterations); continuing on the new one",
                           state["scheduler"]["max_iter"], self.max_iter)
        batch = int(state.get("batch", 0))
        if batch:  # a preemption checkpoint inside the epoch: continue that epoch at its next batch
            self.start_epoch, self.start_batch = int(state["epoch"]), batch
            sums = state["epoch_sums"]
            self.start_sums = sums[self.rank].to(self.device) if len(sums) == self.world_size else None
        else:
            self.start_epoch = int(state["epoch"]) + 1
        self.best_top1_err = float(state["best_top1_err"])
        if self.seed != self._loader_seed:  # the run's seed (drawn when SEED was negative) orders its data
            self._build_loaders()
        start = (self.start_epoch - 1) * self.iters_per_epoch + self.start_batch
        return start, f"epoch {self.start_epoch}" + (f", batch {self.start_batch + 1}" if self.start_batch else "")

    def _save(self, epoch: int):
        it = epoch * self.iters_per_epoch
        return self.save_checkpoint(f"{CHECKPOINT_PREFIX}{epoch:04d}", it - 1, **self._task_keys(epoch, it))

    def _save_within_epoch(self, epoch: int, batch: int, sums: torch.Tensor):
        """Write a checkpoint after ``batch`` batches of ``epoch`` (a preemption); returns its path on rank 0."""
        it = (epoch - 1) * self.iters_per_epoch + batch
        # every process's partial sums of the epoch's loss and accuracy
        return self.save_checkpoint(f"{CHECKPOINT_PREFIX}{epoch:04d}_{batch:05d}", it - 1,
                                    **self._task_keys(epoch, it), batch=batch,
                                    epoch_sums=comm.all_gather(sums.detach().cpu()))

    def _save_weights(self, name: str, **extra) -> None:
        if comm.is_main_process():
            obj = {"model": self.model.state_dict(), **extra}
            if self.ema is not None:
                obj["ema"] = self.ema.state_dict()
            atomic_save(obj, os.path.join(self.output_dir, name))

    def _trim_metrics(self, last_epoch: int) -> None:
        """Drop metrics.json rows of epochs after ``last_epoch`` (written before an interruption)."""
        if comm.is_main_process():
            trim_metrics(self.output_dir, lambda row: row.get("epoch", 0) <= last_epoch)

    # ------------------------------------------------------------------ training

    def _check_finite(self, value: float, epoch: int, it: int, lr: float) -> None:
        if not math.isfinite(value):
            raise non_finite_error(str(value), f"at epoch {epoch}, iteration {it}/{self.iters_per_epoch}", f"lr {lr:g}",
                                   self.checkpointer.latest())

    def _check_sync(self, sync: LogSync) -> None:
        """Raise the non-finite-loss error for the first iteration of ``sync`` whose loss was NaN or infinite."""
        bad = sync.first_non_finite()
        if bad is not None:
            (epoch, i, lr), (value,) = bad
            self._check_finite(value, epoch, i, lr)

    def train_one_epoch(self, epoch: int, start_batch: int = 0, sums: torch.Tensor = None) -> dict:
        """Run one epoch of training; returns ``{"train_loss", "train_top1_err", "lr", "seconds", ...}``.

        ``start_batch`` and ``sums`` continue an epoch a preemption stopped (its batches and
        their augmentation depend on ``(seed, epoch)`` only, so the rest is as it would have
        been). A preemption signal stops it with a checkpoint (:class:`~wrn_det.engine.errors.Preempted`)
        after the current batch in one process, at the next log step (``LOG_PERIOD``) in several.
        Nothing in an iteration waits for the device: the losses are read, checked and logged at
        the log steps (every ``LOG_PERIOD`` iterations and the epoch's last).
        """
        cfg = self.cfg
        ipe = self.iters_per_epoch
        if epoch in self.lr_steps and cfg.SOLVER.RESET_MOMENTUM_AT_STEPS and start_batch == 0:
            # the original code built a fresh optimizer at every drop: momentum restarts from zero
            self.optimizer.state.clear()
            logger.info("epoch %d: learning-rate step, momentum buffers reset", epoch)
        self.train_loader.set_epoch(epoch, start_batch)
        self.train_model.train()
        if sums is None:
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss * n, correct, n
        values = StepValues(["loss"])
        start = time.perf_counter()
        lr = self.base_lr
        with progress(ipe, f"epoch {epoch}/{cfg.SOLVER.EPOCHS}") as bar:
            if bar is not None and start_batch:
                bar.update(start_batch)
            for i, (images, labels) in enumerate(self.train_loader, start_batch):
                it = (epoch - 1) * ipe + i
                lr = self.schedule.apply(it)
                images = self.normalizer(images.to(self.device, non_blocking=True))
                labels = labels.to(self.device, non_blocking=True)
                with self._autocast():
                    logits = self.train_model(images)
                loss = F.cross_entropy(logits.float(), labels)
                self.step.step(loss)
                if self.ema is not None:
                    self.ema.update(self.model)
                with torch.no_grad():
                    top1, _ = accuracy_counts(logits.detach().float(), labels, 1)
                    n = labels.numel()
                    # the image count is a Python number: added by the kernels, never copied to the device
                    sums[:2] += torch.stack([loss.detach().double() * n, top1.double()])
                    sums[2:] += n
                values.add((epoch, i + 1, lr), loss.detach())
                if (i + 1) % cfg.LOG_PERIOD == 0 or i + 1 == ipe:
                    sync = values.collect(self.preempt_flag())
                    self._check_sync(sync)
                    value = sync.rows[-1][0]
                    logger.info("epoch %d/%d iter %d/%d loss %.6f lr %.6g", epoch, cfg.SOLVER.EPOCHS, i + 1, ipe, value, lr)
                    if bar is not None:
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4g}")
                    if i + 1 < ipe:
                        self.stop_if_preempted(it, lambda: self._save_within_epoch(epoch, i + 1, sums), sync.preempted)
                elif i + 1 < ipe:
                    self.stop_if_preempted(it, lambda: self._checked_save_within_epoch(values, epoch, i + 1, sums))
                if bar is not None:
                    bar.update(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        self._check_finite(loss_sum, epoch, ipe, lr)
        return {
            "lr": lr,
            "train_loss": loss_sum / count,
            "train_top1_err": 100.0 * (1 - correct / count),
            "seconds": seconds,
            "images_per_sec": count / seconds,
        }

    def _checked_save_within_epoch(self, values: StepValues, epoch: int, batch: int, sums: torch.Tensor):
        """:meth:`_save_within_epoch` for a preemption between log steps (one process), the losses checked first."""
        self._check_sync(values.collect())
        return self._save_within_epoch(epoch, batch, sums)

    def evaluate(self) -> dict:
        """Evaluate the model (and its EMA) on the test set; returns ``test_*``, ``ema_test_*`` and ``eval_seconds``."""
        out = {}
        start = time.perf_counter()
        res = evaluate(self.model, self.test_loader, self.normalizer, self.device, self._autocast)
        out.update({"test_loss": res["loss"], "test_top1_err": res["top1_err"], "test_top5_err": res["top5_err"]})
        if self.ema is not None:
            res = evaluate(self.ema.module, self.test_loader, self.normalizer, self.device, self._autocast)
            out.update({"ema_test_loss": res["loss"], "ema_test_top1_err": res["top1_err"], "ema_test_top5_err": res["top5_err"]})
        out["eval_seconds"] = time.perf_counter() - start
        return out

    def test(self) -> dict:
        """Evaluate the weights :meth:`resume_or_load` loaded on the test set; returns :meth:`evaluate`'s metrics.

        With ``eval_only`` (the ``--eval-only`` run) the result also names the ``weights`` and is
        written to ``OUTPUT_DIR/eval_metrics.json``.
        """
        self.resume_or_load()
        res = self.evaluate()
        if self.eval_only:
            res["weights"] = self.resumed_from or self.cfg.MODEL.WEIGHTS
            logger.info("evaluation of %s: %s", res["weights"], json.dumps(res))
            if comm.is_main_process():
                write_json(os.path.join(self.output_dir, "eval_metrics.json"), res)
        return res

    def prepare_training(self, start: int) -> None:
        """Drop the rows of ``metrics.json`` after the resumed epoch (before the loop appends to it)."""
        self._trim_metrics(self.start_epoch - 1)

    def run_loop(self, start: int, writer: MetricsWriter) -> dict:
        """Train from ``start_epoch`` to ``SOLVER.EPOCHS``; returns the last epoch's metrics."""
        cfg = self.cfg
        logger.info("training %s (%d parameters) on %s: %d images, %d iterations per epoch, epochs %d-%d, %d process(es) on %s",
                    cfg.MODEL.NAME, self.n_parameters, cfg.DATASETS.NAME, self.train_loader.num_images,
                    self.iters_per_epoch, self.start_epoch, cfg.SOLVER.EPOCHS, self.world_size, self.device)
        row = {}
        for epoch in range(self.start_epoch, cfg.SOLVER.EPOCHS + 1):
            row = {"epoch": epoch, "iteration": epoch * self.iters_per_epoch}
            first = epoch == self.start_epoch
            row.update(self.train_one_epoch(epoch, self.start_batch if first else 0,
                                            self.start_sums if first else None))
            if epoch % cfg.TEST.EVAL_PERIOD == 0 or epoch == cfg.SOLVER.EPOCHS:
                row.update(self.evaluate())
                if row["test_top1_err"] < self.best_top1_err:
                    self.best_top1_err = row["test_top1_err"]
                    self._save_weights("model_best.pth", epoch=epoch, test_top1_err=self.best_top1_err)
            row["best_test_top1_err"] = self.best_top1_err if math.isfinite(self.best_top1_err) else None
            row["n_parameters"] = self.n_parameters
            # the checkpoint before the metrics row: after a crash between the two,
            # the resumed run repeats the epoch and writes its row once
            self._save(epoch)
            writer.write(row, step=epoch)
            append_json_stats(self.output_dir, row, cfg)  # log.txt: the original code's json_stats line
            logger.info("epoch %d: %s", epoch, ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "epoch"))
        self._save_weights("model_final.pth", epoch=cfg.SOLVER.EPOCHS)
        return row
