"""Logging to the terminal and ``log.txt``, and metrics to ``metrics.json`` and TensorBoard."""
import json
import logging
import math
import os
import sys
from collections import deque
from typing import Optional

from . import comm


class _Buffer(logging.Handler):
    """Holds the records logged before the run folder exists, to be replayed into its log.txt."""

    def __init__(self, capacity: int = 10000):
        super().__init__()
        self.records = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _formatter() -> logging.Formatter:
    return logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S")


def setup_logger(output_dir: Optional[str] = None, distributed_rank: int = 0, name: str = "wrn_det") -> logging.Logger:
    """Return the logger ``name``, printing to stdout on rank 0 and writing to ``output_dir/log.txt``.

    Ranks other than 0 write ``log.txt.rankN``. Without ``output_dir`` the records are kept
    and written to the file when :func:`attach_log_file` names the folder. Calling it twice
    does not duplicate handlers.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if distributed_rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(_formatter())
        logger.addHandler(sh)
    if output_dir:
        attach_log_file(output_dir, distributed_rank, name)
    else:
        logger.addHandler(_Buffer())
    return logger


def attach_log_file(output_dir: str, distributed_rank: int = 0, name: str = "wrn_det") -> str:
    """Start writing the logger ``name`` to ``output_dir/log.txt`` (``log.txt.rankN``), first the records kept so far.

    Returns the log file's path.
    """
    logger = logging.getLogger(name)
    os.makedirs(output_dir, exist_ok=True)
    fname = "log.txt" if distributed_rank == 0 else f"log.txt.rank{distributed_rank}"
    path = os.path.join(output_dir, fname)
    fh = logging.FileHandler(path)
    fh.setFormatter(_formatter())
    for h in list(logger.handlers):
        if isinstance(h, _Buffer):
            for record in h.records:
                fh.handle(record)
            logger.removeHandler(h)
        elif isinstance(h, logging.FileHandler) and os.path.abspath(h.baseFilename) == os.path.abspath(path):
            logger.removeHandler(h)
            h.close()
    logger.addHandler(fh)
    return path


def _jsonable(v):
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Append metrics as JSON lines to ``output_dir/metrics.json`` and as scalars to TensorBoard.

    Only rank 0 writes; on other ranks every call is a no-op. An existing
    ``metrics.json`` is appended to, so a resumed run continues its file.
    """

    def __init__(self, output_dir: str, tensorboard: bool = True):
        self.enabled = comm.is_main_process() and bool(output_dir)
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(os.path.join(output_dir, "metrics.json"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=output_dir)

    def write(self, metrics: dict, step: int) -> None:
        """Write one JSON object holding ``metrics`` and ``iteration``/step; numbers also go to TensorBoard."""
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        row.setdefault("iteration", step)
        self._file.write(json.dumps(row, sort_keys=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
