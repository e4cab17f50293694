#!/usr/bin/env python
"""Train or evaluate a classification network of wrn_det (CIFAR-10/100, SVHN, MNIST, ImageNet).

    tools/train_cls.py --config-file cifar10_wrn_28_10.yaml
    tools/train_cls.py --config-file cifar10_wrn_28_10.yaml --num-gpus 8 SOLVER.IMS_PER_BATCH 128
    torchrun --nproc_per_node 8 tools/train_cls.py --config-file imagenet_wide_resnet50_2.yaml
    tools/train_cls.py --config-file cifar10_wrn_28_10.yaml --resume            # continue OUTPUT_DIR
    tools/train_cls.py --config-file cifar10_wrn_28_10.yaml --eval-only MODEL.WEIGHTS out/model_best.pth
    tools/train_cls.py --config-file cifar100_wrn_28_10.yaml --download      # fetch CIFAR-100 first

Flags as tools/train_net.py; trailing KEY VALUE pairs override the config. A bad
config or dataset prints one ``error:`` line and exits with status 2.
"""
import logging
import os
import sys

# usable from a checkout without installing: this repository's wrn_det comes first
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wrn_det.classification import ClsTrainer, get_cls_cfg  # noqa: E402
from wrn_det.engine import cli_main, default_argument_parser, launch, load_config, open_output_dir, setup_run  # noqa: E402


def parse_args(argv=None):
    """Return the parsed command line: detectron2's flags plus ``--download``."""
    parser = default_argument_parser("wrn-det classification training")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download CIFAR, SVHN or MNIST into DATASETS.ROOT (= DATASETS.DOWNLOAD True)")
    return parser.parse_args(argv)


def train(cfg, args):
    """Run training (or evaluation with --eval-only) in this process; returns the final metrics."""
    setup_run(cfg, seed_per_rank=False)
    # data, model, weights and the checkpoint to resume are checked before OUTPUT_DIR is written to
    trainer = ClsTrainer(cfg, eval_only=args.eval_only)
    trainer.resume_or_load(args.resume)
    open_output_dir(cfg)
    return trainer.test() if args.eval_only else trainer.train()


def main(args) -> int:
    """Load the config of ``args`` and launch the processes that run :func:`train`; returns 0."""
    opts = list(args.opts or []) + (["DATASETS.DOWNLOAD", "True"] if args.download else [])
    cfg = load_config(get_cls_cfg(), args.config_file or None, opts)
    launch(train, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(cfg, args))
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(cli_main(main, parse_args()))
