"""train_net.py end to end on CPU: 2-process (GLOO) training, --resume, --eval-only, --dataset."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from solo_d2.data.shapes import generate_shapes
from solo_d2.engine import Trainer

TINY_OPTS = [
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.SOLO.INSTANCE_IN_CHANNELS", "32",
    "MODEL.SOLO.INSTANCE_CHANNELS", "32",
    "MODEL.SOLO.NUM_KERNELS", "32",
    "MODEL.SOLO.MASK_IN_CHANNELS", "32",
    "MODEL.SOLO.MASK_CHANNELS", "32",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MIN_SIZE_TEST", "128",
]  # fmt: skip


def run_train_net(args, tmp_path):
    config = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
    env_args = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config)]
    res = subprocess.run(env_args + args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    train = generate_shapes(str(root), "train", 16, seed=3)
    val = generate_shapes(str(root), "val", 6, seed=4)
    return f"tiny_train={train}:{root / 'train'}", f"tiny_val={val}:{root / 'val'}"


@pytest.mark.e2e
def test_two_process_cpu_training_resume_and_eval_only(small_shapes, tmp_path):
    out = tmp_path / "out"
    common = ["--dataset", small_shapes[0], "--dataset", small_shapes[1]]
    opts = TINY_OPTS + ["DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
                        "OUTPUT_DIR", str(out)]  # fmt: skip
    run_train_net(common + ["--num-gpus", "2"] + opts + ["SOLVER.MAX_ITER", "2"], tmp_path)
    assert (out / "model_final.pth").exists()
    assert (out / "inference" / "tiny_val" / "coco_instances_results.json").exists()

    # --resume continues from the last checkpoint (iteration 2) up to the new MAX_ITER
    res = run_train_net(common + ["--resume"] + opts + ["SOLVER.MAX_ITER", "4"], tmp_path)
    assert "Starting training from iteration 2" in res.stdout + res.stderr
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3

    res = run_train_net(
        common + ["--eval-only"] + opts + ["MODEL.WEIGHTS", str(out / "model_final.pth")], tmp_path
    )
    # printed whether or not the barely trained model predicts anything
    assert "copypaste: Task: segm" in res.stdout + res.stderr


def test_evaluation_of_a_model_that_predicts_nothing(small_shapes, tmp_path):
    from solo_d2.data.datasets import register_coco_dataset

    name = register_coco_dataset(small_shapes[1])
    DatasetCatalog.get(name)
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.NUM_CLASSES = 4
    cfg.MODEL.SOLO.SCORE_THRESH_TEST = 1.1  # nothing passes
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.DATALOADER.NUM_WORKERS = 0
    model = build_model(cfg).eval()
    evaluator = Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path))
    results = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
    assert set(results) == {"segm", "bbox"}
    for task in ("segm", "bbox"):
        assert results[task]["AP"] == 0.0 and results[task]["AP50"] == 0.0
    assert json.loads((tmp_path / "coco_instances_results.json").read_text()) == []
    assert MetadataCatalog.get(name).thing_classes
