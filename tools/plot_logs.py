#!/usr/bin/env python
"""Plot the training curves of classification and detection runs.

    tools/plot_logs.py output/cifar10_wrn_28_10 output/cifar10_wrn_40_4 -o curves.png
    tools/plot_logs.py logs/wide-resnet_1121914561/log.txt -o wrn40_4.png   # the original code's log
    tools/plot_logs.py output/wrn_* --legend MODEL.NAME,MODEL.DROPOUT      # name runs by their options
    tools/plot_logs.py logs/*/log.txt --legend auto                        # the options that differ
    tools/plot_logs.py output/demo                                         # a detection run: output/demo/curves.png

A RUN is a wrn_det output folder (its metrics.json), a metrics.json file, or a log
whose lines start with ``json_stats:`` (the original Torch and PyTorch code, and the
log.txt of tools/train_cls.py). The kind of run is read from its rows: per epoch
(classification) or per iteration (detection); one call takes runs of one kind.

Classification runs are overlaid in one PNG (``-o``, default ``curves.png``): train
(dashed) and test (solid) error and loss per epoch. ``--legend KEY[,KEY]`` labels each
run ``KEY=value, ...`` with its options, read from its json_stats lines (the original
code's ``model``, ``widen_factor``, ...; ours ``MODEL.NAME``, ``SOLVER.BASE_LR``, ...) or
its config.yaml; ``--legend auto`` picks the options that differ between the runs, as
the original notebook's sweeper did.

Each detection run gets its own PNG (``<run>/curves.png``, or ``-o`` for a single run):
losses, learning rate and box AP (or, for an RPN-only run, proposal recall) per
iteration. Every evaluation of the run left ``inference/pr_data.json``
(``inference/<dataset>/`` with several test datasets); from it the precision-recall
curves, the per-class AP bars and the confusion matrix are drawn again into the same
folder (a run folder of ``--eval-only`` holds only those).
"""
import argparse
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import WrnDetError, cli_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Return the parsed command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, metrics.json or json_stats: log")
    p.add_argument("-o", "--output", default="",
                   help="PNG to write (default: curves.png for classification runs, <run>/curves.png for a detection run)")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--legend", default="", metavar="KEY[,KEY]",
                   help="label each classification run by these options (or 'auto': the options that differ between "
                        "the runs)")
    return p.parse_args(argv)


def _evaluations(path: str) -> dict:
    """Return ``folder -> pr_data.json`` of the evaluations under a detection run folder (none for a file)."""
    if not os.path.isdir(path) or not os.path.isdir(os.path.join(path, "inference")):
        return {}
    from wrn_det.detection.evaluation.plots import find_plot_data

    return find_plot_data(path)


def _plot_classification(args, runs) -> None:
    from wrn_det.classification.curves import legend_labels
    from wrn_det.engine.curves import plot_classification

    if args.legend:
        labels = legend_labels([path for path, _, _ in runs], args.legend.split(","), names=[label for _, label, _ in runs])
        runs = [(path, label, rows) for label, (path, _, rows) in zip(labels, runs)]
    path = plot_classification([(label, rows) for _, label, rows in runs], args.output or "curves.png", args.title)
    print(f"wrote {path} ({len(runs)} run(s): {'; '.join(label for _, label, _ in runs)})")


def _plot_detection(args, runs, evaluations) -> None:
    from wrn_det.engine.curves import plot_detection

    if args.legend:
        raise WrnDetError("--legend labels overlaid classification runs; each detection run is drawn on its own")
    if args.output and len(runs) > 1:
        raise WrnDetError(f"-o names one PNG, but the {len(runs)} detection runs get one each (<run>/curves.png)")
    for path, _, rows in runs:
        if rows is not None:
            folder = path if os.path.isdir(path) else os.path.dirname(path)
            print(f"wrote {plot_detection(rows, args.output or os.path.join(folder, 'curves.png'), args.title)}")
        if evaluations[path]:
            from wrn_det.detection.evaluation.plots import redraw

            for folder in evaluations[path]:
                print(f"wrote {', '.join(redraw(folder))}")


def main(args) -> int:
    """Read every run of ``args`` and draw its figure (and a detection run's evaluation pictures); returns 0."""
    from wrn_det.engine.curves import CLASSIFICATION, DETECTION, read_run, run_kind

    runs = {CLASSIFICATION: [], DETECTION: []}  # kind -> [(path, label, rows)]
    evaluations = {}
    for path in args.runs:
        evaluations[path] = _evaluations(path)
        if evaluations[path] and not os.path.isfile(os.path.join(path, "metrics.json")):
            # an --eval-only run: its evaluation pictures, no curves
            runs[DETECTION].append((path, os.path.basename(os.path.normpath(path)), None))
            continue
        label, rows = read_run(path)
        runs[run_kind(rows)].append((path, label, rows))
    if runs[CLASSIFICATION] and runs[DETECTION]:
        raise WrnDetError(f"{runs[CLASSIFICATION][0][0]} is a classification run (rows per epoch) and "
                          f"{runs[DETECTION][0][0]} a detection run (rows per iteration); plot them in separate calls")
    if runs[CLASSIFICATION]:
        _plot_classification(args, runs[CLASSIFICATION])
    else:
        _plot_detection(args, runs[DETECTION], evaluations)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
