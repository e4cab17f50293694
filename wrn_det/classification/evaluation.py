"""Test-set evaluation: loss and top-1 / top-5 error over all processes."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wrn_det.engine import comm

__all__ = ["evaluate", "accuracy_counts"]


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, k: int = 5):
    """Return ``(top1_correct, topk_correct)`` counts for a batch as 0-d tensors.

    ``k`` is clipped to the number of classes, so top-5 of a 2-class problem is top-2.
    """
    k = min(k, logits.shape[1])
    hit = logits.topk(k, dim=1).indices == labels[:, None]
    return hit[:, 0].sum(), hit.any(dim=1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader, normalizer: nn.Module, device, autocast=None) -> dict:
    """Evaluate ``model`` on every image of ``loader`` (each rank its shard) and reduce over ranks.

    Returns ``{"loss", "top1_err", "top5_err", "images"}``: mean cross-entropy, errors
    in percent, and the number of images evaluated over all ranks. The model is left
    in evaluation mode.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    ctx = autocast if autocast is not None else contextlib.nullcontext
    for images, labels in loader:
        images = normalizer(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        with ctx():
            logits = model(images)
        logits = logits.float()
        top1, top5 = accuracy_counts(logits, labels)
        sums += torch.stack([
            F.cross_entropy(logits, labels, reduction="sum").double(), top1.double(), top5.double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
        ])
    if comm.get_world_size() > 1:
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1_err": 100.0 * (1 - top1 / n), "top5_err": 100.0 * (1 - top5 / n), "images": int(n)}
