"""Preemption and elastic restarts, shared by both trainers.

Clusters stop long jobs: SLURM sends SIGTERM (or, with ``--signal``, SIGUSR1) some time
before the kill, torchrun restarts a failed worker group. :class:`PreemptionWatch` turns the
signals named by ``PREEMPT_SIGNALS`` into this process's flag. A single process acts on it at
the end of the step the signal came in. Processes of a distributed run must all stop at the
same iteration, so there the flags travel in the all-reduce that carries the logged losses
to the host at each log step (every ``LOG_PERIOD`` iterations, and at checkpoints): the run
stops at the first such step after the signal, at most ``LOG_PERIOD`` iterations later,
rather than paying a reduction and a wait for the GPU at every step. The trainer then writes
a checkpoint at that iteration and raises :class:`Preempted`
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
    """Catch the preemption signals of a run; :attr:`flag` says whether one came to this process.

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

    @property
    def flag(self) -> bool:
        """Return True once a preemption signal came to this process (no communication: see the module's text)."""
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
