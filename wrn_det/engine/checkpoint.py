"""Training-state checkpoints, shared by both trainers (what they hold: :mod:`wrn_det.engine.training`).

:class:`TrainingCheckpointer` writes a run's checkpoints: every process's random-number
states gathered to rank 0, one atomic file per checkpoint, ``last_checkpoint`` naming
the newest, the oldest pruned beyond ``keep``. :func:`load_checkpoint` reads any torch
file the project is given with ``torch.load(weights_only=True)`` and turns every way
that can fail into one line naming the file.
"""
import logging
import os
import pickle
import random
import re
import warnings
import zipfile
from typing import Optional

import numpy as np
import torch

from . import comm
from .errors import WrnDetError
from .fileio import atomic_save, write_text

__all__ = ["LAST_CHECKPOINT", "TrainingCheckpointer", "load_checkpoint", "verify_checkpoint", "read_last_checkpoint",
           "write_last_checkpoint", "get_rng_states", "set_rng_states"]

LAST_CHECKPOINT = "last_checkpoint"

logger = logging.getLogger("wrn_det")


def _torch_load_error(path: str, e: BaseException) -> WrnDetError:
    """Return the one-line error for a file ``torch.load(weights_only=True)`` refused or could not parse."""
    text = " ".join(str(e).split())
    glob = re.search(r"unsupported GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    where = f"checkpoint file {path} cannot be read as a torch checkpoint"
    if glob:
        return WrnDetError(f"{where}: refused to load global {glob.group(1)} (a checkpoint may hold only tensors, "
                           "numbers, strings and plain containers); nothing from it was run")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" and not zipfile.is_zipfile(path):
        return WrnDetError(f"{where}: it is a plain pickle, not a file written by torch.save (detectron2 .pkl "
                           "weights are read by --engine detectron2)")
    if not zipfile.is_zipfile(path):
        return WrnDetError(f"{where}: not a file written by torch.save")
    return WrnDetError(f"{where} of tensors ({type(e).__name__}: {text[:200]}); it may be truncated or corrupt")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Return the object stored at ``path``, read with ``torch.load(weights_only=True)``.

    Raises :class:`WrnDetError` with one line if the file is missing, truncated, not a
    torch file, or holds anything but tensors and plain containers (then naming the
    refused global; nothing from the file runs).
    """
    if not path or not os.path.isfile(path):
        raise WrnDetError(f"checkpoint file {path!r} does not exist")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it then refuses; the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _torch_load_error(path, e) from None
    except OSError as e:  # torch.load on a truncated archive fails while seeking in it
        raise WrnDetError(f"checkpoint file {path} cannot be read as a torch checkpoint: {e.strerror or e}; it may be "
                          "truncated or corrupt") from None


def verify_checkpoint(path: str) -> Optional[str]:
    """Return what is wrong with the torch checkpoint at ``path`` (truncated, corrupt), or None when it is intact.

    A ``torch.save`` file is a zip archive whose records carry CRC-32 checksums; every
    record is read and checked (about a second per GB), without unpickling anything.
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete torch archive: {type(e).__name__}: {' '.join(str(e).split())[:80]}"
    return None if bad is None else f"record {bad} fails its checksum"


def write_last_checkpoint(output_dir: str, filename: str) -> None:
    """Record ``filename`` (relative to ``output_dir``) in ``output_dir/last_checkpoint``, atomically."""
    write_text(os.path.join(output_dir, LAST_CHECKPOINT), os.path.basename(filename))


def read_last_checkpoint(output_dir: str) -> Optional[str]:
    """Return the full path named by ``output_dir/last_checkpoint``, or None if there is no ``last_checkpoint``.

    Raises :class:`WrnDetError` when it names a file that is not there: continuing would
    start the run over and replace the results already in the folder.
    """
    path = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        name = f.read().strip()
    full = os.path.join(output_dir, name)
    if not name or os.path.sep in name or not os.path.isfile(full):
        raise WrnDetError(f"{path} names the checkpoint {name!r}, which is not in {output_dir}; restore it, or "
                          "remove last_checkpoint to start the run afresh")
    return full


def get_rng_states() -> dict:
    """Return the states of Python's, NumPy's and torch's generators as tensors and plain values.

    The result survives ``torch.load(weights_only=True)``, unlike the raw NumPy state.
    """
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore generator states returned by :func:`get_rng_states`."""
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


class TrainingCheckpointer:
    """The checkpoints of one run folder: what ``--resume`` continues from.

    ``save(name, state)`` is called by every process: their random-number states are
    gathered into ``state["rng_states"]`` (one per rank, with ``"world_size"``), rank 0
    writes ``<output_dir>/<name>.pth`` atomically, points ``last_checkpoint`` at it, and
    removes the oldest periodic checkpoints (``<prefix><number>.pth``) beyond the newest
    ``keep`` (0 keeps all). Every file loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, output_dir: str, prefix: str = "model_", keep: int = 0):
        self.output_dir = output_dir
        self.prefix = prefix
        self.keep = int(keep)

    def save(self, name: str, state: dict) -> Optional[str]:
        """Write the checkpoint ``name``; returns its path on rank 0 and None elsewhere."""
        rng = comm.all_gather(get_rng_states())  # every process takes part; only rank 0 writes
        if not comm.is_main_process():
            return None
        state = dict(state, rng_states=rng, world_size=comm.get_world_size())
        path = atomic_save(state, os.path.join(self.output_dir, f"{name}.pth"))
        write_last_checkpoint(self.output_dir, path)
        if self.keep > 0:
            pattern = re.compile(re.escape(self.prefix) + r"\d+(_\d+)?\.pth")
            periodic = sorted(f for f in os.listdir(self.output_dir) if pattern.fullmatch(f))
            for f in periodic[:-self.keep]:
                os.remove(os.path.join(self.output_dir, f))
        return path

    def latest(self) -> Optional[str]:
        """Return the checkpoint ``last_checkpoint`` names, or None when the run has none."""
        return read_last_checkpoint(self.output_dir)

    def latest_intact(self) -> Optional[str]:
        """Return the newest intact checkpoint to resume from, or None when the run has none.

        The one ``last_checkpoint`` names is verified first (:func:`verify_checkpoint`); if it
        is truncated or corrupt (a node died while writing it, a disk failed) the run's other
        checkpoints are tried, newest first, with a warning naming the broken file. Raises
        :class:`WrnDetError` when none is intact.
        """
        named = self.latest()
        if named is None:
            return None
        pattern = re.compile(re.escape(self.prefix) + r"\d+(_\d+)?\.pth")
        others = [os.path.join(self.output_dir, f) for f in os.listdir(self.output_dir) if pattern.fullmatch(f)]
        others = sorted((p for p in others if os.path.abspath(p) != os.path.abspath(named)),
                        key=os.path.getmtime, reverse=True)
        broken = []
        for path in [named] + others:
            problem = verify_checkpoint(path)
            if problem is None:
                if broken:
                    logger.warning("resuming from %s, the newest intact checkpoint", path)
                return path
            logger.warning("checkpoint %s is broken (%s); trying an older one", path, problem)
            broken.append(os.path.basename(path))
        raise WrnDetError(f"--resume: no intact checkpoint in {self.output_dir} ({', '.join(broken)} "
                          "broken); remove last_checkpoint to start the run afresh")

    @staticmethod
    def restore_rng(state: dict) -> bool:
        """Restore this process's random-number states from ``state``; returns False when the world size changed."""
        states = state.get("rng_states") or []
        if len(states) != comm.get_world_size():
            return False
        set_rng_states(states[comm.get_rank()])
        return True
