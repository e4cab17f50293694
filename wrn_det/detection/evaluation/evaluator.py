"""Inference over a dataset feeding an evaluator, and the tables and flat keys of evaluation results.

An evaluator (COCO box AP, proposal recall) has ``reset()``, ``process(inputs, outputs)`` per
batch and ``evaluate()``, as detectron2's ``DatasetEvaluator``; :func:`inference_on_dataset`
drives one over a test loader and shows its progress.
"""
import logging
import time
from datetime import timedelta
from typing import Dict, List

import torch

from wrn_det.engine import comm
from wrn_det.engine.progress import progress

__all__ = ["inference_on_dataset", "num_images", "flatten_results", "format_table", "PROGRESS_LOG_SECONDS"]

logger = logging.getLogger("wrn_det")


def format_table(rows: List[List], headers: List[str]) -> str:
    """Return a Markdown pipe table of ``rows`` (numbers with 3 decimals), as detectron2 prints."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def num_images(loader) -> int:
    """Return how many images ``loader`` holds for this process: its sampler's ``num_images``
    (:class:`~wrn_det.data.det_loader.InferenceSampler`), else its length (one image per batch)."""
    count = getattr(getattr(loader, "batch_sampler", None), "num_images", None)
    return int(count) if count is not None else len(loader)


# without a terminal, inference logs its progress this often (seconds), as detectron2's inference loop does
PROGRESS_LOG_SECONDS = 5.0


def inference_on_dataset(model: torch.nn.Module, loader, evaluator) -> Dict[str, Dict[str, float]]:
    """Run ``model`` in eval mode over ``loader``, feed ``evaluator``; returns ``evaluator.evaluate()``.

    Progress: a tqdm bar with the ETA on a terminal, otherwise a log line every
    :data:`PROGRESS_LOG_SECONDS` (rank 0). The model's training mode is restored afterwards.
    """
    evaluator.reset()
    was_training = model.training
    model.eval()
    total = num_images(loader)
    n, t0 = 0, time.perf_counter()
    last_log = t0
    try:
        with torch.no_grad(), progress(total, f"inference on {evaluator.dataset_name}", unit="img") as bar:
            for inputs in loader:
                evaluator.process(inputs, model(inputs))
                n += len(inputs)
                if bar is not None:
                    bar.update(len(inputs))
                elif comm.is_main_process() and time.perf_counter() - last_log >= PROGRESS_LOG_SECONDS and n < total:
                    last_log = time.perf_counter()
                    per = (last_log - t0) / n
                    logger.info("inference on %s: %d/%d images, %.4f s / image, ETA %s", evaluator.dataset_name,
                                n, total, per, timedelta(seconds=int(per * (total - n))))
    finally:
        model.train(was_training)
    dt = time.perf_counter() - t0
    logger.info("inference on %d images of %s: %.1f s (%.4f s / image)", n, evaluator.dataset_name, dt, dt / max(n, 1))
    return evaluator.evaluate()


def flatten_results(results: Dict[str, Dict[str, float]], prefix: str = "") -> Dict[str, float]:
    """Return ``{"bbox/AP": ...}`` from ``{"bbox": {"AP": ...}}``, and ``{"<dataset>/bbox/AP": ...}``
    from ``{dataset: {"bbox": {...}}}`` (several test datasets)."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten_results(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
