"""What the benchmark scripts share: alternating timed runs, medians, and the RESULT lines.

Every script times the sides it compares in turns (A B A B ...), so that load from other
processes on the machine falls on all of them, keeps the median of each side, and ends
with one line per goal::

    RESULT <name> <measured> goal <goal> met|not met
"""
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["sync", "timed", "alternate", "result", "median"]


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device="cpu") -> float:
    """Return the seconds ``fn()`` takes, device work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def alternate(sides: Dict[str, Callable[[int], float]], rounds: int, warmup: bool = True) -> Dict[str, List[float]]:
    """Run ``sides[name](round)`` for every side in turn, ``rounds`` times; return each side's measurements.

    Each callable returns its own measurement (seconds, or seconds per image). With
    ``warmup`` every side runs once first, unrecorded (allocator, kernels, lazy set-up).
    """
    if warmup:
        for fn in sides.values():
            fn(-1)
    out: Dict[str, List[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            out[name].append(fn(r))
    return out


def median(values: Sequence[float]) -> float:
    """Return the median of ``values`` (NaN when empty)."""
    return statistics.median(values) if values else float("nan")


def result(name: str, measured: Optional[float], goal: float, higher_is_better: bool = True, unit: str = "x",
           note: str = "") -> str:
    """Print and return ``RESULT <name> <measured> goal <goal> met|not met`` (``not measured`` without a value)."""
    g = f"{'>=' if higher_is_better else '<='}{goal:g}{unit}"
    if measured is None or measured != measured:
        line = f"RESULT {name} none goal {g} not met (not measured{': ' + note if note else ''})"
    else:
        met = measured >= goal if higher_is_better else measured <= goal
        line = f"RESULT {name} {measured:.3g}{unit} goal {g} {'met' if met else 'not met'}" + (f" ({note})" if note else "")
    print(line, flush=True)
    return line
