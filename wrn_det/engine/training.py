"""One training state for both trainers: the checkpoint schema, resume, random states, preemption, the run.

Both trainers (detection's iterations, classification's epochs) derive from :class:`TrainerBase`
and keep only their own loop and evaluation. They share one face, as detectron2's trainers do::

    trainer = Trainer(cfg)              # builds and checks everything; writes nothing
    trainer.resume_or_load(resume)      # MODEL.WEIGHTS, or the newest intact checkpoint; returns the first iteration
    trainer.train()                     # -> the final results
    trainer.test()                      # -> evaluation results (with eval_only=True: the whole --eval-only run)

A training checkpoint (schema :data:`SCHEMA`) holds, for both tasks:

* ``schema`` (int), ``task`` (``"classification"`` or ``"detection"``);
* ``model``, ``optimizer``, ``grad_scaler`` (state dicts; the scaler's is empty when it is off);
* ``ema`` (the averaged weights, or None without ``MODEL_EMA``) and ``ema_updates``;
* ``iteration``: the last iteration done, counted from 0 (detectron2's meaning: training continues at
  ``iteration + 1``);
* ``seed``: the run's seed; the data stream is a function of it and the position;
* ``rng_states`` (one per process) and ``world_size``, added by
  :class:`~wrn_det.engine.checkpoint.TrainingCheckpointer`;
* the task's own keys: detection ``metadata`` (class names and ids, for ``wrn_det.Predictor``);
  classification ``config``, ``epoch``, ``batch`` and ``epoch_sums`` (inside an epoch a preemption
  stopped), ``best_top1_err`` and ``scheduler``.

Checkpoints written before the schema (no ``schema`` key) are read too (:func:`upgrade_checkpoint`).
"""
import contextlib
import logging
import math
from typing import Callable, Hashable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import comm
from .checkpoint import TrainingCheckpointer, load_checkpoint
from .ema import ModelEMA, restore_ema
from .errors import ConfigError, Preempted, WrnDetError
from .events import MetricsWriter
from .preempt import PreemptionWatch, resume_requested
from .seed import seed_all

__all__ = ["SCHEMA", "TASKS", "TrainerBase", "StepValues", "LogSync", "upgrade_checkpoint", "read_training_checkpoint",
           "rank_seed"]

logger = logging.getLogger("wrn_det")

#: The version of the checkpoint layout this code writes (the module docstring lists its keys).
SCHEMA = 1
TASKS = ("classification", "detection")


def rank_seed(seed: int, rank: int) -> int:
    """Return the seed of process ``rank``'s own random streams (dropout, augmentation on the main process)."""
    return int(seed) + 1_000_003 * int(rank)


def upgrade_checkpoint(ckpt: dict, path: str) -> dict:
    """Return the training checkpoint ``ckpt`` (read from ``path``) in the current schema.

    Checkpoints without a ``schema`` key were written before the two trainers shared one:
    detection's named the data seed ``data_seed`` and counted ``iteration`` from 0 as now;
    classification's named the gradient scaler ``scaler`` and its ``iteration`` was the number
    of iterations done. Raises :class:`WrnDetError` for a schema newer than this code's.
    """
    version = ckpt.get("schema", 0)
    if not isinstance(version, int) or version > SCHEMA:
        raise WrnDetError(f"--resume: {path} has checkpoint schema {version!r}; this wrn_det reads schemas up to "
                          f"{SCHEMA} (a newer wrn_det wrote it)")
    if version == SCHEMA:
        return ckpt
    ckpt = dict(ckpt)
    if "scaler" in ckpt or "epoch" in ckpt:  # the classification trainer's
        ckpt["task"] = "classification"
        ckpt["grad_scaler"] = ckpt.pop("scaler", None)
        if "iteration" in ckpt:
            ckpt["iteration"] = int(ckpt["iteration"]) - 1
    else:
        ckpt["task"] = "detection"
        ckpt["seed"] = ckpt.pop("data_seed", None)  # the first checkpoints had none
    ckpt["grad_scaler"] = ckpt.get("grad_scaler") or {}
    ckpt.setdefault("ema", None)
    ckpt.setdefault("ema_updates", 0)
    ckpt["schema"] = SCHEMA
    return ckpt


