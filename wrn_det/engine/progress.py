"""The terminal progress bar of both trainers (training epochs, inference over a test set).

A tqdm bar is shown only where someone watches: on rank 0, when stderr is a terminal. While
it is shown, the project's log lines are written above it rather than through it.
"""
import contextlib
import logging
import sys
from typing import Iterator, Optional

from . import comm

__all__ = ["progress_bar", "progress"]


def progress_bar(total: int, desc: str, unit: str = "it"):
    """Return a tqdm bar over ``total`` steps when rank 0 writes to a terminal, else None."""
    if comm.is_main_process() and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return None


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str = "it", logger_name: str = "wrn_det") -> Iterator[Optional[object]]:
    """Yield :func:`progress_bar`'s bar (or None), with the logger ``logger_name`` redirected above it; closes it."""
    bar = progress_bar(total, desc, unit)
    if bar is None:
        yield None
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm([logging.getLogger(logger_name)]):
            yield bar
    finally:
        bar.close()
