#!/usr/bin/env python3
"""Train and evaluate SOLO-family models with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --num-gpus 8
    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --dataset mydata_train=ann.json:images/ \
        DATASETS.TRAIN "('mydata_train',)" MODEL.SOLO.NUM_CLASSES 3
"""

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from solo_d2 import add_solo_config
from solo_d2.data.datasets import add_dataset_arguments, register_datasets_from_args
from solo_d2.engine import Trainer


def setup(args):
    cfg = get_cfg()
    add_solo_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    register_datasets_from_args(args)  # in every worker process
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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
