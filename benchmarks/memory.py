"""Peak memory of a training step with and without ``memory_efficient=True``.

Each variant runs in a fresh process so that one cannot inherit the other's
allocator high-water mark. On the CPU the figure is the process's peak resident
memory (``ru_maxrss``) during one SGD step, minus the resident memory just before
it (weights, gradients and momentum buffers already allocated);
on a GPU it is ``torch.cuda.max_memory_allocated`` over the step, minus the memory
allocated before it. The goal: the memory-efficient step needs at most half.

    python benchmarks/memory.py [--model wrn_28_10] [--batch 32] [--device cpu|cuda]
"""
import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_utils import result  # noqa: E402


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def measure(model_name: str, batch: int, memory_efficient: bool, device: str) -> dict:
    """Run one training step and return its peak memory above the memory held before it, in MiB."""
    import torch
    import torch.nn.functional as F

    from wrn_det.models import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(model_name, num_classes=10, memory_efficient=memory_efficient).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    # gradients and momentum buffers exist before the measured step, so what the step adds
    # is activations and temporaries; the step is the first, so no allocator cache hides them
    for prm in model.parameters():
        prm.grad = torch.zeros_like(prm)
        opt.state[prm]["momentum_buffer"] = torch.zeros_like(prm)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"before_mib": before / 2**20, "peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}
    before = max(_rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_mib": before / 1024, "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}


def main() -> int:
    """Print the table and the goal line; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="wrn_28_10")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--child", choices=["plain", "efficient"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.model, a.batch, a.child == "efficient", a.device)))
        return 0
    res = {}
    for variant in ("plain", "efficient"):
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--batch", str(a.batch),
                              "--device", a.device, "--child", variant], check=True, capture_output=True, text=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    unit = "peak RSS" if a.device == "cpu" else "max_memory_allocated"
    print(f"{a.model}, batch {a.batch}, one SGD training step on {a.device} ({unit}, MiB)")
    print(f"{'variant':<22}{'before step':>12}{'peak':>10}{'step adds':>11}")
    for v, name in (("plain", "plain"), ("efficient", "memory_efficient=True")):
        r = res[v]
        print(f"{name:<22}{r['before_mib']:>12.0f}{r['peak_mib']:>10.0f}{r['step_mib']:>11.0f}")
    ratio = res["efficient"]["step_mib"] / res["plain"]["step_mib"]
    total = res["efficient"]["peak_mib"] / res["plain"]["peak_mib"]
    print(f"ratio of whole-process peaks (efficient / plain): {total:.2f}")
    result(f"memory_efficient_over_plain_step_{a.device}", ratio, 0.5, higher_is_better=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
