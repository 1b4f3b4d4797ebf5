"""train_net.py end to end on CPU: 2-process (GLOO) training, --resume, --eval-only, --dataset."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO, TINY_OPTS, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from solo_d2.config import ConfigError, load_config
from solo_d2.data.shapes import generate_shapes, register_shapes
from solo_d2.engine import Trainer
from solo_d2.engine.preflight import check_config


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
    from solo_d2.data.coco import register_coco_dataset

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
    written = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert written["segm"]["AP"] == 0.0 and written["bbox"]["AP50"] == 0.0
    assert MetadataCatalog.get(name).thing_classes


# ---- config errors: one line, before any work ---------------------------------------------------
OK = "VERSION: 2\n"  # a valid config file


@pytest.mark.parametrize(
    "file_text, opts, phrase",
    [
        ("MODEL:\n  SOLO:\n    NUM_CLASES: 3\n", [],
         "config key MODEL.SOLO.NUM_CLASES does not exist; did you mean MODEL.SOLO.NUM_CLASSES?"),
        (OK, ["MODEL.SOLO.NUM_CLASES", "3"], "command line: config key MODEL.SOLO.NUM_CLASES"),
        (OK, ["MODEL.SOLO.NUM_CLASSES", "three"], "Type mismatch"),
        (OK, ["MODEL.SOLO.NUM_CLASSES"], "KEY VALUE pairs"),
        ("MODEL: [\n", [], "is not valid YAML"),
        ('_BASE_: "no_such_base.yaml"\n', [], "no_such_base.yaml"),
    ],
)  # fmt: skip
def test_config_mistakes_are_one_line_errors(tmp_path, file_text, opts, phrase):
    config = tmp_path / "config.yaml"
    config.write_text(file_text)
    with pytest.raises(ConfigError) as e:
        load_config(str(config), opts)
    assert phrase in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_check_config(tmp_path):
    register_shapes()
    cfg = load_config(str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"))
    cfg.OUTPUT_DIR = str(tmp_path)
    check_config(cfg)
    cfg.MODEL.SOLO.NUM_CLASSES = 80
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert str(e.value) == (
        "MODEL.SOLO.NUM_CLASSES is 80 but dataset 'shapes_train' (DATASETS.TRAIN) has 4 "
        "categories (circle, rectangle, triangle, star); set MODEL.SOLO.NUM_CLASSES 4"
    )
    cfg.MODEL.SOLO.NUM_CLASSES = 4
    cfg.DATASETS.TEST = ("shapes_vla",)
    with pytest.raises(ConfigError, match="'shapes_vla', which is not registered .did you mean "):
        check_config(cfg)
    cfg.DATASETS.TEST = ("shapes_val",)
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    with pytest.raises(ConfigError, match="MODEL.WEIGHTS file not found: .*model.pth"):
        check_config(cfg)
    check_config(cfg, check_weights=False)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    check_config(cfg, resume=True)  # resuming loads the last checkpoint, not MODEL.WEIGHTS
    cfg.MODEL.WEIGHTS = "https://example.com/model.pth"  # fetched later, not checked here
    check_config(cfg)


def test_train_net_stops_with_one_line_before_any_work(tmp_path):
    config = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
    out = tmp_path / "out"
    cases = {
        "unknown key": (["MODEL.SOLO.NUM_CLASES", "4"], "config key MODEL.SOLO.NUM_CLASES"),
        "class count": (["MODEL.SOLO.NUM_CLASSES", "80"], "set MODEL.SOLO.NUM_CLASSES 4"),
        "weights": (["MODEL.WEIGHTS", str(tmp_path / "nope.pth")], "MODEL.WEIGHTS file not found"),
    }

    def run(opts):
        command = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config)]
        return subprocess.run(
            command + opts + ["OUTPUT_DIR", str(out)],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = dict(zip(cases, pool.map(run, [opts for opts, _ in cases.values()])))
    for name, (_, phrase) in cases.items():
        res = results[name]
        assert res.returncode == 2, name
        [line] = res.stderr.strip().splitlines()
        assert line.startswith("train_net.py: error: ") and phrase in line, (name, line)
        assert "Traceback" not in res.stdout + res.stderr
    assert not out.exists()  # no output folder, log or model: nothing started
