"""The builtin engine's iteration-based training loop, checkpoints and the train_net entry point.

Mirrors detectron2's DefaultTrainer where users look: the solver keys, a log line every
20 iterations (losses, lr, time per iteration, ETA), ``metrics.json`` and TensorBoard
events, ``model_XXXXXXX.pth`` every ``SOLVER.CHECKPOINT_PERIOD`` iterations plus
``model_final.pth``, ``last_checkpoint``, evaluation every ``TEST.EVAL_PERIOD`` and at the
end. Checkpoints also hold the random-number states of every process and the data
seed, and the data stream is a function of (seed, iteration), so ``--resume`` after a
crash continues exactly as if the run had not stopped.
"""
import logging
import math
import os
import time
from collections import OrderedDict, deque
from datetime import timedelta
from typing import Dict, List, Optional

import torch
from torch import nn

from wrn_det.data.catalog import get_detection_dataset_dicts
from wrn_det.data.det_loader import build_detection_test_loader, build_detection_train_loader
from wrn_det.engine import comm
from wrn_det.engine.checkpoint import (atomic_save, get_rng_states, load_checkpoint, read_last_checkpoint,
                                       set_rng_states, write_last_checkpoint)
from wrn_det.engine.config import load_config, save_config
from wrn_det.engine.errors import ConfigError, WrnDetError
from wrn_det.engine.events import MetricsWriter, setup_logger
from wrn_det.engine.schedules import LRMultiplier, build_lr_multiplier
from wrn_det.engine.seed import seed_all

from .config import get_det_cfg
from .detector_weights import checkpoint_metadata
from .evaluation import COCOEvaluator, flatten_results, inference_on_dataset
from .modeling import build_detector

__all__ = ["setup", "main", "Trainer", "Checkpointer", "build_optimizer", "build_evaluator", "test", "LOG_PERIOD"]

logger = logging.getLogger("wrn_det")

