#!/usr/bin/env python3
"""Train and evaluate SOLO-family models with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --num-gpus 8
    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --dataset mydata_train=ann.json:images/ \
        DATASETS.TRAIN "('mydata_train',)" MODEL.SOLO.NUM_CLASSES 3

Before any process is launched, the datasets, the config and the weights are checked: a mistake
(an unknown config key, NUM_CLASSES disagreeing with a dataset, a missing weights file, an
annotation file that is not COCO, ...) ends the run with one "train_net.py: error: ..." line and
exit status 2.
"""

import sys

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from solo_d2.checkpoint import AtomicCheckpointer
from solo_d2.config import ConfigError, check_config, load_config
from solo_d2.data.datasets import add_dataset_arguments, register_datasets_from_args
from solo_d2.engine import Trainer


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="solo_d2")
    return cfg


def preflight(args) -> None:
    """Register the datasets and check the config, before any work starts.

    Raises:
        ConfigError, ValueError, OSError: with a one-line message.
    """
    register_datasets_from_args(args)
    check_config(load_config(args.config_file, args.opts), resume=args.resume)


def main(args):
    register_datasets_from_args(args)  # in every worker process
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    parser = default_argument_parser()
    add_dataset_arguments(parser)
    return parser


def invoke_main() -> None:
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    try:
        preflight(args)
    except (ConfigError, ValueError, OSError) as e:  # DatasetError is a ValueError
        print(f"train_net.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
