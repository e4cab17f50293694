"""Process launch in detectron2's style: one process, ``--num-gpus N`` spawning, or torchrun.

torch is imported when a job is launched, not with this module: ``wrn_det.engine`` exports
:func:`launch` and stays cheap to import for the tools that never launch anything.
"""
import logging
import os
import socket
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import Preempted, WrnDetError

if TYPE_CHECKING:
    import torch

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def launched_by_torchrun() -> bool:
    """Return True when the process was started by torchrun (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _env_store(rank: int, world: int, timeout):
    """Return the key-value store of an env:// job (torchrun's agent store, or one rank 0 hosts), keyed per attempt.

    torchrun keeps its store across the restarts of a worker group; the process group's
    keys (each rank's address) would then still hold the dead group's, and the restarted
    workers would try to reach them. A prefix with ``TORCHELASTIC_RESTART_COUNT`` gives each
    attempt its own keys.
    """
    import torch.distributed as dist

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(f"wrn_det/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def launch(main_func, num_gpus_per_machine: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args=(), timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in one process, under torchrun, or in spawned processes.

    Under torchrun the process group is joined from the environment. Otherwise, with
    ``num_machines * num_gpus_per_machine > 1``, this spawns ``num_gpus_per_machine``
    processes on this machine (NCCL on GPUs, gloo on CPUs). Returns what ``main_func``
    returns in a single process, else None.
    """
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from . import comm

    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend=_backend(), store=_env_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout)
        comm.set_local_rank(local_rank)
        try:
            return main_func(*args)
        finally:
            dist.destroy_process_group()

    if not 0 <= machine_rank < num_machines:
        raise WrnDetError(f"--machine-rank {machine_rank} must be below --num-machines {num_machines}")
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise WrnDetError(
            f"--num-gpus {num_gpus_per_machine} asks for more GPUs than the {torch.cuda.device_count()} visible here"
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise WrnDetError("--dist-url auto works on one machine only; give tcp://HOST:PORT of machine 0")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    # when one process stops on bad input the others are terminated; the one error line says why
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    ctx = mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as e:
        # the failing worker already printed its one-line error
        raise SystemExit(e.exit_code if e.exit_code and e.exit_code > 0 else 1) from None
    return None


def _worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout):
    import torch
    import torch.distributed as dist

    from . import comm

    global_rank = machine_rank * num_gpus_per_machine + local_rank
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=_backend(), init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout)
    comm.set_local_rank(local_rank)
    try:
        main_func(*args)
    except WrnDetError as e:
        if global_rank == 0:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as e:
        sys.exit(e.exit_code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def create_ddp_model(model: "torch.nn.Module", device: "torch.device") -> "torch.nn.Module":
    """Return ``model`` wrapped in DistributedDataParallel when several processes run, else ``model``.

    Both trainers wrap this way: one device per process (none on the CPU), buffers not
    broadcast (BatchNorm statistics stay each process's, or synchronised by the norm layer).
    """
    from . import comm

    if comm.get_world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)
