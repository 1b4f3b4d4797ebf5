"""Loss curves and per-class AP charts (solo_d2.visualization.training_plots), and the Trainer
writing them after a tiny training and evaluation (TEST.SAVE_PLOTS)."""

import json
import logging
import math

import cv2
import pytest
from conftest import tiny_cfg

from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.shapes import generate_shapes
from solo_d2.engine import Trainer
from solo_d2.engine.hooks import LossCurveHook
from solo_d2.visualization import training_plots
from solo_d2.visualization.training_plots import (
    loss_series,
    per_class_ap,
    per_class_ap_file,
    plot_loss_curve,
    plot_per_class_ap,
    read_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_metrics(path, lines):
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_loss_curve_of_every_logged_loss(tmp_path):
    metrics = tmp_path / "metrics.json"
    write_metrics(
        metrics,
        [
            {"iteration": 19, "total_loss": 4.0, "loss_cls": 2.0, "loss_mask": 2.0, "lr": 0.1},
            {"iteration": 39, "total_loss": 3.0, "loss_cls": 1.5, "loss_mask": 1.5},
            {"iteration": 39, "segm/AP": 10.0},  # an evaluation record: no loss
            {"iteration": 59, "total_loss": 2.5, "loss_cls": 1.0, "loss_mask": 1.2,
             "loss_sem_seg": 0.3},
            {"iteration": 39, "total_loss": 2.9, "loss_cls": 1.4, "loss_mask": 1.5},  # resumed
        ],
    )  # fmt: skip
    with open(metrics, "a") as f:
        f.write('{"iteration": 79, "total_lo')  # the partial last line of a killed run
    assert len(read_metrics(str(metrics))) == 5
    series = loss_series(read_metrics(str(metrics)))
    assert list(series) == ["total_loss", "loss_cls", "loss_mask", "loss_sem_seg"]
    assert series["total_loss"][0].tolist() == [19, 39, 59]
    assert series["total_loss"][1].tolist() == [4.0, 2.9, 2.5]  # the later record of 39 wins
    assert series["loss_sem_seg"][0].tolist() == [59]

    out = tmp_path / "loss_curve.png"
    plotted = plot_loss_curve(str(metrics), str(out))
    assert plotted["total_loss"] == [(19, 4.0), (39, 2.9), (59, 2.5)]
    assert cv2.imread(str(out)).shape == (360, 640, 3)  # 6.4 x 3.6 in at 100 dpi
    assert not list(tmp_path.glob(".*tmp-*"))  # written atomically: no temporary left

    write_metrics(metrics, [{"iteration": 0, "segm/AP": 1.0}])
    assert plot_loss_curve(str(metrics), str(tmp_path / "none.png")) == {}
    assert not (tmp_path / "none.png").exists()


def test_per_class_ap_chart(tmp_path):
    results = {
        "segm": {"AP": 20.0, "AP-circle": 30.0, "AP-star": float("nan"), "AP-bar": 10.0},
        "bbox": {"AP": 15.0, "AP-circle": 25.0, "AP-star": float("nan"), "AP-bar": 5.0},
    }
    aps = per_class_ap(results)
    assert list(aps) == ["segm", "bbox"] and list(aps["segm"]) == ["circle", "star", "bar"]
    assert math.isnan(aps["segm"]["star"]) and aps["bbox"]["bar"] == 5.0
    out = tmp_path / per_class_ap_file("my val/set")
    assert out.name == "per_class_ap_my_val_set.png"
    assert plot_per_class_ap(results, str(out))
    assert cv2.imread(str(out)) is not None
    # no per-class keys (a panoptic PQ result, a model that predicted nothing): nothing written
    assert not plot_per_class_ap({"segm": {"AP": 0.0}}, str(tmp_path / "no.png"))
    assert not plot_per_class_ap({"panoptic_seg": {"PQ": 1.0}}, str(tmp_path / "no.png"))
    assert not (tmp_path / "no.png").exists()

    many = {"segm": {f"AP-c{i}": float(i) for i in range(100)}}
    assert plot_per_class_ap(many, str(tmp_path / "many.png"))  # 40 of the 100 classes shown
    assert cv2.imread(str(tmp_path / "many.png")) is not None


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot_shapes")
    train = generate_shapes(str(root), "train", 8, seed=3, min_size=96, max_size=128)
    val = generate_shapes(str(root), "val", 3, seed=4, min_size=96, max_size=128)
    return (
        register_coco_dataset(f"plots_train={train}:{root / 'train'}"),
        register_coco_dataset(f"plots_val={val}:{root / 'val'}"),
    )


def plots_cfg(tiny_shapes, out_dir, save_plots=True):
    cfg = tiny_cfg()
    cfg.merge_from_list(
        [
            "MODEL.SOLO.NUM_CLASSES", 4,
            "DATASETS.TRAIN", (tiny_shapes[0],),
            "DATASETS.TEST", (tiny_shapes[1],),
            "DATALOADER.NUM_WORKERS", 0,
            "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.MAX_ITER", 2,
            "SOLVER.CHECKPOINT_PERIOD", 100,
            "INPUT.MIN_SIZE_TRAIN", (96,),
            "INPUT.MIN_SIZE_TEST", 96,
            # an untrained model's scores and masks pass no threshold: keep every candidate, so
            # that the evaluation has detections and per-class AP
            "MODEL.SOLO.SCORE_THRESH_TEST", 0.0,
            "MODEL.SOLO.MASK_THRESH_TEST", 0.0,
            "MODEL.SOLO.UPDATE_THRESH_TEST", 0.0,
            "TEST.DETECTIONS_PER_IMAGE", 10,
            "TEST.SAVE_PLOTS", save_plots,
            "OUTPUT_DIR", str(out_dir),
        ]
    )  # fmt: skip
    return cfg


@pytest.mark.parametrize("save_plots", [True, False])
def test_training_writes_loss_curve_and_per_class_ap(tiny_shapes, tmp_path, save_plots):
    """2 iterations of a tiny model, then its evaluation: both PNGs, or none with the key off."""
    trainer = Trainer(plots_cfg(tiny_shapes, tmp_path, save_plots))
    assert any(isinstance(h, LossCurveHook) for h in trainer._hooks) == save_plots
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert "AP-circle" in trainer._last_eval_results["segm"]
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "inference" / "plots_val" / "evaluation_results.json").is_file()
    curve, chart = tmp_path / "loss_curve.png", tmp_path / "per_class_ap_plots_val.png"
    if not save_plots:
        assert not curve.exists() and not chart.exists()
        return
    assert cv2.imread(str(curve)).shape == (360, 640, 3)
    h, w = cv2.imread(str(chart)).shape[:2]
    assert w == 640 and h > 100  # one row per class (4 classes, 2 tasks)


def test_a_failed_plot_only_warns(tiny_shapes, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(training_plots, "plot_per_class_ap", broken)
    cfg = plots_cfg(tiny_shapes, tmp_path)
    from detectron2.modeling import build_model

    with caplog.at_level(logging.WARNING, logger="solo_d2.engine.trainer"):
        results = Trainer.test(cfg, build_model(cfg).eval())
    assert "AP-circle" in results["segm"]  # the results are returned and written all the same
    assert (tmp_path / "inference" / "plots_val" / "evaluation_results.json").is_file()
    assert "Could not plot the per-class AP of plots_val: RuntimeError: no fonts" in caplog.text
    assert not (tmp_path / "per_class_ap_plots_val.png").exists()
