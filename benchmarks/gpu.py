"""WRN-28-10 training speed on one GPU: fp32, bf16 autocast, channels_last, torch.compile.

CIFAR-shaped data (50,000 uint8 images of 3x32x32) lives on the GPU and is fed by
the project's in-memory loader (batched reflection-padded random crop and flip), as
the classification trainer does; the step is the paper's: SGD with Nesterov momentum
0.9 and weight decay 5e-4, cross-entropy, batch 128. For each variant it prints
images per second, seconds per 50k-image epoch, and the share of the card's bf16
dense peak that the step reaches, counting 3 forward passes per training step and 2
FLOPs per multiply-accumulate of ``tools/model_info.py``. Finishes in a few minutes.

    python benchmarks/gpu.py [--batch 128] [--steps 150] [--peak-tflops 989]
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wrn_det.data.classification import ArraySet  # noqa: E402
from wrn_det.data.cls_loader import InMemoryLoader  # noqa: E402
from wrn_det.models import build_model  # noqa: E402

CIFAR_MEAN = [125.3, 123.0, 113.9]
CIFAR_STD = [63.0, 62.1, 66.7]
EPOCH_IMAGES = 50_000
GOAL_EPOCH_S = 10.0


def bf16_peak_tflops(device: torch.device) -> float:
    """Return the dense bf16 tensor-core peak of known cards in TFLOPS (0 if unknown).

    H100 SXM and H200: 989.4; H100 PCIe: 756.5 (told apart by their SM counts, 132 and 114).
    """
    props = torch.cuda.get_device_properties(device)
    name = props.name
    if "H200" in name:
        return 989.4
    if "H100" in name:
        return 989.4 if props.multi_processor_count >= 132 else 756.5
    if "A100" in name:
        return 312.0
    return 0.0


def model_gmacs(name: str) -> float:
    """Return the billions of multiply-accumulates of one 32x32 image, counted by fvcore."""
    from fvcore.nn import FlopCountAnalysis

    m = build_model(name, num_classes=10).eval()
    fca = FlopCountAnalysis(m, torch.zeros(1, 3, 32, 32))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca.total() / 1e9


def run_variant(name, data, batch, steps, warmup, amp, channels_last, compile_model, device):
    """Train ``steps`` timed steps after ``warmup`` and return (images per second, compile seconds)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    net = torch.compile(model) if compile_model else model
    loader = InMemoryLoader(data, batch, device, train=True, seed=0)

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = batches()

    def step():
        x, y = next(it)
        x = ((x.float() - mean) / std).contiguous(memory_format=fmt)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in variant amp={amp} channels_last={channels_last} compile={compile_model}")
    return steps * batch / dt, warm_s


def main() -> int:
    """Print the table and the goal line; returns 0 (1 without a GPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="wrn_28_10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak of the card (default: known cards)")
    p.add_argument("--skip-compile", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    data = ArraySet(torch.randint(0, 256, (EPOCH_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (EPOCH_IMAGES,), generator=g), [str(i) for i in range(10)], "random")
    gmacs = model_gmacs(a.model)
    flops_per_image = 3 * 2 * gmacs * 1e9
    peak = a.peak_tflops or bf16_peak_tflops(device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {a.model} ({gmacs:.3f} GMACs/image), "
          f"batch {a.batch}, {a.steps} timed steps; bf16 peak {peak:.0f} TFLOPS")
    print(f"{'variant':<34}{'img/s':>9}{'s/epoch':>9}{'TFLOPS':>8}{'% peak':>8}{'warm-up s':>10}")
    variants = [("fp32 (cuDNN TF32 default)", False, False, False), ("bf16 autocast", True, False, False),
                ("bf16 + channels_last", True, True, False)]
    if not a.skip_compile:
        variants.append(("bf16 + channels_last + compile", True, True, True))
    best = None
    for label, amp, cl, comp in variants:
        ips, warm = run_variant(a.model, data, a.batch, a.steps, a.warmup, amp, cl, comp, device)
        tflops = ips * flops_per_image / 1e12
        share = f"{100 * tflops / peak:.1f}" if peak else "n/a"
        epoch_s = EPOCH_IMAGES / ips
        print(f"{label:<34}{ips:>9.0f}{epoch_s:>9.2f}{tflops:>8.1f}{share:>8}{warm:>10.1f}", flush=True)
        best = epoch_s if best is None else min(best, epoch_s)
    print(f"goal: {a.model} 50k-image epoch, best variant: measured {best:.2f} s, goal <= {GOAL_EPOCH_S:.0f} s, "
          f"{'met' if best <= GOAL_EPOCH_S else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
