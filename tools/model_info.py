#!/usr/bin/env python
"""Print parameters, multiply-accumulates and feature shapes of a model, or the size and speed of a detector.

    python tools/model_info.py wrn_28_10 [--num-classes N] [--input-size S] [--json]
    python tools/model_info.py [--all]        # table of every name in list_models()
    python tools/model_info.py --config-file wrn34_2_frcnn.yaml [--input-size H W] [--benchmark N] [KEY VALUE ...]

GMACs are billions of multiply-accumulates for one image, counted by fvcore
(convolutions and Linear layers as MACs; BatchNorm and pooling add well under
1%). The input size defaults to 32 for the CIFAR family and 224 for the
ImageNet family.

With ``--config-file`` the detector of the config is built and described: its parameters
(total, and trainable after ``MODEL.BACKBONE.FREEZE_AT``) and GFLOPs for one image of
``--input-size H W`` (default 800 x 1333), each split into backbone, FPN, RPN and RoI
heads (:mod:`wrn_det.detection.analysis`: fvcore's count, one multiply-add = one
flop, as detectron2's analyze_model); ``--benchmark N`` adds the median seconds per image
of N inference passes on the current device after warm-up (``MODEL.WEIGHTS`` loaded when set).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Optional

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from wrn_det.engine import ConfigError, cli_main, load_config, parse_args_with_overrides  # noqa: E402
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


def detector_info(config_file: str, opts, input_size=(800, 1333), benchmark: int = 0) -> dict:
    """Return a dict describing the detector of ``config_file`` (+ ``opts``): parameters and GFLOPs by part,
    the network input size and, with ``benchmark`` runs, the median inference seconds per image."""
    from wrn_det.detection.config import get_det_cfg
    from wrn_det.detection.weights import load_inference_weights
    from wrn_det.detection.analysis import (benchmark_inference, detector_gflops, detector_parameters,
                                                  network_input_size)
    from wrn_det.detection.modeling import build_detector

    cfg = load_config(get_det_cfg(), config_file, list(opts or []))
    model = build_detector(cfg).eval()
    h, w = input_size
    info = {
        "config": config_file, "meta_architecture": cfg.MODEL.META_ARCHITECTURE, "backbone": cfg.MODEL.BACKBONE.NAME,
        "network": cfg.MODEL.WRN.NAME, "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        "freeze_at": int(cfg.MODEL.BACKBONE.FREEZE_AT), "norm": cfg.MODEL.WRN.NORM,
        "input_size": [h, w], "network_input_size": list(network_input_size(model, h, w)),
        "proposals": int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
        "params": detector_parameters(model),
        "gflops": {k: round(v, 3) for k, v in detector_gflops(model, cfg, h, w).items()},
    }
    if benchmark:
        if cfg.MODEL.WEIGHTS:
            load_inference_weights(model, cfg.MODEL.WEIGHTS, cfg)
        info["benchmark"] = benchmark_inference(model, cfg, h, w, benchmark)
        info["benchmark"]["weights"] = cfg.MODEL.WEIGHTS or "random initialisation"
    return info


def _print_detector(info: dict) -> None:
    p = info["params"]
    print(f"{info['config']}: {info['meta_architecture']} with {info['backbone']} {info['network']}, "
          f"{info['num_classes']} classes")
    print(f"  parameters: {p['all']['total']:,} total, {p['all']['trainable']:,} trainable "
          f"(MODEL.BACKBONE.FREEZE_AT {info['freeze_at']}, MODEL.WRN.NORM {info['norm']})")
    h, w = info["input_size"]
    nh, nw = info["network_input_size"]
    print(f"  GFLOPs at {h}x{w} (network input {nh}x{nw}; RoI heads on {info['proposals']} proposals):")
    for part, g in info["gflops"].items():
        params = f"{p[part]['total']:>13,} params" if part in p else ""
        print(f"    {part:<10} {g:>10.2f}  {params}")
    if "benchmark" in info:
        b = info["benchmark"]
        print(f"  inference: {b['median_s']:.4f} s / image (median of {b['runs']} runs after warm-up, {b['device']}, "
              f"weights: {b['weights']})")


def parse_args(argv=None) -> argparse.Namespace:
    """Return the parsed command line; ``KEY VALUE`` config overrides may stand anywhere and go to ``opts``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="model name; omit (or use --all) for a table of all models")
    parser.add_argument("--all", action="store_true", help="print a table of every name in list_models()")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: family's)")
    parser.add_argument("--input-size", type=int, nargs="+", default=None, metavar="S",
                        help="square input side in pixels; with --config-file: H W (default 800 1333)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config-file", "--config", default="", metavar="FILE",
                        help="describe the detector of this config (a path or a file name under configs/)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="with --config-file: time N inference passes (median seconds per image)")
    parser.epilog = "With --config-file, KEY VALUE pairs anywhere on the line override the config."
    return parse_args_with_overrides(parser, argv)


@torch.no_grad()  # counting needs no autograd; as a decorator it leaves the caller's grad mode as it was
def main(args) -> int:
    """Print what ``args`` ask for; returns 0 (bad input raises :class:`ConfigError`)."""
    sizes = args.input_size
    if sizes is not None and (len(sizes) > (2 if args.config_file else 1) or min(sizes) < 1):
        want = "H W (or one side)" if args.config_file else "one side"
        raise ConfigError(f"--input-size must be {want} as positive integers, got {' '.join(map(str, sizes))}")
    if args.config_file:
        if args.name:
            raise ConfigError(f"give a model name or --config-file, not both (got {args.name!r})")
        if args.benchmark < 0:
            raise ConfigError(f"--benchmark must be a number of runs >= 0, got {args.benchmark}")
        size = (800, 1333) if sizes is None else (sizes[0], sizes[-1])
        info = detector_info(args.config_file, args.opts, size, args.benchmark)
        if args.json:
            print(json.dumps(info))
        else:
            _print_detector(info)
        return 0
    if args.opts:
        raise ConfigError(f"KEY VALUE overrides ({' '.join(args.opts)}) need --config-file")
    size = sizes[0] if sizes else None
    if args.all or args.name is None:
        _print_table(list_models())
        return 0
    try:
        info = model_info(args.name, args.num_classes, size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except RuntimeError as exc:
        # Typically an input too small for the network's pooling.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model {args.name!r} cannot run on a {size}x{size} input: {first}") from None
    if args.json:
        print(json.dumps(info))
    else:
        _print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
