#!/usr/bin/env python
"""Print parameters, multiply-accumulates and feature shapes of a model.

    python tools/model_info.py wrn_28_10 [--num-classes N] [--input-size S] [--json]
    python tools/model_info.py [--all]        # table of every name in list_models()

GMACs are billions of multiply-accumulates for one image, counted by fvcore
(convolutions and Linear layers as MACs; BatchNorm and pooling add well under
1%). The input size defaults to 32 for the CIFAR family and 224 for the
ImageNet family.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

# Usable from a plain checkout, without installing the package.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from wrn_det.models import build_model, count_parameters, list_models  # noqa: E402


def count_gmacs(model: torch.nn.Module, input_size: int) -> float:
    """Return billions of multiply-accumulates of ``model`` for one 3 x S x S image."""
    was_training = model.training
    model.eval()
    # fvcore warns about ops it does not count (ReLU, additions, pooling: not
    # multiply-accumulates) and its import about torch.jit deprecations, which
    # say nothing about the model; keep the output to the figures.
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, torch.zeros(1, 3, input_size, input_size))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
    model.train(was_training)
    return total / 1e9


def model_info(name: str, num_classes: Optional[int] = None, input_size: Optional[int] = None,
               features: bool = True) -> dict:
    """Return a dict: name, family, num_classes, input_size, params, gmacs, features.

    ``features`` maps each stage name to its channels, stride and the
    (channels, height, width) shape it has for the input size; with
    ``features=False`` that entry is left out (saves one forward pass).
    """
    model = build_model(name, num_classes=num_classes).eval()
    size = input_size or model.default_input_size
    info = {
        "name": name,
        "family": model.family,
        "num_classes": model.num_classes,
        "input_size": size,
        "params": count_parameters(model),
        "gmacs": round(count_gmacs(model, size), 4),
    }
    if features:
        with torch.no_grad():
            feats = model.forward_features(torch.zeros(1, 3, size, size))
        specs = model.output_shape()
        info["features"] = {
            k: {"channels": specs[k].channels, "stride": specs[k].stride, "shape": list(v.shape[1:])}
            for k, v in feats.items()
        }
    return info


def _print_info(info: dict) -> None:
    print(f"{info['name']}  ({info['family']} family, {info['num_classes']} classes, "
          f"input {info['input_size']}x{info['input_size']})")
    print(f"  params: {info['params']:,}")
    print(f"  GMACs:  {info['gmacs']:.3f}")
    print("  features:")
    for k, f in info["features"].items():
        shape = "x".join(str(d) for d in f["shape"])
        print(f"    {k:<8} channels {f['channels']:>5}  stride {f['stride']:>3}  shape {shape}")


def _print_table(names) -> None:
    print(f"{'model':<20} {'input':>5} {'params':>14} {'GMACs':>9}")
    for name in names:
        info = model_info(name, features=False)
        print(f"{name:<20} {info['input_size']:>5} {info['params']:>14,} {info['gmacs']:>9.3f}", flush=True)


@torch.no_grad()  # counting needs no autograd; as a decorator it leaves the caller's grad mode as it was
def main(argv=None) -> int:
    """Run the command line; return the exit status (0, or 2 for bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="model name; omit (or use --all) for a table of all models")
    parser.add_argument("--all", action="store_true", help="print a table of every name in list_models()")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: family's)")
    parser.add_argument("--input-size", type=int, default=None, help="square input side in pixels")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    if args.all or args.name is None:
        _print_table(list_models())
        return 0
    if args.input_size is not None and args.input_size < 1:
        print(f"error: --input-size must be a positive integer, got {args.input_size}", file=sys.stderr)
        return 2
    try:
        info = model_info(args.name, args.num_classes, args.input_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # Typically an input too small for the network's pooling.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: model {args.name!r} cannot run on a {args.input_size}x{args.input_size} input: {first}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        _print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
