"""Run set-up shared by ``tools/train_net.py`` (both engines) and ``tools/train_cls.py``.

Two steps, so that a run that fails its checks leaves nothing behind:

* :func:`setup_run`: console logging (kept for ``log.txt``), one line with the rank, torch
  version and command, the seed of this process, cuDNN benchmarking, TensorFloat-32;
* :func:`open_output_dir`: ``OUTPUT_DIR`` created (rank 0), ``log.txt`` started with
  everything logged so far, ``config.yaml`` written (rank 0).
"""
import logging
import os
import sys
from typing import Iterable

import torch

from . import comm
from .config import save_config
from .events import attach_log_file, setup_logger
from .fileio import check_output_dir
from .seed import seed_all

__all__ = ["setup_run", "open_output_dir", "set_tf32"]


def setup_run(cfg, logger_names: Iterable[str] = ("wrn_det",), seed_per_rank: bool = True) -> int:
    """Start logging and seed this process for the run ``cfg`` describes; returns the seed.

    ``cfg.SEED`` >= 0 seeds rank ``r`` with ``SEED + r`` (``seed_per_rank``) or ``SEED``;
    a negative seed draws one; ``cfg.CUDNN_BENCHMARK`` turns on cuDNN's algorithm search and
    ``cfg.ALLOW_TF32`` TensorFloat-32 (:func:`set_tf32`) (the keys of
    :func:`~wrn_det.engine.config.add_run_config`). ``OUTPUT_DIR`` is checked (a file in its way
    is an error) but not created.
    """
    check_output_dir(cfg.OUTPUT_DIR)
    rank, world = comm.get_rank(), comm.get_world_size()
    for name in logger_names:
        setup_logger(None, rank, name)
    log = logging.getLogger(next(iter(logger_names)))
    log.info("rank %d of %d, torch %s, command: %s", rank, world, torch.__version__, " ".join(sys.argv))
    base = int(cfg.SEED)
    seed = seed_all(base + rank if base >= 0 and seed_per_rank else base)
    log.info("using seed %d for this process", seed)
    if cfg.CUDNN_BENCHMARK:
        torch.backends.cudnn.benchmark = True
    set_tf32(cfg.get("ALLOW_TF32", True))
    return seed


def set_tf32(allow: bool) -> bool:
    """Let float32 matrix products and cuDNN convolutions use TensorFloat-32 (``allow``) or not; returns ``allow``.

    Only GPUs with TF32 units (Ampere and newer) are affected; elsewhere it changes nothing.
    """
    allow = bool(allow)
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    return allow


def open_output_dir(cfg, logger_names: Iterable[str] = ("wrn_det",)) -> str:
    """Create ``OUTPUT_DIR``, write its ``log.txt`` (from the first line logged) and ``config.yaml``; returns the folder.

    Rank 0 creates the folder and writes the config; every rank writes its own log file
    (``log.txt.rankN`` beside rank 0's ``log.txt``).
    """
    out = check_output_dir(cfg.OUTPUT_DIR)
    rank = comm.get_rank()
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    comm.synchronize()
    for name in logger_names:
        attach_log_file(out, rank, name)
    if rank == 0:
        path = save_config(cfg, os.path.join(out, "config.yaml"))
        logging.getLogger(next(iter(logger_names))).info("full config saved to %s", path)
    return out
