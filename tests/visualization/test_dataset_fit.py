"""A config fitted to a dataset's statistics (solo_d2.visualization.dataset_fit), on datasets whose
object sizes and positions force values worked out by hand."""

import numpy as np
import pytest
from conftest import REPO, solo_cfg
from detectron2.structures import BoxMode

from solo_d2.config import load_config
from solo_d2.visualization.dataset_fit import (
    fit_config,
    fit_grids,
    fit_resizes,
    fit_scale_ranges,
    fit_sigma,
    format_fit,
    min_kept_scale,
    write_fit,
)
from solo_d2.visualization.dataset_report import collect_objects

QUICKSTART_RANGES = [[1, 32], [16, 64], [32, 128], [64, 256], [128, 2048]]
COCO_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
STRIDES = [8, 8, 16, 32, 32]


def square_dicts(centres, size, hw=(576, 576), category=0):
    """One image of ``hw`` per list in ``centres``: squares of side ``size`` at (cx, cy)."""
    return [
        {
            "height": hw[0],
            "width": hw[1],
            "annotations": [
                {"bbox": [cx - size / 2, cy - size / 2, size, size], "bbox_mode": BoxMode.XYWH_ABS,
                 "category_id": category, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]}
                for cx, cy in image
            ],
        }  # fmt: skip
        for image in centres
    ]


def test_min_kept_scale():
    # a mask filling half its box passes the area filter (area / 4^2 > 8) from sqrt(8 / 0.5) * 4
    assert min_kept_scale(4, 8) == pytest.approx(16.0)


def test_resizes_from_image_and_object_sizes():
    hw = np.array([[400, 600]] * 3)
    small = np.full(10, 8.0)  # objects of scale 8: x2 reaches 16 px
    # the quickstart's budget (288 / 416) allows no upscaling of 400 x 600 images: factor 1
    r = fit_resizes(hw, small, 288, 416, 16.0)
    assert (r["needed_factor"], r["factor"], r["test_short"]) == (2.0, 1.0, 400)
    assert r["max_size"] == 608  # 400 x 1.5 = 600 -> next multiple of 32
    assert r["train_shorts"] == [320, 360, 400]  # 0.8, 0.9, 1 x 400
    # COCO's budget (800 / 1333) allows x2.22: the x2 the small objects need
    r = fit_resizes(hw, small, 800, 1333, 16.0)
    assert (r["factor"], r["test_short"], r["max_size"]) == (2.0, 800, 1216)
    assert r["train_shorts"] == [640, 720, 800]
    # large objects: shrink, but not below the base's test short side (288 / 400 = 0.72)
    r = fit_resizes(hw, np.full(10, 200.0), 288, 416, 16.0)
    assert (r["factor"], r["test_short"], r["max_size"]) == (0.72, 288, 448)


def test_scale_ranges_shift_by_octaves():
    ranges, k, median = fit_scale_ranges(np.full(5, 64.0), QUICKSTART_RANGES)
    assert (k, median) == (1, 64.0)
    assert ranges == [[1, 64], [32, 128], [64, 256], [128, 512], [256, 4096]]
    ranges, k, _ = fit_scale_ranges(np.full(5, 8.0), QUICKSTART_RANGES)
    assert k == -2 and ranges == [[1, 8], [4, 16], [8, 32], [16, 64], [32, 2048]]
    # the published COCO ranges stay as they are for a COCO-like median (75 px at 800)
    assert fit_scale_ranges(np.array([20.0, 75.0, 300.0]), COCO_RANGES)[:2] == (COCO_RANGES, 0)


def test_grids_scale_with_the_resize_then_grow_until_few_objects_lack_a_cell_of_their_own():
    """Two 48 px squares of *different* classes, centres (40, 40) and (60, 40), sigma 0.2 (centre
    regions 9.6 px wide): on levels P2 [1, 64] and P3 [32, 128]. Worked by hand (cells as
    floor(x / (576 / S)), regions clamped to the 3 x 3 cells around the centre cell):

    P2, S=16 (36 px): A's region x 35.2-44.8 -> columns 0-1, rows 0-1; B's x 55.2-64.8 ->
    column 1, rows 0-1: every cell of B is also A's: B lost (1 of 2). S=18 (32 px): A -> (1, 1)
    only, B -> columns 1-2: A lost. S=20 (28.8 px): A -> column 1, B -> columns 1-2: A lost.
    S=22 (26.2 px): A -> column 1, B -> column 2: both own a cell. P3, S=12 (48 px): columns 0
    and 1 from the start. A cell predicts one mask whatever the classes, so the classes do not
    matter (the first rule counted only same-class pairs and kept S=16).
    """
    dicts = square_dicts([[(40, 40), (60, 40)]], 48)
    dicts[0]["annotations"][1]["category_id"] = 1
    objects = collect_objects(dicts)
    ranges = [[1, 64], [32, 128], [64, 256], [128, 512], [256, 4096]]
    grids, start, shared = fit_grids(
        objects, (576, 576), ranges, [16, 12, 8, 6, 4], 1, 288, STRIDES, 4, 0.2
    )
    assert start == [16, 12, 8, 6, 4]  # 2^-1 x 576 / 288 = 1
    assert grids == [22, 12, 8, 6, 4] and shared == [0, 0, 0, 0, 0]
    # the scale rule alone: x 2^2 x 576/288 = 8, capped at 576 / stride (72, 72, 36, 18, 18)
    args = (objects, (576, 576), ranges, [16, 12, 8, 6, 4], -2, 288, STRIDES, 4, 0.2)
    assert fit_grids(*args)[1] == [72, 72, 36, 18, 18]