def read_training_checkpoint(path: str, task: str) -> dict:
    """Return the training checkpoint at ``path`` in the current schema, checked to be one of ``task``.

    Raises :class:`WrnDetError` with one line naming the file when it is unreadable, not a
    training checkpoint, or one of the other task.
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise WrnDetError(f"--resume: {path} is not a training checkpoint (it holds {type(ckpt).__name__})")
    missing = [k for k in ("model", "optimizer", "iteration") if k not in ckpt]
    if missing:
        raise WrnDetError(f"--resume: {path} is not a training checkpoint of this engine (it lacks {', '.join(missing)})")
    ckpt = upgrade_checkpoint(ckpt, path)
    if ckpt.get("task") != task:
        raise WrnDetError(f"--resume: {path} is a checkpoint of {ckpt.get('task')!r} training; this run is {task}")
    return ckpt


class LogSync(NamedTuple):
    """What a log step read on the host: the iterations since the previous one, their values, the preemption flag."""

    #: the labels the loop gave its iterations (``StepValues.add``), oldest first
    iterations: List[Hashable]
    #: one row per iteration: its values averaged over the processes, in ``StepValues.names`` order
    rows: List[List[float]]
    #: True when a preemption signal came to any process
    preempted: bool

    def first_non_finite(self) -> Optional[Tuple[Hashable, List[float]]]:
        """Return ``(iteration, values)`` of the first iteration with a NaN or infinite value, or None."""
        for it, row in zip(self.iterations, self.rows):
            if not all(math.isfinite(v) for v in row):
                return it, row
        return None


class StepValues:
    """The scalars of every training iteration (the losses), kept on the device until a log step reads them.

    ``add(iteration, values)`` keeps this iteration's 1-D tensor as it is, without waiting for
    the device. :meth:`collect`, at a log step, stacks the iterations since the previous one,
    averages them over the processes in one all-reduce that also carries each process's
    preemption flag, and reads the result on the host: the one wait for the device between
    log steps, after which every iteration's values are known (the non-finite check names the
    iteration a value went bad at, whichever it was).
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._iterations: List[Hashable] = []
        self._values: List[torch.Tensor] = []

    def __len__(self) -> int:
        """Return the number of iterations added since the last :meth:`collect`."""
        return len(self._values)

    def add(self, iteration: Hashable, values: torch.Tensor) -> None:
        """Keep ``values`` (1-D, in :attr:`names` order, on any device) of ``iteration``; nothing is read yet."""
        self._iterations.append(iteration)
        self._values.append(values.detach().reshape(-1).float())

    def collect(self, preempted: bool = False) -> LogSync:
        """Return the values since the last call, averaged over processes, and whether any process was preempted.

        ``preempted``: this process's flag. A collective call in a distributed run: every
        process calls it at the same iterations, with as many added.
        """
        its, values = self._iterations, self._values
        self._iterations, self._values = [], []
        world = comm.get_world_size()
        if not values and world == 1:
            return LogSync([], [], bool(preempted))
        k = len(self.names)
        device = values[0].device if values else torch.device("cpu")
        rows = torch.stack(values) if values else torch.zeros((0, k), device=device)
        # the flag is made on the device by a fill, not copied there from the host
        packed = torch.cat([rows.reshape(-1).double(), torch.full((1,), float(bool(preempted)), dtype=torch.float64,
                                                                  device=device)])
        if world > 1:
            if comm.is_dist() and torch.distributed.get_backend() == "nccl" and packed.device.type != "cuda":
                packed = packed.cuda()
            torch.distributed.all_reduce(packed)
        host = packed.tolist()
        flat, flag = host[:-1], host[-1]
        n = len(its)
        out = [[v / world for v in flat[i * k:(i + 1) * k]] for i in range(n)]
        return LogSync(list(its), out, flag > 0)


