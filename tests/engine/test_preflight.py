"""train_net.py's checks before any work: class counts, devices, builtin datasets missing on disk.

Each mistake ends the run with one "train_net.py: error: ..." line and exit status 2 (no CUDA
with one process is a one-line warning and a CPU run instead); never a traceback.
"""

import json
import os
import subprocess
import sys
import uuid
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO, TINY_OPTS, load_script, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from solo_d2.config import ConfigError, load_config
from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.shapes import SHAPES_CLASSES, generate_shapes
from solo_d2.engine import Trainer
from solo_d2.engine.preflight import check_config

R50 = REPO / "configs" / "SOLOv2_R50_3x.yaml"
SHAPES = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
CPU_WARNING = (
    "train_net.py: warning: no CUDA GPU is available (torch.cuda.is_available() is False), "
    "running on the CPU (MODEL.DEVICE cpu)"
)


def _train_net():
    return load_script(REPO / "train_net.py", "train_net")


def _write_subset(root, categories) -> str:
    """A --dataset spec (without name) of 6 shapes images annotated for circles and rectangles
    only, whose file lists ``categories`` of the 4 shapes classes."""
    data = json.loads(open(generate_shapes(str(root), "val", 6, seed=4)).read())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in (1, 2)]
    data["categories"] = data["categories"][:categories]
    json_file = root / f"{categories}_categories.json"
    json_file.write_text(json.dumps(data))
    return f"{json_file}:{root / 'val'}"


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("subsets")
    return {n: _write_subset(root, n) for n in (2, 4)}


@pytest.fixture
def register():
    names = []

    def _register(spec: str) -> str:
        names.append(register_coco_dataset(f"data_{uuid.uuid4().hex[:8]}={spec}"))
        return names[-1]

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ---- class counts -----------------------------------------------------------------------------


def test_class_count_mismatch_names_both_numbers_and_the_dataset(specs, register):
    name = register(specs[2])
    cfg = tiny_cfg()  # NUM_CLASSES 3
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert str(e.value) == (
        f"MODEL.SOLO.NUM_CLASSES is 3 but dataset {name!r} (DATASETS.TRAIN) has 2 categories "
        "(circle, rectangle); set MODEL.SOLO.NUM_CLASSES 2"
    )
    with pytest.raises(ConfigError, match=f"is 3 but dataset '{name}' .DATASETS.TRAIN. has 2"):
        Trainer(cfg)  # from Python: stops before building anything
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), (name,)
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert str(e.value) == (
        f"MODEL.SOLO.NUM_CLASSES is 3 but dataset {name!r} (DATASETS.TEST) has 2 categories "
        "(circle, rectangle); set MODEL.SOLO.NUM_CLASSES 2 (to evaluate a model trained on more "
        "categories on some of them, keep all of the model's categories, with their ids, in the "
        "dataset's 'categories', annotated or not)"
    )
    with pytest.raises(ConfigError, match=f"is 3 but dataset '{name}' .DATASETS.TEST. has 2"):
        Trainer.test(cfg, build_model(cfg))  # evaluation from Python checks too
    check_config(cfg, splits=("TRAIN",))  # training alone does not look at the test set
    cfg.MODEL.SOLO.NUM_CLASSES = 2
    check_config(cfg)


def test_a_subset_is_evaluated_with_all_the_model_categories(specs, register):
    """A 4-class model on data annotated for 2 of its classes: its file lists all 4 categories,
    so detectron2 maps the model's class k to category id k + 1, as in training."""
    name = register(specs[4])
    cfg = load_config(str(SHAPES))  # NUM_CLASSES 4
    cfg.DATASETS.TEST = (name,)
    check_config(cfg, splits=("TEST",))
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == list(SHAPES_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}


# ---- devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpus, num_gpus, device, error",
    [
        (0, 1, "cuda", None),  # CPU fallback with a warning
        (0, 8, "cuda", "--num-gpus 8 but no CUDA GPU is available (torch.cuda.is_available() is "
                       "False); add MODEL.DEVICE cpu to run 8 processes on the CPU"),
        (0, 8, "cpu", None),  # 8 CPU processes
        (2, 4, "cuda", "--num-gpus 4 but only 2 CUDA GPU(s) are visible; use --num-gpus 2 or "
                       "fewer"),
        (2, 2, "cuda", None),
        (2, 1, "cuda:1", None),
    ],
)  # fmt: skip
def test_devices(monkeypatch, capsys, gpus, num_gpus, device, error):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    opts = ["MODEL.DEVICE", device]
    cfg = load_config(str(R50), opts)
    args = Namespace(num_gpus=num_gpus, opts=list(opts))
    if error is not None:
        with pytest.raises(ConfigError) as e:
            _train_net().check_devices(args, cfg)
        assert str(e.value) == error
        return
    _train_net().check_devices(args, cfg)
    fallback = gpus == 0 and device != "cpu"
    assert args.opts == opts + (["MODEL.DEVICE", "cpu"] if fallback else [])
    assert cfg.MODEL.DEVICE == ("cpu" if fallback else device)
    assert capsys.readouterr().err == (CPU_WARNING + "\n" if fallback else "")


