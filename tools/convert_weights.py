#!/usr/bin/env python
"""Convert classification weights into detection backbone weights for either engine.

    tools/convert_weights.py output/cifar/model_best.pth wrn_init          # writes wrn_init.pth and wrn_init.pkl
    tools/convert_weights.py output/cifar/model_best.pth wrn_init.pth --ema # builtin engine only, EMA weights
    tools/convert_weights.py wide_resnet50_2-9ba9bcbe.pth wrn50_2.pkl       # torchvision weights -> detectron2
    tools/convert_weights.py timm_wrn101.bin wrn101.pth --model wide_resnet101_2
    tools/convert_weights.py wide-resnet-50-2-export-5ae25d50.pth wrn50_2   # functional-zoo (folded BN)
    tools/convert_weights.py logs/wrn_16_4/model.pt7 wrn_16_4               # the authors' PyTorch code
    tools/convert_weights.py output/cifar/model_best.pth wrn_init --format safetensors   # wrn_init.safetensors
    tools/convert_weights.py model.safetensors wrn50_2.pkl --model wide_resnet50_2       # Hub weights -> detectron2

Inputs: checkpoints of tools/train_cls.py (the network name is read from them), torchvision
and timm wide ResNet state dicts (the name is read from the key layout; ``--model``
overrides), ``.safetensors`` files (timm's and the Hub's, ours), and the authors' own files: functional-zoo's WRN-50-2 export (BatchNorm folded
into the convolutions: the result suits frozen-BatchNorm fine-tuning only, which a warning
repeats) and the ``{'params': ...}`` checkpoints of their PyTorch CIFAR code.
Outputs by extension: ``.pth`` = backbone checkpoint for the builtin engine, ``.pkl`` =
detectron2 pickle for ``DetectionCheckpointer``, ``.safetensors`` = the backbone as safetensors
(no code in it; both engines read it); no extension = ``.pth`` and ``.pkl``, or the formats
``--format`` names. Use the result as ``MODEL.WEIGHTS``. Bad input prints one ``error:`` line and exits with status 2.
"""
import argparse
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import ConfigError, cli_main  # noqa: E402
from wrn_det.models.convert import convert_weights  # noqa: E402


#: ``--format`` choices, each the extension of its file.
OUTPUT_FORMATS = ("pth", "pkl", "safetensors")


def parse_args(argv=None) -> argparse.Namespace:
    """Return the parsed command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("input", help="classification checkpoint or state dict (.pth / .bin / .safetensors)")
    p.add_argument("output", help="output path: NAME.pth (builtin engine), NAME.pkl (detectron2), NAME.safetensors, "
                                  "or NAME (.pth and .pkl, or the --format ones)")
    p.add_argument("--format", nargs="+", choices=OUTPUT_FORMATS, default=None, metavar="FORMAT",
                   help=f"formats to write: {', '.join(OUTPUT_FORMATS)} (default: from the output's extension)")
    p.add_argument("--model", default=None, help="wrn_det.models name, e.g. wide_resnet50_2 (default: from the input)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights of the checkpoint")
    return p.parse_args(argv)


def outputs_for(output: str, formats=None):
    """Return ``(builtin_path, d2_path, safetensors_path)`` (each None when not written) for ``output`` and
    ``--format``."""
    root, ext = os.path.splitext(output)
    if ext and ext[1:] not in OUTPUT_FORMATS:
        raise ConfigError(f"output {output!r}: expected a .pth (builtin engine), .pkl (detectron2) or .safetensors "
                          "file, or a name without extension for several")
    if formats and ext and list(formats) != [ext[1:]]:
        raise ConfigError(f"output {output!r} has the extension {ext} but --format asks for {', '.join(formats)}; "
                          "give a name without extension for several formats")
    wanted = [ext[1:]] if ext else list(formats or ("pth", "pkl"))
    base = root if ext else output
    return tuple(f"{base}.{f}" if f in wanted else None for f in OUTPUT_FORMATS)


def main(args) -> int:
    """Run the conversion ``args`` ask for; prints a summary and returns 0."""
    builtin_out, d2_out, safetensors_out = outputs_for(args.output, args.format)
    res = convert_weights(args.input, model_name=args.model, builtin_out=builtin_out, d2_out=d2_out,
                          use_ema=args.ema, safetensors_out=safetensors_out)
    dropped = f"; left out {len(res['dropped'])} classifier tensors ({', '.join(res['dropped'][:4])})" \
        if res["dropped"] else ""
    print(f"{res['model_name']}: {res['num_tensors']} backbone tensors ({res['num_params']:,} parameters) from "
          f"{args.input} ({res['kind']}{', EMA' if res['ema'] else ''}){dropped}")
    for path in res["written"]:
        print(f"wrote {path}")
    for line in res["warnings"]:  # e.g. the folded BatchNorm of functional-zoo's export
        print(f"warning: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
