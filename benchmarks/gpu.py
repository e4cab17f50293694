"""Classification training speed on one GPU: fp32, bf16 autocast, channels_last, torch.compile, CUDA graphs, fused SGD.

``--model wrn_28_10`` (default): CIFAR-shaped data (50,000 uint8 images of 3x32x32)
lives on the GPU and is fed by the project's in-memory loader (batched reflection-padded
random crop and flip), as the classification trainer does; the step is the paper's: SGD
with Nesterov momentum 0.9 and weight decay 5e-4, cross-entropy, batch 128.
``--model wide_resnet50_2``: ImageNet-shaped batches (3x224x224, ``--batch`` 256 by
default, the config's per-GPU batch) already on the GPU, the ImageNet recipe's SGD
(Nesterov, weight decay 1e-4); it gives the step rate the ImageNet data path has to feed
(``benchmarks/imagenet_data.py --gpu-rate``).

For each variant it prints, as soon as it is measured, images per second, seconds per 50k-image
epoch, and the share of the card's bf16 dense peak that the step reaches (a table row and a
``RESULT gpu_<model>_<variant>`` line), counting 3 forward passes per
training step and 2 FLOPs per multiply-accumulate of ``tools/model_info.py``. Variants
(``--variants``, in order; compilation counts as warm-up and is reported apart):

* ``fp32``, ``bf16``, ``bf16-cl`` (bf16 autocast + channels_last);
* ``bf16-cl-fused``: the same with the fused (single-kernel) SGD step;
* ``compile``: + ``torch.compile`` (default mode) and fused SGD;
* ``compile-ro``: ``mode="reduce-overhead"`` (CUDA graphs) and fused SGD;
* ``compile-ma``: ``mode="max-autotune"`` (Triton/cuBLAS autotuning and CUDA graphs) and fused SGD.

``--time-budget`` seconds: variants that would start after it are skipped (and say so),
so a prepared GPU session stays within its limit.

Goal (WRN-28-10): a 50k-image epoch in at most 4 s on an H100/H200 (about 40% of the bf16 peak).

    python benchmarks/gpu.py [--model wrn_28_10] [--batch 128] [--steps 150] [--variants fp32,bf16,...]
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_utils import result, sync  # noqa: E402

from wrn_det.data.classification import ArraySet  # noqa: E402
from wrn_det.data.cls_loader import InMemoryLoader  # noqa: E402
from wrn_det.models import build_model  # noqa: E402

CIFAR_MEAN = [125.3, 123.0, 113.9]
CIFAR_STD = [63.0, 62.1, 66.7]
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]
EPOCH_IMAGES = 50_000
GOAL_EPOCH_S = 4.0
# name: (bf16 autocast, channels_last, compile mode or None, fused SGD)
VARIANTS = {
    "fp32": (False, False, None, False),
    "bf16": (True, False, None, False),
    "bf16-cl": (True, True, None, False),
    "bf16-cl-fused": (True, True, None, True),
    "compile": (True, True, "default", True),
    "compile-ro": (True, True, "reduce-overhead", True),
    "compile-ma": (True, True, "max-autotune", True),
}
LABELS = {"fp32": "fp32 (cuDNN TF32 default)", "bf16": "bf16 autocast", "bf16-cl": "bf16 + channels_last",
          "bf16-cl-fused": "bf16 + channels_last + fused SGD", "compile": "+ torch.compile (default), fused SGD",
          "compile-ro": "+ compile reduce-overhead (CUDA graphs)", "compile-ma": "+ compile max-autotune"}


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


def model_gmacs(name: str, size: int) -> float:
    """Return the billions of multiply-accumulates of one ``size`` x ``size`` image, counted by fvcore."""
    from fvcore.nn import FlopCountAnalysis

    m = build_model(name, num_classes=10 if size == 32 else 1000).eval()
    fca = FlopCountAnalysis(m, torch.zeros(1, 3, size, size))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca.total() / 1e9


def batches_cifar(data, batch, device):
    """Yield augmented CIFAR batches forever from the project's in-memory loader."""
    loader = InMemoryLoader(data, batch, device, train=True, seed=0)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def batches_imagenet(batch, device, size=224, pool=4):
    """Yield ImageNet-shaped uint8 batches (already on the GPU) and labels forever, from a small pool."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device) for _ in range(pool)]
    ys = [torch.randint(0, 1000, (batch,), generator=g).to(device) for _ in range(pool)]
    i = 0
    while True:
        yield xs[i % pool], ys[i % pool]
        i += 1


def run_variant(name, variant, batches, batch, mean, std, steps, warmup, device, imagenet: bool):
    """Train ``steps`` timed steps after ``warmup`` and return (images per second, warm-up seconds)."""
    amp, channels_last, mode, fused = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model(name, num_classes=1000 if imagenet else 10).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    wd = 1e-4 if imagenet else 5e-4
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd,
                          **({"fused": True} if fused else {}))
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    net = torch.compile(model, mode=mode) if mode else model

    graphs = mode in ("reduce-overhead", "max-autotune")

    def step():
        if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        x, y = next(batches)
        x = ((x.float() - mean) / std).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    dt = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in variant {variant}")
    return steps * batch / dt, warm_s


def main() -> int:
    """Print the table and the RESULT lines; returns 0 (1 without a GPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="wrn_28_10", help="wrn_28_10 (CIFAR data) or wide_resnet50_2 (ImageNet shapes)")
    p.add_argument("--batch", type=int, default=0, help="default: 128 (CIFAR), 256 (ImageNet)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v],
                   default=["fp32", "bf16", "bf16-cl", "bf16-cl-fused", "compile", "compile-ro", "compile-ma"])
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; later variants are skipped (0: none)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak of the card (default: known cards)")
    p.add_argument("--skip-compile", action="store_true", help="leave out the compiled variants")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script (no peak, tiny runs)")
    a = p.parse_args()
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if a.skip_compile:
        a.variants = [v for v in a.variants if VARIANTS[v][2] is None]
    imagenet = a.model != "wrn_28_10" and not a.model.startswith("wrn_")
    batch = a.batch or (256 if imagenet else 128)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none is visible", file=sys.stderr)
        if not imagenet:
            result(f"gpu_{a.model}_epoch_s", None, GOAL_EPOCH_S, higher_is_better=False, unit="s", note="no CUDA GPU")
        return 1
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    size = 224 if imagenet else 32
    if imagenet:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        make_batches = lambda: batches_imagenet(batch, device)  # noqa: E731
    else:
        g = torch.Generator().manual_seed(0)
        data = ArraySet(torch.randint(0, 256, (EPOCH_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (EPOCH_IMAGES,), generator=g), [str(i) for i in range(10)], "random")
        mean, std = CIFAR_MEAN, CIFAR_STD
        make_batches = lambda: batches_cifar(data, batch, device)  # noqa: E731
    gmacs = model_gmacs(a.model, size)
    flops_per_image = 3 * 2 * gmacs * 1e9
    peak = a.peak_tflops or (bf16_peak_tflops(device) if device.type == "cuda" else 0.0)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (script check only)"
    print(f"{card}, torch {torch.__version__}, {a.model} ({gmacs:.3f} GMACs/image), "
          f"batch {batch}, {a.steps} timed steps; bf16 peak {peak:.0f} TFLOPS")
    print(f"{'variant':<42}{'img/s':>9}{'s/epoch':>9}{'TFLOPS':>8}{'% peak':>8}{'warm-up s':>10}")
    best, best_ips = None, 0.0
    for v in a.variants:
        if a.time_budget and time.perf_counter() - start > a.time_budget:
            print(f"{LABELS[v]:<42} skipped: --time-budget {a.time_budget:.0f} s reached")
            continue
        try:
            ips, warm = run_variant(a.model, v, make_batches(), batch, mean, std, a.steps, a.warmup, device, imagenet)
        except Exception as e:  # a variant this torch/card cannot run (e.g. no Triton) must not end the table
            print(f"{LABELS[v]:<42} failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            continue
        tflops = ips * flops_per_image / 1e12
        share = f"{100 * tflops / peak:.1f}" if peak else "n/a"
        print(f"{LABELS[v]:<42}{ips:>9.0f}{EPOCH_IMAGES / ips:>9.2f}{tflops:>8.1f}{share:>8}{warm:>10.1f}", flush=True)
        # each variant's line now, so that a time limit cutting the table short loses none of those done
        print(f"RESULT gpu_{a.model}_{v} {ips:.0f} img/s, {EPOCH_IMAGES / ips:.2f} s per 50k images, {share}% of "
              f"bf16 peak, warm-up {warm:.1f} s (no goal)", flush=True)
        if ips > best_ips:
            best, best_ips = v, ips
        if VARIANTS[v][2]:
            torch._dynamo.reset()  # the next compiled variant starts from scratch
    if best is None:
        if not imagenet:
            result(f"gpu_{a.model}_epoch_s", None, GOAL_EPOCH_S, higher_is_better=False, unit="s", note="no variant ran")
        return 0
    print(f"best variant: {LABELS[best]}, {best_ips:.0f} images/s")
    print(f"GPU_STEP_RATE {a.model} {best_ips:.0f}")
    if imagenet:
        print(f"(the ImageNet data path must feed this: benchmarks/imagenet_data.py --gpu-rate {best_ips:.0f})")
    else:
        result(f"gpu_{a.model}_epoch_s", EPOCH_IMAGES / best_ips, GOAL_EPOCH_S, higher_is_better=False, unit="s",
               note=f"{LABELS[best]}, {100 * best_ips * flops_per_image / 1e12 / peak:.1f}% of bf16 peak" if peak else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
