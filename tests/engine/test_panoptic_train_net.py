"""Panoptic training and evaluation through train_net.py and the Trainer: a ``--dataset
NAME=panoptic:...`` spec, PQ printed in detectron2's copypaste lines, and the config checks."""

import json
import subprocess
import sys
import uuid

import pytest
from conftest import REPO, TINY_OPTS, write_tiny_panoptic

from solo_d2.config import ConfigError, load_config
from solo_d2.data.shapes import register_shapes
from solo_d2.data.shapes_panoptic import register_shapes_panoptic
from solo_d2.engine import Trainer
from solo_d2.engine.cli import register_dataset
from solo_d2.engine.preflight import check_config
from solo_d2.evaluation import SOLOCOCOEvaluator, SOLOPanopticEvaluator
from solo_d2.modeling import is_panoptic

CONFIG = REPO / "configs" / "SOLOv2_R18_quickstart_panoptic_shapes.yaml"
PANOPTIC_OPTS = TINY_OPTS + [
    "MODEL.SOLO.PANOPTIC.CHANNELS", "32",
    "MODEL.SOLO.NUM_CLASSES", "2",
    "MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES", "2",
    "MODEL.SOLO.PANOPTIC.STUFF_AREA_LIMIT", "10",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_panoptic(tmp_path_factory):
    return ":".join(write_tiny_panoptic(tmp_path_factory.mktemp("panoptic"), num_images=6))


@pytest.mark.e2e
def test_train_net_trains_and_evaluates_panoptic_data(tiny_panoptic, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG),
            "--dataset", f"tiny_pan=panoptic:{tiny_panoptic}"] + PANOPTIC_OPTS + [
            "DATASETS.TRAIN", "('tiny_pan',)", "DATASETS.TEST", "('tiny_pan',)",
            "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100",
            "OUTPUT_DIR", str(out)]  # fmt: skip
    res = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert "loss_sem_seg" in log
    assert "copypaste: Task: panoptic_seg" in log
    assert "copypaste: PQ,SQ,RQ,PQ_th,SQ_th,RQ_th,PQ_st,SQ_st,RQ_st" in log
    results = json.loads((out / "inference" / "tiny_pan" / "evaluation_results.json").read_text())
    assert set(results["panoptic_seg"]) >= {"PQ", "PQ_th", "PQ_st", "SQ", "RQ"}
    assert all(0 <= v <= 100 for v in results["panoptic_seg"].values() if v is not None)
    # the things' instance AP beside PQ, its files in the "things" subfolder
    assert "copypaste: Task: segm" in log and "copypaste: Task: bbox" in log
    things = out / "inference" / "tiny_pan" / "things"
    ap = json.loads((things / "evaluation_results.json").read_text())
    assert set(ap) == {"segm", "bbox"} and 0 <= ap["segm"]["AP"] <= 100
    assert (things / "coco_instances_results.json").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_sem_seg" in m for m in metrics)


def _cfg(train: str, test: str, *opts):
    cfg = load_config(str(CONFIG), PANOPTIC_OPTS + list(opts))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (test,)
    return cfg


def test_panoptic_config_checks(tiny_panoptic, tmp_path):
    name = register_dataset(f"pan_{uuid.uuid4().hex[:6]}=panoptic:{tiny_panoptic}")
    register_shapes()
    register_shapes_panoptic()
    check_config(_cfg(name, name), check_weights=False)
    with pytest.raises(ConfigError) as e:
        check_config(_cfg(name, name, "MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES", "53"))
    assert str(e.value) == (
        f"MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES is 53 but dataset {name!r} (DATASETS.TRAIN) has 2 "
        "stuff categories; set MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES 2"
    )
    with pytest.raises(ConfigError, match="training dataset 'shapes_train' is not a panoptic"):
        check_config(_cfg("shapes_train", name, "MODEL.SOLO.NUM_CLASSES", "4"))
    with pytest.raises(ConfigError) as e:  # the hint names the panoptic form of --dataset
        check_config(_cfg(name, "pan_missing"), check_weights=False)
    assert str(e.value).endswith(
        "register it with --dataset pan_missing=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR"
    )
    # a panoptic dataset: PQ, and mask and box AP of its things
    evaluators = Trainer.build_evaluator(_cfg(name, name), name, str(tmp_path))
    pq, things = evaluators._evaluators
    assert isinstance(pq, SOLOPanopticEvaluator) and isinstance(things, SOLOCOCOEvaluator)
    assert things.output_dir == str(tmp_path / "things")
    # the square and the bar of each of the 6 images, and image 1's crowd of squares
    crowd = [a["iscrowd"] for a in things._coco_api.dataset["annotations"]]
    assert (len(crowd), sum(crowd)) == (13, 1)
    # an instance model cannot be evaluated on panoptic data
    cfg = _cfg(name, name, "MODEL.META_ARCHITECTURE", "SOLO")
    with pytest.raises(ValueError, match="needs a panoptic model"):
        Trainer.build_evaluator(cfg, name)


def test_shapes_panoptic_quickstart_config_is_consistent():
    register_shapes()
    register_shapes_panoptic()
    cfg = load_config(str(CONFIG))
    check_config(cfg, check_weights=False)
    assert is_panoptic(cfg)


def test_old_panoptic_switch_fails_at_load_with_one_line(tmp_path):
    """MODEL.SOLO.PANOPTIC.ENABLED is gone: a config or an override that sets it fails when
    loaded, with one line naming what to write instead."""
    old = tmp_path / "old_panoptic.yaml"
    old.write_text(
        f'_BASE_: "{REPO / "configs" / "SOLOv2_R50_3x.yaml"}"\n'
        "MODEL:\n  SOLO:\n    PANOPTIC:\n      ENABLED: True\n"
    )
    for source, call in (
        (f"config file {old}", lambda: load_config(str(old))),
        ("command line", lambda: load_config(str(CONFIG), ["MODEL.SOLO.PANOPTIC.ENABLED", "True"])),
    ):
        with pytest.raises(ConfigError) as e:
            call()
        message = str(e.value)
        assert "\n" not in message
        assert message == (
            f"{source}: config key MODEL.SOLO.PANOPTIC.ENABLED was removed; a panoptic model is "
            'now MODEL.META_ARCHITECTURE "PanopticSOLO": write that instead (and delete the key)'
        )


def test_is_panoptic_asks_the_meta_architecture():
    panoptic = load_config(str(CONFIG))
    assert is_panoptic(panoptic)
    assert is_panoptic(load_config(str(REPO / "configs" / "SOLOv2_R50_3x_panoptic.yaml")))
    for arch in ("SOLO", "SOLOv2", "GeneralizedRCNN", "NotRegistered"):
        panoptic.MODEL.META_ARCHITECTURE = arch
        assert not is_panoptic(panoptic), arch
