"""Preemption and elastic restarts, shared by both trainers.

Clusters stop long jobs: SLURM sends SIGTERM (or, with ``--signal``, SIGUSR1) some time
before the kill, torchrun restarts a failed worker group. :class:`PreemptionWatch` turns the
signals named by ``PREEMPT_SIGNALS`` into a flag that every process reads at the end of
each training step (one reduction, so that all stop at the same iteration); the trainer
then writes a checkpoint at that iteration and raises :class:`Preempted`
(:meth:`wrn_det.engine.training.TrainerBase.stop_if_preempted`), which the command
line turns into one log line and exit status :data:`PREEMPTED_EXIT_CODE`. A second signal
while the checkpoint is written is only logged: the write is atomic either way.

:func:`resume_requested` makes a restarted torchrun worker group (``TORCHELASTIC_RESTART_COUNT``
above 0) continue from ``last_checkpoint`` as if ``--resume`` had been given.
"""
import logging
import os
import signal
import threading
from typing import Iterable

import torch
import torch.distributed as dist

from . import comm
from .errors import PREEMPTED_EXIT_CODE, ConfigError, Preempted

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "PreemptionWatch", "resume_requested"]

logger = logging.getLogger("wrn_det")

def _signal_numbers(names: Iterable[str]):
    out = []
    for name in names:
        sig = getattr(signal, str(name).upper(), None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"PREEMPT_SIGNALS: {name!r} is not a signal a process can catch; expected names such "
                              "as SIGTERM, SIGUSR1")
        out.append(sig)
    return out


class PreemptionWatch:
    """Catch the preemption signals of a run; :meth:`requested` says (on every rank alike) whether to stop now.

    Handlers are installed for the life of the object and the previous ones restored by
    :meth:`close`. Outside the main thread (where Python allows no handlers) it watches nothing.
    """

    def __init__(self, names: Iterable[str]):
        self.signals = _signal_numbers(names)
        self._flag = False
        self._saving = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._flag:
            logger.warning("%s again: already stopping%s", name, " (the checkpoint is being written)"
                           if self._saving else "")
            return
        self._flag = True
        logger.warning("%s received: stopping after this step with a checkpoint", name)

    def requested(self) -> bool:
        """Return True when any process caught a preemption signal (a collective call in a distributed run)."""
        if comm.get_world_size() > 1:
            flag = torch.tensor([1.0 if self._flag else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._flag = bool(flag.item())
        return self._flag

    def saving(self) -> "PreemptionWatch":
        """Mark the checkpoint write (a later signal is then only logged); use as a context manager."""
        self._saving = True
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._saving = False

    def close(self) -> None:
        """Restore the signal handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def resume_requested(resume: bool) -> bool:
    """Return ``resume``, or True in a worker group torchrun restarted (``TORCHELASTIC_RESTART_COUNT`` > 0)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts > 0 and not resume:
        logger.info("torchrun restarted this worker group (restart %d): resuming from the last checkpoint", restarts)
    return resume or restarts > 0
