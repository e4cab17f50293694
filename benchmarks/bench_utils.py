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


def photo_like_image(height: int, width: int, rng):
    """Return an (H, W, 3) uint8 image with the statistics of a photo: smooth gradients, shapes, textured noise.

    ``rng``: a ``numpy.random.Generator``. Encoded as JPEG at quality 90 a 640x480 image
    takes about the 160 KB of an average COCO image.
    """
    import cv2
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, phase = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * x / width * 6 + b * y / height * 6 + phase * 3)
    for _ in range(int(rng.integers(8, 16))):
        color = rng.uniform(0, 255, 3).tolist()
        cx, cy = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        r = int(rng.uniform(10, min(height, width) / 3))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, color, -1)
        else:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r // 2), color, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
    for scale, amp in ((1, 30), (4, 14), (16, 10)):  # texture at several scales, as in natural images
        n = rng.normal(0, amp, (height // scale + 1, width // scale + 1, 3)).astype(np.float32)
        img += cv2.resize(n, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_photo_jpegs(folder: str, sizes, seed: int = 0, quality: int = 90) -> list:
    """Write one photo-like JPEG per ``(height, width)`` of ``sizes`` into ``folder``; return their paths."""
    import os

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = os.path.join(folder, f"{i:06d}.jpg")
        ok, buf = cv2.imencode(".jpg", photo_like_image(h, w, rng), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"could not encode {path}")
        with open(path, "wb") as f:
            f.write(buf.tobytes())
        paths.append(path)
    return paths