LOG_PERIOD = 20
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d,
               nn.LayerNorm, nn.LocalResponseNorm)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DistributedDataParallel (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Checkpointer:
    """Save and load detector checkpoints in ``output_dir``.

    A checkpoint is ``{"model", "optimizer", "scheduler", "grad_scaler", "iteration",
    "rng_states" (one per process), "data_seed"}``, written atomically by rank 0.
    """

    def __init__(self, model: nn.Module, output_dir: str = "", optimizer=None, scheduler=None, grad_scaler=None):
        self.model = unwrap(model)
        self.output_dir = output_dir
        self.optimizer, self.scheduler, self.grad_scaler = optimizer, scheduler, grad_scaler

    def save(self, name: str, iteration: int, data_seed: int) -> Optional[str]:
        """Write ``<output_dir>/<name>.pth`` and point ``last_checkpoint`` at it; returns the path on rank 0."""
        rng = comm.all_gather(get_rng_states())  # every process takes part; only rank 0 writes
        if not comm.is_main_process():
            return None
        state = {"model": self.model.state_dict(), "iteration": iteration, "rng_states": rng, "data_seed": data_seed}
        state.update(getattr(self, "extra_state", {}))
        for key, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("grad_scaler", self.grad_scaler)):
            if obj is not None:
                state[key] = obj.state_dict()
        path = atomic_save(state, os.path.join(self.output_dir, f"{name}.pth"))
        write_last_checkpoint(self.output_dir, path)
        logger.info("saved checkpoint %s", path)
        return path

    def load_weights(self, path: str, key: str = "MODEL.WEIGHTS", strict: bool = True) -> dict:
        """Load model weights from ``path``: a detector checkpoint, or a backbone / classification state dict.

        For a backbone file, every tensor of the network's stem and stages must be in the
        file with its shape, and the file must hold no stage tensor the network lacks; the
        classifier is ignored. With ``strict`` (``MODEL.WRN.STRICT_WEIGHTS``) a gap is a
        :class:`WrnDetError`, else a warning. Other tensors whose name or shape does not fit
        are skipped with a warning. Returns the whole checkpoint dict. Raises
        :class:`WrnDetError` if the file is missing or unreadable or if none of its tensors
        fits the model.
        """
        try:
            ckpt = load_checkpoint(path)
        except WrnDetError as e:
            raise WrnDetError(f"{key}: {e}") from None
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
            raise WrnDetError(f"{key}: {path} holds no state dict of tensors")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        own = self.model.state_dict()
        backbone_file = not any(k in own for k in state)
        if backbone_file:
            # a backbone (classification network) state dict: its keys live under the network's prefix
            prefix = next((p for p in ("backbone.net.", "backbone.bottom_up.net.") if any(k.startswith(p) for k in own)), "")
            self._check_backbone_file(state, prefix, path, key, strict)
            state = {prefix + k: v for k, v in state.items()}
        loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        unexpected = [k for k in state if k not in own]
        if not loadable:
            raise WrnDetError(f"{key}: none of the {len(state)} tensors in {path} matches this model "
                              f"(e.g. {next(iter(state))!r})")
        self.model.load_state_dict(loadable, strict=False)
        # tensors shared with a loaded one (the C4 head's res5 is the network's last stage) are loaded too
        loaded_ptrs = {own[k].data_ptr() for k in loadable}
        missing = [k for k in own if k not in loadable and own[k].data_ptr() not in loaded_ptrs]
        logger.info("loaded %d of %d tensors of the model from %s", len(loadable), len(own), path)
        if mismatched:
            logger.warning("skipped %d tensors of a different shape: %s", len(mismatched), _short(mismatched))
        if unexpected:
            logger.warning("ignored %d tensors the model does not have: %s", len(unexpected), _short(unexpected))
        if missing and "iteration" not in ckpt:
            logger.info("%d model tensors not in the file keep their initialisation: %s", len(missing), _short(missing))
        return ckpt

    def _check_backbone_file(self, state: dict, prefix: str, path: str, key: str, strict: bool) -> None:
        """Raise (``strict``) or warn unless ``state`` holds exactly the stem and stage tensors of the network."""
        net = unwrap(self.model)
        for part in prefix.strip(".").split("."):
            net = getattr(net, part, None) if part else net
        if net is None or not hasattr(net, "stage_names"):
            return
        parts = [net.stem] + [net.get_stage(n) for n in net.stage_names]
        ids = {id(t) for m in parts for t in list(m.parameters()) + list(m.buffers())}
        tensors = net.state_dict(keep_vars=True)
        stage_keys = {k for k, t in tensors.items() if id(t) in ids and not k.endswith("num_batches_tracked")}
        head_keys = set(tensors) - stage_keys  # the classifier: free to differ or be absent
        missing = sorted(k for k in stage_keys if k not in state)
        wrong = sorted(k for k, v in state.items() if k in stage_keys and tuple(v.shape) != tuple(tensors[k].shape))
        unknown = sorted(k for k in state if k not in stage_keys and k not in head_keys
                         and not k.endswith("num_batches_tracked"))
        if not (missing or wrong or unknown):
            return
        problems = "; ".join(f"{what} {len(keys)}: {_short(keys, 3)}" for what, keys in (
            ("missing", missing), ("of another shape", wrong), ("unknown to the network", unknown)) if keys)
        msg = (f"{key}: {path} does not fit the backbone {type(net).__name__} ({len(stage_keys)} stem/stage tensors): "
               f"{problems}")
        if strict:
            raise WrnDetError(msg + "; set MODEL.WRN.STRICT_WEIGHTS False to load what fits")
        logger.warning(msg)

    def resume(self, path: str) -> dict:
        """Load the model, optimizer, scheduler and grad scaler states of checkpoint ``path``; returns it."""
        ckpt = self.load_weights(path, key="--resume")
        for key, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("grad_scaler", self.grad_scaler)):
            if obj is not None and key in ckpt:
                obj.load_state_dict(ckpt[key])
        return ckpt


