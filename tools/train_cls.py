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
import sys

from wrn_det.classification import ClsTrainer, get_cls_cfg
from wrn_det.engine.config import load_config
from wrn_det.engine.errors import cli_main
from wrn_det.engine.launch import default_argument_parser, launch
from wrn_det.engine.run import open_output_dir, setup_run


def main(cfg, args):
    """Run training (or evaluation with --eval-only) in this process; returns the final metrics."""
    setup_run(cfg, seed_per_rank=False)
    # data, model, weights and the checkpoint to resume are checked before OUTPUT_DIR is written to
    trainer = ClsTrainer(cfg, eval_only=args.eval_only)
    trainer.resume_or_load(args.resume)
    open_output_dir(cfg)
    return trainer.test() if args.eval_only else trainer.train()


def run(argv=None) -> None:
    """Parse the command line, load the config and launch the processes."""
    parser = default_argument_parser("wrn-det classification training")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download CIFAR, SVHN or MNIST into DATASETS.ROOT (= DATASETS.DOWNLOAD True)")
    args = parser.parse_args(argv)
    opts = list(args.opts or []) + (["DATASETS.DOWNLOAD", "True"] if args.download else [])
    cfg = load_config(get_cls_cfg(), args.config_file or None, opts)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(cfg, args))


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(cli_main(run))
