#!/usr/bin/env python
"""Train or evaluate a detector with a WRN backbone, with detectron2's command-line flags.

    python tools/train_net.py --config-file wrn34_2_frcnn.yaml                  # train on COCO
    python tools/train_net.py --config-file configs/demo/shapes_wrn_frcnn.yaml  # the shapes demo
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --num-gpus 8                    # one process per GPU
    torchrun --nproc_per_node 2 tools/train_net.py --config-file ...            # torchrun joins the job

``--config-file`` is a path or a file name under ``configs/``. Trailing ``KEY VALUE``
pairs override the config. ``--engine builtin`` (default) runs the project's own loop
around torchvision's detection models; ``--engine detectron2`` is for detectron2's trainer.
"""
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.engine import WrnDetError, cli_main, default_argument_parser, launch  # noqa: E402

ENGINES = ("builtin", "detectron2")


def parse_args(argv=None):
    """Return the parsed command line: detectron2's flags plus ``--engine``."""
    parser = default_argument_parser("Train a Faster R-CNN with a Wide ResNet backbone")
    parser.add_argument("--engine", choices=ENGINES, default="builtin",
                        help="builtin: the project's loop on torchvision detection (default); detectron2: detectron2's trainer")
    return parser.parse_args(argv)


def main(args) -> int:
    """Start training or evaluation for ``args`` on the chosen engine; returns the exit status."""
    if args.engine == "detectron2":
        try:
            from wrn_det.d2.train import run as run_d2
        except ImportError as e:
            raise WrnDetError(f"--engine detectron2: {e}") from None
        run_d2(args)
        return 0
    from wrn_det.detection.train import main as train_main

    launch(train_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, parse_args()))