class TrainerBase:
    """What both trainers share around their loop: the training state, resume, preemption and the run.

    A subclass builds in ``__init__`` (after ``super().__init__``) ``model``, ``checkpointer``,
    and unless ``eval_only`` ``optimizer``, ``step`` (:class:`~wrn_det.engine.optim.OptimizerStep`)
    and ``ema`` (or None); it may set ``seed`` (else :meth:`resume_or_load` takes ``SEED``,
    drawing one when it is negative). It implements :meth:`load_weights` (``MODEL.WEIGHTS``),
    :meth:`restore_position`, :meth:`prepare_training`, :meth:`run_loop` and :meth:`test`.
    """

    #: ``"classification"`` or ``"detection"``: written into checkpoints, checked on resume.
    task: str = ""

    def __init__(self, cfg, eval_only: bool = False):
        self.cfg = cfg
        self.eval_only = bool(eval_only)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.model = self.optimizer = self.step = self.ema = None
        self.checkpointer: Optional[TrainingCheckpointer] = None
        self.seed: Optional[int] = None
        self.preempt: Optional[PreemptionWatch] = None
        self.last_checkpoint: Optional[str] = None  # the newest checkpoint of this run folder (rank 0)
        self.resumed_from: Optional[str] = None  # the checkpoint resume_or_load continued from
        self._start: Optional[int] = None
        self._rng: Optional[dict] = None

    # ------------------------------------------------------------------ to implement

    def load_weights(self, path: str) -> None:
        """Load ``MODEL.WEIGHTS`` into ``self.model`` for a run that does not resume."""
        raise NotImplementedError

    def restore_position(self, ckpt: dict) -> Tuple[int, str]:
        """Take the task's own keys of a resumed checkpoint; returns (first iteration, where in words)."""
        raise NotImplementedError

    def prepare_training(self, start: int) -> None:
        """Build what the loop needs to start at iteration ``start`` (before the random states are restored)."""

    def run_loop(self, start: int, writer: MetricsWriter):
        """Train from iteration ``start`` to the end, writing metrics to ``writer``; returns the final results."""
        raise NotImplementedError

    def test(self):
        """Evaluate the model on the test data; returns the results."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the face

    def resume_or_load(self, resume: bool = False) -> int:
        """Load what the run starts from; returns the first iteration to train (0 for a new run).

        With ``resume`` (or in a worker group torchrun restarted) the newest intact checkpoint of
        ``OUTPUT_DIR`` is restored: weights, optimizer, gradient scaler, EMA, seed, position, and
        the random states (put back by :meth:`train`). Otherwise ``MODEL.WEIGHTS`` is loaded
        when set (the EMA then starts from those weights). Called once, before ``OUTPUT_DIR`` is
        written to, so that a bad checkpoint stops the run first; later calls return the same.
        """
        if self._start is not None:
            return self._start
        resume = resume_requested(resume)
        path = self.checkpointer.latest_intact() if resume else None
        if path is None:
            if resume:
                logger.info("--resume: no checkpoint in %s; starting from the beginning", self.cfg.OUTPUT_DIR)
            weights = self.cfg.MODEL.WEIGHTS
            if self.eval_only and not weights:
                raise ConfigError("--eval-only needs the weights to evaluate: set MODEL.WEIGHTS (e.g. "
                                  "path/to/model_final.pth), or --resume with a checkpoint in OUTPUT_DIR")
            if weights:
                self.load_weights(weights)
                if self.ema is not None:  # the average starts from the loaded weights
                    self.ema = ModelEMA(self.model, self.ema.decay)
            if self.seed is None:
                self.seed = int(self.cfg.SEED) if self.cfg.SEED >= 0 else comm.shared_random_seed()
            self._start = 0
        else:
            self.resumed_from = self.last_checkpoint = path
            self._start = self.restore(read_training_checkpoint(path, self.task))
        return self._start

    def train(self):
        """Train from where :meth:`resume_or_load` put the run to its end; returns the final results."""
        if self.eval_only:
            raise WrnDetError("this trainer was built with eval_only=True, for test(); build it without to train")
        start = self.resume_or_load()
        self.prepare_training(start)
        self.restore_random_states()  # last, so that nothing built above draws from the restored generators
        with self.running() as writer:
            return self.run_loop(start, writer)

    # ------------------------------------------------------------------ the training state

    def restore(self, ckpt: dict) -> int:
        """Load a training checkpoint (current schema) into the trainer; returns the first iteration to train."""
        self.model.load_state_dict(ckpt["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.step is not None:
            self.step.load_state_dict(ckpt.get("grad_scaler") or {})
        self.ema = restore_ema(self.ema, ckpt, self.model)
        self.seed = int(ckpt["seed"]) if ckpt.get("seed") is not None else max(int(self.cfg.SEED), 0)
        self._rng = {"rng_states": ckpt.get("rng_states"), "world_size": ckpt.get("world_size")}
        start, where = self.restore_position(ckpt)
        logger.info("resuming from %s: continuing at %s", self.resumed_from, where)
        return start

    def restore_random_states(self) -> None:
        """Put back this process's random states from the resumed checkpoint (no-op for a new run).

        A run with another number of processes than the one that wrote the checkpoint cannot:
        its streams restart from the seed, with a warning.
        """
        rng, self._rng = self._rng, None
        if rng is None:
            return
        if not TrainingCheckpointer.restore_rng(rng):
            logger.warning("the checkpoint was written by %s processes, this run has %d: random streams restart",
                           rng.get("world_size"), self.world_size)
            seed_all(rank_seed(self.seed, self.rank))

    def checkpoint_state(self, iteration: int) -> dict:
        """Return the keys every training checkpoint has, after ``iteration`` (the last one done, from 0)."""
        return {
            "schema": SCHEMA,
            "task": self.task,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.step.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
            "iteration": int(iteration),
            "seed": int(self.seed),
        }

    def save_checkpoint(self, name: str, iteration: int, **task_keys) -> Optional[str]:
        """Write the checkpoint ``name`` after ``iteration`` with the task's own keys (every process calls it).

        Returns the run's newest checkpoint: the one just written on rank 0, the previous one's
        path (or None) elsewhere.
        """
        path = self.checkpointer.save(name, {**self.checkpoint_state(iteration), **task_keys})
        if path:
            self.last_checkpoint = path
            logger.info("saved checkpoint %s", path)
        return self.last_checkpoint

    # ------------------------------------------------------------------ the run

    @contextlib.contextmanager
    def running(self) -> Iterator[MetricsWriter]:
        """Watch the preemption signals (``PREEMPT_SIGNALS``) and open ``metrics.json``; yields the writer.

        Both are closed however the loop ends (preempted, failed, finished).
        """
        self.preempt = PreemptionWatch(self.cfg.PREEMPT_SIGNALS)
        writer = None
        try:
            writer = MetricsWriter(self.cfg.OUTPUT_DIR)
            yield writer
        finally:
            self.preempt.close()
            self.preempt = None
            if writer is not None:
                writer.close()

    def stop_if_preempted(self, iteration: int, save: Callable[[], Optional[str]],
                          agreed: Optional[bool] = None) -> None:
        """After ``iteration``: when the run is to stop for a preemption signal, ``save()`` and raise :class:`Preempted`.

        ``agreed``: the flag every process read at a log step (:meth:`StepValues.collect`).
        Without it a single process acts on its own flag, and a process of a distributed run
        does nothing (its peers cannot know: they learn of it at the next log step). ``save``
        returns the checkpoint written.
        """
        if self.preempt is None:
            return
        if agreed is None:
            if self.world_size > 1:
                return
            agreed = self.preempt.flag
        if not agreed:
            return
        with self.preempt.saving():
            path = save()
        stop = Preempted(iteration, path)
        logger.warning("%s", stop)
        raise stop

    def preempt_flag(self) -> bool:
        """Return this process's own preemption flag (False outside :meth:`running`)."""
        return self.preempt is not None and self.preempt.flag
