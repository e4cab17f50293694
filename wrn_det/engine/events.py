"""Logging to the terminal and ``log.txt``, and metrics to ``metrics.json`` and the experiment trackers.

``metrics.json`` holds one JSON object per line: strict JSON (NaN and infinities are
written as null, see :func:`json_value`), read back by :func:`read_metrics` alone.
"""
import json
import logging
import os
import sys
from collections import deque
from typing import Callable, Dict, List, Optional, Sequence

from . import comm
from .errors import WrnDetError
from .fileio import atomic_write, json_value


class _Buffer(logging.Handler):
    """Holds the records logged before the run folder exists, to be replayed into its log.txt."""

    def __init__(self, capacity: int = 10000):
        super().__init__()
        self.records = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _StdoutHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stdout`` is when a record comes, not the one at set-up
    (a notebook, a test's capture or a redirect may replace it, and close the old one, in between)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # the stream is always the current sys.stdout
        pass


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
        sh = _StdoutHandler()
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


def _metrics_file(path: str) -> str:
    return os.path.join(path, "metrics.json") if os.path.isdir(path) else path


def _object_lines(path: str, prefix: Optional[str] = None):
    """Yield ``(line, object)`` for every JSON line of ``path``: each line, or with ``prefix``, what follows ``prefix``.

    Lines without ``prefix`` and blank lines are passed over, and so is a last line cut short (no
    newline at its end and no JSON object: the run stopped while writing it), with a warning.
    Raises :class:`WrnDetError` naming the file and line for any other line that is not one JSON object.
    """
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            text = line
            if prefix is not None:
                at = text.find(prefix)
                if at < 0:
                    continue
                text = text[at + len(prefix):]
            text = text.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
                why = "" if isinstance(row, dict) else f"it is {type(row).__name__}"
            except ValueError as e:
                why = getattr(e, "msg", str(e))
            if why:
                if not line.endswith("\n"):
                    logging.getLogger("wrn_det").warning("%s, line %d: the last line is cut short (%s); passed over",
                                                         path, n, why)
                    return
                raise WrnDetError(f"{path}, line {n}: not a JSON object ({why}); expected one JSON object per line")
            yield line, row


def read_json_lines(path: str, prefix: Optional[str] = None) -> List[dict]:
    """Return the JSON objects of the lines of ``path`` (with ``prefix``: of the lines holding it, after it), in file order.

    Raises :class:`WrnDetError` naming the file and line for a line that is not a JSON object.
    """
    return [row for _, row in _object_lines(path, prefix)]


def read_metrics(path: str) -> List[dict]:
    """Return the rows of a ``metrics.json`` (the file, or the run folder holding it), in file order.

    A resumed run appends to the file, so a step may appear twice; the later row is the
    newer. Raises :class:`WrnDetError` for a missing file or a line that is not a JSON object.
    """
    path = _metrics_file(path)
    if not os.path.isfile(path):
        raise WrnDetError(f"{path} not found: expected a run folder or its metrics.json")
    return read_json_lines(path)


def trim_metrics(path: str, keep: Callable[[dict], bool]) -> int:
    """Rewrite a ``metrics.json`` (the file, or the run folder holding it) with only the rows ``keep`` accepts.

    The kept lines stay as they were written; the file is replaced atomically and only when
    a row goes. A missing file is left missing. Returns the number of rows dropped.
    """
    path = _metrics_file(path)
    if not os.path.isfile(path):
        return 0
    lines = list(_object_lines(path))
    kept = [line if line.endswith("\n") else line + "\n" for line, row in lines if keep(row)]
    if len(kept) != len(lines):
        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(kept)

        atomic_write(path, write)
    return len(lines) - len(kept)


def _drop_cut_last_line(path: str) -> None:
    """Remove a last line cut short (no newline at its end) from ``path``, atomically, so rows appended
    after it start on a line of their own; returns None. A missing or empty file is left as it is."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
    except FileNotFoundError:
        return
    keep = data[: data.rfind(b"\n") + 1]
    logging.getLogger("wrn_det").warning("%s: its last line was cut short (%d bytes); removed before appending",
                                         path, len(data) - len(keep))

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(keep)

    atomic_write(path, write)


class MetricsWriter:
    """Append metrics as JSON lines to ``output_dir/metrics.json`` and pass their numbers to the run's trackers.

    ``loggers`` (the ``LOGGERS`` key) names the trackers (:mod:`wrn_det.engine.trackers`):
    ``"tensorboard"`` (the default), ``"mlflow"``, ``"wandb"``; ``config`` becomes their params
    and ``resume`` continues their runs of a resumed run. Values go through :func:`json_value`
    (NaN and infinities become null and reach no tracker). Only rank 0 writes; on other ranks
    every call is a no-op. An existing ``metrics.json`` is appended to, so a resumed run
    continues its file.
    """

    def __init__(self, output_dir: str, loggers: Sequence[str] = ("tensorboard",), config=None, resume: bool = False):
        self.enabled = comm.is_main_process() and bool(output_dir)
        self.trackers = []
        self._file = None
        if not self.enabled:
            return
        from .trackers import open_trackers

        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.json")
        _drop_cut_last_line(path)
        self._file = open(path, "a")
        try:
            self.trackers = open_trackers(loggers, output_dir, config, resume)
        except BaseException:
            self._file.close()
            raise

    def write(self, metrics: dict, step: int) -> None:
        """Write one JSON object holding ``metrics`` and ``iteration``/step; its numbers (but the
        ``iteration``) also go to the trackers at ``step``."""
        if not self.enabled:
            return
        row = {k: json_value(v) for k, v in metrics.items()}
        row.setdefault("iteration", step)
        self._file.write(json.dumps(row, sort_keys=False, allow_nan=False) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        if numbers:
            for t in self.trackers:
                t.log_metrics(numbers, step)

    def write_images(self, images: Dict[str, str], step: int) -> None:
        """Pass pictures ``{name: PNG path}`` (the evaluation's) to the trackers that take images (W&B)."""
        if self.enabled and images:
            for t in self.trackers:
                t.log_images(images, step)

    def write_final_checkpoint(self, path: str) -> None:
        """Record the path of the run's final checkpoint in the trackers (MLflow tag, W&B summary)."""
        if self.enabled and path:
            for t in self.trackers:
                t.log_final_checkpoint(path)

    def close(self, status: str = "finished") -> None:
        """Flush and close the file, and end the trackers' runs with ``status`` (``"finished"``,
        ``"failed"``, ``"preempted"``)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(status)
            except Exception as e:  # one tracker failing to close must not hide the run's own outcome
                logging.getLogger("wrn_det").warning("%s: closing its run failed: %s", t.name, e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close("finished" if exc_type is None else "failed")