def test_sigma_shrinks_until_crowded_centre_regions_separate():
    # 48 px squares 15 px apart: regions overlap while 15 < sigma x 48
    objects = collect_objects(square_dicts([[(100, 100), (115, 100)], [(300, 300)]], 48))
    sigma, tried = fit_sigma(objects, (576, 576), QUICKSTART_RANGES, 0.4)
    assert sigma == 0.3 and tried == {0.4: 0.667, 0.3: 0.0}  # 2 of 3 objects, rounded
    assert fit_sigma(objects, (576, 576), QUICKSTART_RANGES, 0.2) == (0.2, {0.2: 0.0})


def test_fit_config_written_and_loaded_back(tmp_path):
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml")
    dicts = square_dicts([[(100, 100), (300, 300)]] * 4, 48)
    config_file = str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml")
    stuff = ["things", "sky", "grass"]
    fit = fit_config(
        cfg, dicts, ["square"], base_config=config_file, dataset_name="sq", stuff_classes=stuff
    )
    # 576 px images, objects of 48 px (need x1/3): shrink to the base's 288 -> objects 24 px,
    # median under the finest range's end 32 by less than half an octave: ranges unchanged
    assert fit.changes["INPUT.MIN_SIZE_TEST"][0] == 288
    assert fit.changes["MODEL.SOLO.FPN_SCALE_RANGES"][0] == QUICKSTART_RANGES
    assert fit.changes["MODEL.SOLO.NUM_CLASSES"][0] == 1
    assert "MODEL.SOLO.SIGMA" not in fit.changes  # no crowding
    assert "TEST.DETECTIONS_PER_IMAGE" not in fit.changes  # 2 per image
    out = tmp_path / "fit.yaml"
    write_fit(fit, str(out))
    text = out.read_text()
    assert text == format_fit(fit, str(out)) and '_BASE_: "../' in text
    # every value has its one-line comment just above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(("NUM_GRIDS:", "MIN_SIZE_TEST:", "NUM_STUFF_CLASSES:")):
            assert lines[i - 1].strip().startswith("# ")
    loaded = load_config(str(out))
    assert loaded.INPUT.MIN_SIZE_TEST == 288 and loaded.INPUT.MAX_SIZE_TEST == 288
    assert tuple(loaded.INPUT.MIN_SIZE_TRAIN) == (232, 256, 288)
    assert loaded.MODEL.SOLO.NUM_CLASSES == 1 and loaded.MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES == 2
    assert loaded.DATASETS.TRAIN == ("sq",) and loaded.DATASETS.TEST == ()
    # the base's architecture is inherited untouched
    assert loaded.MODEL.RESNETS.DEPTH == 18 and loaded.MODEL.SOLO.NUM_KERNELS == 64
    assert list(loaded.MODEL.SOLO.NUM_GRIDS) == fit.changes["MODEL.SOLO.NUM_GRIDS"][0]


def test_crowded_images_raise_the_detections_per_image():
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml")
    centres = [[(20 + 24 * (i % 20), 20 + 24 * (i // 20)) for i in range(120)]]
    fit = fit_config(cfg, square_dicts(centres, 12), ["dot"], base_config="base.yaml")
    assert fit.changes["TEST.DETECTIONS_PER_IMAGE"][0] == 180  # 1.5 x 120


def test_no_instances_is_a_one_line_error():
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml")
    with pytest.raises(ValueError, match="has no instances to fit a config to"):
        fit_config(cfg, square_dicts([[]], 10), ["x"], base_config="b.yaml", dataset_name="e")


def test_fit_model_drops_the_outer_levels_without_objects():
    # 576 px images, 48 px objects -> test 288 (24 px), train 232-288 (19-24 px): on P2 [1, 32]
    # and P3 [16, 64] only; P4-P6 receive nothing at any size
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml")
    dicts = square_dicts([[(100, 100), (300, 300)]] * 4, 48)
    plain = fit_config(cfg, dicts, ["square"], base_config="b.yaml")
    assert "MODEL.SOLO.INSTANCE_IN_FEATURES" not in plain.changes  # the architecture is kept
    fit = fit_config(cfg, dicts, ["square"], base_config="b.yaml", fit_model=True)
    assert fit.changes["MODEL.SOLO.INSTANCE_IN_FEATURES"][0] == ["p2", "p3"]
    assert fit.changes["MODEL.SOLO.FPN_INSTANCE_STRIDES"][0] == [8, 8]
    assert fit.changes["MODEL.SOLO.FPN_SCALE_RANGES"][0] == [[1, 32], [16, 2048]]
    assert fit.changes["MODEL.SOLO.NUM_GRIDS"][0] == plain.changes["MODEL.SOLO.NUM_GRIDS"][0][:2]
    assert plain.changes["MODEL.SOLO.FPN_SCALE_RANGES"][0] == QUICKSTART_RANGES
