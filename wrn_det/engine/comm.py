"""Small helpers over torch.distributed that also work in a single process."""
import os

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

_LOCAL_RANK = None


def is_dist() -> bool:
    """Return True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Return the number of processes in the job (1 without torch.distributed)."""
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    """Return this process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if is_dist() else 0


def set_local_rank(rank: int) -> None:
    """Record this process's rank within its machine (called by ``launch``)."""
    global _LOCAL_RANK
    _LOCAL_RANK = int(rank)


def get_local_rank() -> int:
    """Return this process's rank within its machine (0 without torch.distributed)."""
    if _LOCAL_RANK is not None:
        return _LOCAL_RANK
    return int(os.environ.get("LOCAL_RANK", 0)) if is_dist() else 0


def is_main_process() -> bool:
    """Return True on global rank 0."""
    return get_rank() == 0


def synchronize() -> None:
    """Block until every process reaches this point (no-op in a single process)."""
    if is_dist() and get_world_size() > 1:
        if dist.get_backend() == "nccl" and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather(obj) -> list:
    """Return the list of ``obj`` from every rank, in rank order (``[obj]`` in one process)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(obj, dst: int = 0) -> list:
    """Return the list of ``obj`` from every rank on rank ``dst`` and an empty list elsewhere."""
    if get_world_size() == 1:
        return [obj]
    # all_gather_object works on both gloo and nccl without a separate gather path
    out = all_gather(obj)
    return out if get_rank() == dst else []


def reduce_dict(values: dict, average: bool = True) -> dict:
    """Return ``values`` (scalar tensors) summed or averaged over ranks, with the same keys."""
    world = get_world_size()
    if world == 1:
        return dict(values)
    with torch.no_grad():
        names = sorted(values.keys())
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world
        return {k: v for k, v in zip(names, stacked)}


def shared_random_seed() -> int:
    """Return a random integer that is the same on every rank (drawn on each, rank 0's kept)."""
    seed = int(np.random.randint(2**31))
    return all_gather(seed)[0]


def local_batch_size(global_batch: int, world_size: int, key: str = "SOLVER.IMS_PER_BATCH") -> int:
    """Return ``global_batch // world_size``; raises ConfigError unless it divides evenly."""
    if global_batch <= 0 or global_batch % world_size:
        raise ConfigError(f"{key} ({global_batch}) must be a positive multiple of the number of processes ({world_size})")
    return global_batch // world_size
