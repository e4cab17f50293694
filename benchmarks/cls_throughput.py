"""Classification training throughput: our data path and trainer step against the usual CIFAR code.

Both sides train the same network from the same initial weights on the same
CIFAR-10-format files (synthetic images written as the real pickle batches), with
the same batch size and number of steps:

* ours: ``wrn_det.classification.ClsTrainer`` for one epoch: the set held in memory
  as one uint8 tensor, random crop (4-pixel reflection padding) and flip done for the
  whole batch at once, normalisation on the device, the paper's SGD step;
* reference: torchvision's ``CIFAR10`` reader with PIL transforms (RandomCrop(32,
  padding=4, padding_mode='reflect'), RandomHorizontalFlip, ToTensor, Normalize), a
  ``DataLoader`` with 2 workers, and a plain training step (same SGD settings).

The runs alternate (reference, ours, reference, ours) and the best of each is kept, so
load from other processes hits both alike. Prints images per second and the ratio,
then the same for the data path alone (one epoch of augmented, normalised batches
and no model), which is where the two differ. Goal: ours at least 1.5 times the
reference in training on this CPU.

    python benchmarks/cls_throughput.py [--cases wrn_16_4:64:6,wrn_28_10:8:4] [--repeats 2]
"""
import argparse
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_utils import result  # noqa: E402

GOAL = 1.5


def write_data(root: str, n_train: int) -> None:
    """Write a CIFAR-10-format set of ``n_train`` training images (and 100 test images) under ``root``."""
    from wrn_det.data.cls_synthetic import write_synthetic_cifar

    write_synthetic_cifar(root, n_train=n_train, n_test=100, seed=0)


def ours(root: str, model: str, batch: int, steps: int, out_dir: str) -> float:
    """Return images per second of one epoch (``steps`` batches) of the project's trainer."""
    from wrn_det.classification.config import get_cls_cfg
    from wrn_det.classification.trainer import ClsTrainer
    from wrn_det.engine.config import load_config

    cfg = load_config(get_cls_cfg(), None, [
        "OUTPUT_DIR", out_dir, "MODEL.NAME", model, "MODEL.DEVICE", "cpu", "DATASETS.ROOT", root,
        "DATASETS.VERIFY_CHECKSUMS", "False", "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.EPOCHS", "1",
        "SOLVER.STEPS", "()", "TEST.IMS_PER_BATCH", "100", "LOG_PERIOD", str(steps), "SEED", "0",
    ])
    trainer = ClsTrainer(cfg)
    if len(trainer.train_loader) != steps:
        raise RuntimeError(f"expected {steps} steps, the trainer has {len(trainer.train_loader)}")
    stats = trainer.train_one_epoch(1)
    return steps * batch / stats["seconds"]


def reference(root: str, model: str, batch: int, steps: int) -> float:
    """Return images per second of ``steps`` batches of the usual torchvision + DataLoader CIFAR loop."""
    from wrn_det.models import build_model

    torch.manual_seed(0)
    loader = reference_loader(root, batch)
    net = build_model(model, num_classes=10).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    start = time.perf_counter()
    n = 0
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += y.numel()
    return n / (time.perf_counter() - start)


def reference_loader(root: str, batch: int):
    """Return the usual CIFAR-10 DataLoader: torchvision reader, PIL transforms, 2 workers."""
    from torchvision import datasets
    from torchvision import transforms as T

    from wrn_det.data.classification import _no_md5

    mean = [125.3 / 255, 123.0 / 255, 113.9 / 255]
    std = [63.0 / 255, 62.1 / 255, 66.7 / 255]
    tf = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(mean, std)])
    # the files are generated, so the official MD5 sums cannot match: the same reader without them
    ds = _no_md5(datasets.CIFAR10)(root, train=True, transform=tf, download=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)


def data_only(root: str, batch: int) -> tuple:
    """Return (reference, ours) images per second of one epoch of augmented, normalised batches, no model."""
    from wrn_det.data.classification import read_cifar
    from wrn_det.data.cls_loader import InMemoryLoader
    from wrn_det.data.cls_preprocess import Normalizer

    start = time.perf_counter()
    n = sum(y.numel() for _, y in reference_loader(root, batch))
    ref = n / (time.perf_counter() - start)
    start = time.perf_counter()
    data = read_cifar(root, "cifar10", True, False, False)
    loader = InMemoryLoader(data, batch, "cpu", train=True, seed=0)
    norm = Normalizer([125.3, 123.0, 113.9], [63.0, 62.1, 66.7], 3)
    n = 0
    for x, y in loader:
        norm(x)
        n += y.numel()
    return ref, n / (time.perf_counter() - start)


def main() -> int:
    """Print the table and the goal line; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="wrn_16_4:64:6,wrn_28_10:8:4",
                   help="comma-separated MODEL:BATCH:STEPS")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-images", type=int, default=10000, help="images of the data-path-only measurement")
    a = p.parse_args()
    logging.getLogger("wrn_det").setLevel(logging.WARNING)
    cases = [(m, int(b), int(s)) for m, b, s in (c.split(":") for c in a.cases.split(","))]
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; best of {a.repeats} alternating runs")
    print(f"{'model':<12}{'batch':>6}{'steps':>6}{'reference img/s':>17}{'ours img/s':>12}{'ratio':>7}")
    ratios = []
    with tempfile.TemporaryDirectory() as d:
        for model, batch, steps in cases:
            root = os.path.join(d, f"{model}_{batch}_{steps}")
            write_data(root, batch * steps)
            ref_best = our_best = 0.0
            for r in range(a.repeats):
                ref_best = max(ref_best, reference(root, model, batch, steps))
                our_best = max(our_best, ours(root, model, batch, steps, os.path.join(d, f"out{r}")))
            ratio = our_best / ref_best
            ratios.append(ratio)
            print(f"{model:<12}{batch:>6}{steps:>6}{ref_best:>17.1f}{our_best:>12.1f}{ratio:>7.2f}", flush=True)
        root = os.path.join(d, "data_only")
        write_data(root, a.data_images)
        ref_best = our_best = 0.0
        for _ in range(a.repeats):
            ref, our = data_only(root, 128)
            ref_best, our_best = max(ref_best, ref), max(our_best, our)
    data_ratio = our_best / ref_best
    print(f"data path alone ({a.data_images} images, batch 128, crop + flip + normalise, no model): "
          f"reference {ref_best:.0f} img/s, ours {our_best:.0f} img/s, ratio {data_ratio:.1f}")
    for (model, batch, _), ratio in zip(cases, ratios):
        result(f"cls_train_ours_over_reference_{model}_b{batch}", ratio, GOAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