# ---- the main commands, end to end ---------------------------------------------------------------


def _run(args, cwd, env=None):
    command = [sys.executable, str(REPO / "train_net.py")]
    return subprocess.run(
        command + args, capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_main_commands_fail_with_one_line(tmp_path, specs):
    """The README's commands on this machine (no CUDA, no COCO on disk), and class counts."""
    absent = str(tmp_path / "no_datasets")
    coco_help = (
        "; to train or evaluate on your own COCO-format data, register it with --dataset "
        "NAME=ANNOTATIONS.json:IMAGE_DIR and set DATASETS.{} \"('NAME',)\""
    )
    train_missing = (
        f"train_net.py: error: dataset 'coco_2017_train' (DATASETS.TRAIN): its annotation file "
        f"{tmp_path}/datasets/coco/annotations/instances_train2017.json is missing; detectron2 "
        "looks for its builtin datasets in ./datasets ($DETECTRON2_DATASETS unset), this one as "
        "coco/annotations/instances_train2017.json and coco/train2017/" + coco_help.format("TRAIN")
    )
    val_missing = (
        f"train_net.py: error: dataset 'coco_2017_val' (DATASETS.TEST): its annotation file "
        f"{absent}/coco/annotations/instances_val2017.json is missing; detectron2 looks for its "
        f"builtin datasets in $DETECTRON2_DATASETS = {absent}, this one as "
        "coco/annotations/instances_val2017.json and coco/val2017/" + coco_help.format("TEST")
    )
    gpus = (
        "train_net.py: error: --num-gpus 8 but no CUDA GPU is available "
        "(torch.cuda.is_available() is False); add MODEL.DEVICE cpu to run 8 processes on the CPU"
    )
    r50 = ["--config-file", str(R50)]
    shapes = ["--config-file", str(SHAPES)]
    subset_train = ["--dataset", f"two={specs[2]}", "DATASETS.TRAIN", "('two',)"]
    subset_test = ["--eval-only", "--dataset", f"two={specs[2]}", "DATASETS.TEST", "('two',)"]
    cases = {
        "8 GPUs": (r50 + ["--num-gpus", "8"], {}, [gpus]),
        "1 GPU": (r50 + ["--num-gpus", "1"], {}, [CPU_WARNING, train_missing]),
        "8 CPU processes": (r50 + ["--num-gpus", "8", "MODEL.DEVICE", "cpu"], {}, [train_missing]),
        "eval-only": (
            r50 + ["--eval-only", "MODEL.WEIGHTS", "model.pth"],
            {"DETECTRON2_DATASETS": absent},
            [CPU_WARNING, val_missing],
        ),
        "classes, train": (shapes + subset_train, {}, ["is 4 but dataset 'two' (DATASETS.TRAIN)"]),
        "classes, test": (shapes + subset_test, {}, ["is 4 but dataset 'two' (DATASETS.TEST)"]),
    }
    env = {"CUDA_VISIBLE_DEVICES": ""}  # the same answers on a machine with GPUs
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {
            name: pool.submit(_run, args, tmp_path, {**env, **extra})
            for name, (args, extra, _) in cases.items()
        }
    for name, (_, _, expected) in cases.items():
        res = runs[name].result()
        assert res.returncode == 2, (name, res.stderr[-3000:])
        lines = res.stderr.strip().splitlines()
        assert len(lines) == len(expected), (name, lines)
        for line, phrase in zip(lines, expected):
            assert phrase == line or (phrase in line and line.startswith("train_net.py: error: "))
        assert "Traceback" not in res.stdout + res.stderr, name
    assert not (tmp_path / "output").exists()  # nothing started


@pytest.mark.e2e  # a 1-iteration training run (~30 s)
def test_without_cuda_one_process_trains_on_the_cpu(tmp_path, specs):
    out = tmp_path / "out"
    args = ["--config-file", str(SHAPES), "--dataset", f"four={specs[4]}", *TINY_OPTS]
    args += ["MODEL.DEVICE", "cuda", "DATASETS.TRAIN", "('four',)", "DATASETS.TEST", "()"]
    args += ["SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out)]
    res = _run(args, tmp_path, {"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.startswith(CPU_WARNING + "\n")
    assert (out / "model_final.pth").exists()