def _short(keys: List[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Return SGD over the trainable parameters with detectron2's groups.

    Normalisation parameters get ``SOLVER.WEIGHT_DECAY_NORM``, biases ``BASE_LR *
    BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS`` (default: ``WEIGHT_DECAY``).
    """
    s = cfg.SOLVER
    wd_bias = s.WEIGHT_DECAY if s.WEIGHT_DECAY_BIAS is None else s.WEIGHT_DECAY_BIAS
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
            elif name == "bias":
                lr, wd = s.BASE_LR * s.BIAS_LR_FACTOR, wd_bias
            groups.setdefault((lr, wd), []).append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameter (check MODEL.BACKBONE.FREEZE_AT)")
    return torch.optim.SGD([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                           lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)


def build_scheduler(cfg, optimizer) -> LRMultiplier:
    """Return the per-iteration learning-rate scheduler of ``SOLVER.LR_SCHEDULER_NAME`` with warm-up."""
    s = cfg.SOLVER
    mult = build_lr_multiplier(s.LR_SCHEDULER_NAME, s.MAX_ITER, s.STEPS, s.GAMMA, warmup_iters=s.WARMUP_ITERS,
                               warmup_factor=s.WARMUP_FACTOR, warmup_method=s.WARMUP_METHOD,
                               cosine_end=s.BASE_LR_END / s.BASE_LR if s.BASE_LR else 0.0)
    return LRMultiplier(optimizer, mult, s.MAX_ITER)


def _clip_gradients(cfg, params: List[torch.nn.Parameter]) -> None:
    c = cfg.SOLVER.CLIP_GRADIENTS
    if not c.ENABLED:
        return
    grads = [p for p in params if p.grad is not None]
    if c.CLIP_TYPE == "value":
        torch.nn.utils.clip_grad_value_(grads, c.CLIP_VALUE)
    elif c.CLIP_TYPE == "norm":  # as detectron2: each parameter on its own
        for p in grads:
            torch.nn.utils.clip_grad_norm_([p], c.CLIP_VALUE, c.NORM_TYPE)
    elif c.CLIP_TYPE == "full_model":
        torch.nn.utils.clip_grad_norm_(grads, c.CLIP_VALUE, c.NORM_TYPE)
    else:
        raise ConfigError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be value, norm or full_model, got {c.CLIP_TYPE!r}")


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


def build_evaluator(cfg, dataset_name: str, output_dir: str):
    """Return the evaluator of the configured detector for one test dataset.

    A ``ProposalNetwork`` gets a :class:`~wrn_det.detection.proposal_eval.ProposalEvaluator`
    (proposal recall, and the proposal file ``box_proposals.pkl``); the detectors a
    :class:`~wrn_det.detection.evaluation.COCOEvaluator` (box AP).
    """
    if cfg.MODEL.META_ARCHITECTURE == "ProposalNetwork":
        from .proposal_eval import ProposalEvaluator

        return ProposalEvaluator(dataset_name, output_dir)
    return COCOEvaluator(dataset_name, output_dir, cfg.TEST.COCO_EVAL_BACKEND)


def test(cfg, model: nn.Module, iteration: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Evaluate ``model`` on every dataset of ``DATASETS.TEST``.

    Returns ``{"bbox": {...}}`` for one dataset, ``{dataset: {"bbox": {...}}}`` for several
    (on rank 0; empty dicts elsewhere); a ProposalNetwork gives ``"box_proposals"`` in place
    of ``"bbox"``. Results files (``coco_instances_results.json``, or the proposal file
    ``box_proposals.pkl``) go to ``OUTPUT_DIR/inference``, ``OUTPUT_DIR/inference/<dataset>``
    with several datasets.
    """
    results = OrderedDict()
    proposal_files = _proposal_files(cfg, "TEST")
    for i, name in enumerate(cfg.DATASETS.TEST):
        files = [proposal_files[i]] if proposal_files is not None else None
        dicts = get_detection_dataset_dicts([name], filter_empty=False, proposal_files=files,
                                            proposal_key="DATASETS.PROPOSAL_FILES_TEST")
        loader = build_detection_test_loader(cfg, dicts)
        out_dir = os.path.join(cfg.OUTPUT_DIR, "inference") if len(cfg.DATASETS.TEST) == 1 else \
            os.path.join(cfg.OUTPUT_DIR, "inference", name)
        results[name] = inference_on_dataset(unwrap(model), loader, build_evaluator(cfg, name, out_dir))
    if len(results) == 1:
        return next(iter(results.values()))
    return results


def _fmt_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class Trainer:
    """Iteration-based training of a detector built from ``cfg``; ``train(resume)`` runs it.

    Everything is built in ``__init__`` (model, datasets, optimizer, scheduler), so a
    bad config or a missing dataset fails before the first iteration.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world = comm.get_rank(), comm.get_world_size()
        self.model = build_detector(cfg)
        self.device = self.model.device
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        logger.info("model %s with %s backbone %s: %.2fM parameters (%.2fM trainable) on %s",
                    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.NAME, cfg.MODEL.WRN.NAME,
                    n_all / 1e6, n_train / 1e6, self.device)
        self.train_dicts = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                                                       proposal_files=_proposal_files(cfg, "TRAIN"))
        # the test proposal files are read after training: check now that they are there
        for f in _proposal_files(cfg, "TEST") or []:
            if not os.path.isfile(f):
                raise WrnDetError(f"DATASETS.PROPOSAL_FILES_TEST: proposal file {f} not found")
        logger.info("training on %d images of %s", len(self.train_dicts), ", ".join(cfg.DATASETS.TRAIN))
        self.amp = bool(cfg.SOLVER.AMP.ENABLED)
        if self.amp and self.device.type != "cuda":
            logger.warning("SOLVER.AMP.ENABLED works on CUDA only; training in float32 on %s", self.device)
            self.amp = False
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.checkpointer = Checkpointer(self.model, cfg.OUTPUT_DIR, self.optimizer, self.scheduler, self.grad_scaler)
        self.checkpointer.extra_state = {"metadata": checkpoint_metadata(cfg)}
        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        self.last_checkpoint: Optional[str] = None

    def resume_or_load(self, resume: bool) -> int:
        """Return the first iteration to run: after ``last_checkpoint`` with ``resume``, else 0 (loading MODEL.WEIGHTS)."""
        path = read_last_checkpoint(self.cfg.OUTPUT_DIR) if resume else None
        if path is None:
            if resume:
                logger.info("--resume: no checkpoint in %s; starting from the beginning", self.cfg.OUTPUT_DIR)
            if self.cfg.MODEL.WEIGHTS:
                self.checkpointer.load_weights(self.cfg.MODEL.WEIGHTS, strict=self.cfg.MODEL.WRN.STRICT_WEIGHTS)
            self.data_seed = self.cfg.SEED if self.cfg.SEED >= 0 else comm.shared_random_seed()
            self._rng = None
            return 0
        ckpt = self.checkpointer.resume(path)
        self.last_checkpoint = path
        self.data_seed = int(ckpt.get("data_seed", max(self.cfg.SEED, 0)))
        states = ckpt.get("rng_states") or []
        self._rng = states[self.rank] if len(states) == self.world else None
        logger.info("resuming from %s at iteration %d", path, ckpt["iteration"] + 1)
        return int(ckpt["iteration"]) + 1

    def train(self, resume: bool = False) -> Dict:
        """Run training to ``SOLVER.MAX_ITER`` and the final evaluation; returns the evaluation results."""
        cfg = self.cfg
        start_iter = self.resume_or_load(resume)
        model = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        loader = build_detection_train_loader(cfg, self.train_dicts, self.data_seed, start_iter)
        if self._rng is not None:
            # last, so that nothing built above draws from the restored generators
            set_rng_states(self._rng)
        writer = MetricsWriter(cfg.OUTPUT_DIR)
        results = {}
        try:
            if start_iter < self.max_iter:
                self._loop(model, iter(loader), start_iter, writer)
            results = test(cfg, model) if cfg.DATASETS.TEST else {}
            if results and comm.is_main_process():
                writer.write(flatten_results(results), step=self.max_iter - 1)
        finally:
            writer.close()
        return results

    def _loop(self, model: nn.Module, data: iter, start_iter: int, writer: MetricsWriter) -> None:
        cfg = self.cfg
        window: Dict[str, deque] = {}
        period = int(cfg.SOLVER.CHECKPOINT_PERIOD)
        eval_period = int(cfg.TEST.EVAL_PERIOD)
        logger.info("starting training from iteration %d", start_iter)
        model.train()
        t_start = time.perf_counter()
        for it in range(start_iter, self.max_iter):
            t0 = time.perf_counter()
            batch = next(data)
            data_time = time.perf_counter() - t0
            with torch.autocast("cuda", enabled=self.amp):
                loss_dict = model(batch)
            losses = sum(loss_dict.values())
            reduced = comm.reduce_dict({k: v.detach() for k, v in loss_dict.items()})
            total = float(sum(reduced.values()))
            if not math.isfinite(total):
                values = ", ".join(f"{k}={float(v):.4g}" for k, v in reduced.items())
                where = self.last_checkpoint or "none (no checkpoint was written before it)"
                raise WrnDetError(f"loss became non-finite at iteration {it} ({values}); training stopped, "
                                  f"the last good checkpoint is {where}")
            self.optimizer.zero_grad(set_to_none=True)
            if self.grad_scaler is not None:
                self.grad_scaler.scale(losses).backward()
                self.grad_scaler.unscale_(self.optimizer)
                _clip_gradients(cfg, self.params)
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                losses.backward()
                _clip_gradients(cfg, self.params)
                self.optimizer.step()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_time = time.perf_counter() - t0
            for k, v in list(reduced.items()) + [("total_loss", total), ("time", step_time), ("data_time", data_time)]:
                window.setdefault(k, deque(maxlen=LOG_PERIOD)).append(float(v))
            nxt = it + 1
            if nxt % LOG_PERIOD == 0 or nxt == self.max_iter or it == start_iter:
                self._log(it, lr, window, writer, time.perf_counter() - t_start, nxt - start_iter)
            if period > 0 and nxt % period == 0 and nxt != self.max_iter:
                self.last_checkpoint = self.checkpointer.save(f"model_{it:07d}", it, self.data_seed) or self.last_checkpoint
            if eval_period > 0 and nxt % eval_period == 0 and nxt != self.max_iter and cfg.DATASETS.TEST:
                res = test(cfg, model)
                if comm.is_main_process():
                    writer.write(flatten_results(res), step=it)
                model.train()
        self.last_checkpoint = self.checkpointer.save("model_final", self.max_iter - 1, self.data_seed) or self.last_checkpoint

    def _log(self, it: int, lr: float, window: Dict[str, deque], writer: MetricsWriter, elapsed: float, done: int):
        med = {k: sorted(v)[len(v) // 2] for k, v in window.items()}
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
    """Return the frozen config of ``args`` (file + overrides); creates OUTPUT_DIR, its config.yaml and the logger."""
    cfg = load_config(get_det_cfg(), args.config_file, args.opts)
    rank = comm.get_rank()
    if comm.is_main_process() and cfg.OUTPUT_DIR:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    comm.synchronize()
    setup_logger(cfg.OUTPUT_DIR, rank)
    logger.info("rank %d of %d; command-line overrides: %s", rank, comm.get_world_size(), " ".join(args.opts or []))
    if comm.is_main_process():
        path = save_config(cfg, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
        logger.info("full config saved to %s", path)
    seed = seed_all(cfg.SEED + rank if cfg.SEED >= 0 else -1)
    logger.info("using seed %d for this process", seed)
    if cfg.CUDNN_BENCHMARK:
        torch.backends.cudnn.benchmark = True
    return cfg


def main(args) -> Dict:
    """Train (or, with ``--eval-only``, evaluate) as configured by ``args``; returns the evaluation results."""
    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS:
            raise ConfigError("--eval-only needs the weights to evaluate: set MODEL.WEIGHTS path/to/model_final.pth")
        if not cfg.DATASETS.TEST:
            raise ConfigError("--eval-only needs DATASETS.TEST")
        model = build_detector(cfg)
        Checkpointer(model).load_weights(cfg.MODEL.WEIGHTS, strict=cfg.MODEL.WRN.STRICT_WEIGHTS)
        return test(cfg, model)
    return Trainer(cfg).train(resume=args.resume)
