#!/usr/bin/env python
"""Plot training curves of classification runs, several overlaid, into one PNG.

    tools/plot_logs.py output/cifar10_wrn_28_10 output/cifar10_wrn_40_4 -o curves.png
    tools/plot_logs.py logs/wide-resnet_1121914561/log.txt -o wrn40_4.png   # the original code's log
    tools/plot_logs.py output/wrn_* --legend MODEL.NAME,MODEL.DROPOUT      # name runs by their options
    tools/plot_logs.py logs/*/log.txt --legend auto                        # the options that differ

A RUN is a wrn_det output folder (its metrics.json), a metrics.json file, or a log
whose lines start with ``json_stats:`` (the original Torch and PyTorch code, and the
log.txt of tools/train_cls.py). Each run contributes train (dashed) and test (solid)
error and loss per epoch. ``--legend KEY[,KEY]`` labels each run ``KEY=value, ...``
with its options, read from its json_stats lines (the original code's ``model``,
``widen_factor``, ...; ours ``MODEL.NAME``, ``SOLVER.BASE_LR``, ...) or its config.yaml;
``--legend auto`` picks the options that differ between the runs, as the original
notebook's sweeper did.
"""
import argparse
import sys

from wrn_det.classification.curves import legend_labels, plot_curves, read_run
from wrn_det.engine.errors import cli_main


def run(argv=None) -> None:
    """Parse the arguments, read every run and write the PNG."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, metrics.json or json_stats: log")
    p.add_argument("-o", "--output", default="curves.png", help="PNG to write (default: curves.png)")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--legend", default="", metavar="KEY[,KEY]",
                   help="label each run by these options (or 'auto': the options that differ between the runs)")
    args = p.parse_args(argv)
    runs = [read_run(r) for r in args.runs]
    if args.legend:
        labels = legend_labels(args.runs, args.legend.split(","), names=[label for label, _ in runs])
        runs = [(label, rows) for label, (_, rows) in zip(labels, runs)]
    path = plot_curves(runs, args.output, args.title)
    print(f"wrote {path} ({len(runs)} run(s): {'; '.join(label for label, _ in runs)})")


if __name__ == "__main__":
    sys.exit(cli_main(run))
