"""Dataset statistics against a config's levels (solo_d2.visualization.dataset_report), checked on
a hand-built dataset (conftest.hand_built_dicts) whose expected numbers were worked out by hand
(test_hand_built_dataset_counts)."""

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import HAND_CLASSES as CLASSES
from conftest import HAND_GRIDS as GRIDS
from conftest import HAND_RANGES as RANGES
from conftest import hand_ann as ann
from conftest import hand_built_dicts, solo_cfg

from solo_d2.modeling.targets import assign_grid_targets
from solo_d2.visualization.dataset_report import (
    analyze_dataset,
    collect_objects,
    format_report,
    lost_in_positives,
    lost_to_shared_cells,
    measure_lost_targets,
    plot_scale_histogram,
    resized_shape,
    train_short_sizes,
)

HAND_BUILT = dict(
    level_names=["P2", "P3", "P4", "P5", "P6"], scale_ranges=RANGES, num_grids=GRIDS,
    level_strides=[8, 8, 16, 32, 32], mask_stride=4, train_sizes=[64], max_size_train=1333,
    test_size=128, max_size_test=1333, num_classes=3,
)  # fmt: skip


def test_hand_built_dataset_counts():
    """Expected numbers computed by hand.

    Test resize (short side 128): images 0, 1 and 3 keep their size, image 2 (64 x 128) doubles
    to 128 x 256. Scales sqrt(w*h): A 10, B 8, C 20, D 28, H 3, E 70, G 95, I 120, J 30, K 30,
    L 20 (10 x 2). Levels: P2 [4, 24] A B C L; P3 [16, 48] C D J K L; P4 [32, 64] none;
    P5 [80, 100] G; P6 [90, 110] G. Below 4: H; above 110: I; in the gap 64-80: E; on two levels:
    C, G, L. Centre cells (canvas = the image, 128 or 128 x 256): P2 (S=12, cell 10.7 px): A (5, 5)
    and B (6, 6) share cell (0, 0), class a -> 2 same-class; C (110, 110) alone in image 0's
    cell (10, 10); L in image 2. P3 (S=10, 12.8 px): C and D both centred at (110, 110), cell
    (8, 8), class b -> 2 same-class; J (75, 75) and K (76, 76) share cell (5, 5) with different
    classes -> 4 sharing a cell in all. Area filter (box area / 4^2 <= the finest level's stride
    8): A (100 / 16) and B (64 / 16) on P2, none elsewhere.

    Train resize (short side 64): images 0 and 1 halve (canvas 64), image 2 keeps 64 x 128.
    Scales: A 5, B 4, C 10, D 14, H 1.5, E 35, G 47.5, I 60, J 15, K 15, L 10. P2: A B C D J K L
    (7); P3: E G; P4: E G I; P5, P6: none; below: H; on two levels: E, G. P2 cells (S=12,
    5.33 px): A (2.5) and B (3) -> (0, 0), class a; C and D at (55, 55) -> (10, 10), class b:
    4 same-class; J (37.5) and K (38) -> (7, 7), other classes: 6 in all. P3 (S=10): E (17.5)
    -> 2, G (23.75) -> 3: none. P4 (S=8): E -> 2, G -> 2 (2.97), class c -> 2; I (30) -> 3.

    Lost to shared cells (sigma 0.2; every cell of the centre region also another object's, any
    class): at test, P2 A and B (regions both cell (0, 0)): 2; P3 C and D (the same centre) and
    J, K (regions columns 5-6, rows 5-6 both): 4. At train, P2 A B, C D, J K pairwise: 6; P3 E's
    region (x 14-21 px: columns 2-3 of 6.4 px) inside G's (x 19-28.5: columns 2-4): E lost, 1.
    """
    report = analyze_dataset(hand_built_dicts(), CLASSES, **HAND_BUILT)
    assert report["num_images"] == 4 and report["num_images_without_instances"] == 1
    assert report["num_instances"] == 11
    assert report["left_out"] == {"crowd": 1, "without_segmentation": 1, "empty_box": 1}
    assert report["instances_per_class"] == {"a": 4, "b": 3, "c": 4}
    assert report["instances_per_image"]["max"] == 5 and report["instances_per_image"]["min"] == 0
    assert report["image_sizes"]["distinct"] == 2
    assert report["image_sizes"]["most_common"][0] == [128, 128, 3]

    test = report["test"]
    assert test["per_level"] == [4, 5, 0, 1, 1]
    assert (test["below_finest"], test["above_coarsest"], test["between_levels"]) == (1, 1, 1)
    assert test["on_two_levels"] == 3
    assert test["same_class_same_cell"] == [2, 2, 0, 0, 0]
    assert test["same_cell_any_class"] == [2, 4, 0, 0, 0]
    assert test["lost_targets"] == [2, 4, 0, 0, 0]
    assert test["too_small_for_area_filter"] == [2, 0, 0, 0, 0]
    assert test["scale"]["min"] == 3.0 and test["scale"]["max"] == 120.0

    train = report["train"]
    assert train["per_level"] == [7, 2, 3, 0, 0]
    assert (train["below_finest"], train["above_coarsest"], train["between_levels"]) == (1, 0, 0)
    assert train["on_two_levels"] == 2
    assert train["same_class_same_cell"] == [4, 0, 2, 0, 0]
    assert train["same_cell_any_class"] == [6, 0, 2, 0, 0]
    assert train["lost_targets"] == [6, 1, 0, 0, 0]

    warnings = "\n".join(report["warnings"])
    assert "most objects go to level" not in warnings  # at most 7 of 12 assignments (58%)
    assert "smaller than the finest level's range" in warnings  # 1 of 11 > 5%
    assert "MODEL.SOLO.FPN_SCALE_RANGES[-1][1]" in warnings  # I, above the coarsest
    assert "between two levels' ranges" in warnings  # E
    assert "level P4 receives almost no objects" in warnings
    assert "raise MODEL.SOLO.NUM_GRIDS[0] (now 12)" in warnings
    assert "inference area filter" in warnings and "INPUT.MIN_SIZE_TEST" in warnings
    assert "3 classes have fewer than 10 instances (a, b, c)" in warnings
    assert "MODEL.SOLO.NUM_CLASSES is" not in warnings  # 3 classes, as configured

    scales = report.pop("_scales")
    assert len(scales["test"]) == len(scales["train"]) == 11
    json.dumps(report)  # JSON-serialisable without the scales
    text = format_report(report)
    assert "P3     [16, 48]" in text and "below the finest range: 1" in text


def test_train_counts_average_over_the_train_sizes():
    """Two train sizes, 64 and 128: the counts are the means of the two resizes (per epoch)."""
    args = dict(HAND_BUILT, train_sizes=[64, 128])
    report = analyze_dataset(hand_built_dicts(), CLASSES, **args)
    # P2: 7 at 64, 4 at 128 (the test numbers); P6: 0 and 1
    assert report["train"]["per_level"] == [5.5, 3.5, 1.5, 0.5, 0.5]
    assert report["train"]["short_sizes"] == [64, 128]


def test_dominant_level_warning():
    dicts = [
        {
            "height": 128,
            "width": 128,
            "annotations": [ann([9 * i, 0, 10, 10], 0) for i in range(10)]
            + [ann([0, 50, 30, 30], 0)],
        }
    ]
    report = analyze_dataset(dicts, ["a"], **HAND_BUILT)
    assert report["test"]["per_level"] == [10, 1, 0, 0, 0]
    assert (
        "after the test resize most objects go to level P2 (91% of the objects' level "
        "assignments)" in "\n".join(report["warnings"])
    )


def test_from_config_and_class_count_warning(tmp_path):
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml")
    cfg.MODEL.SOLO.FPN_SCALE_RANGES = RANGES
    cfg.MODEL.SOLO.NUM_GRIDS = GRIDS
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MIN_SIZE_TEST = 128
    report = analyze_dataset(cfg, hand_built_dicts(), CLASSES, dataset_name="hand")
    assert report["test"]["per_level"] == [4, 5, 0, 1, 1]  # as with the keyword arguments
    assert report["levels"][0] == {"name": "P2", "scale_range": [4.0, 24.0], "num_grid": 12,
                                   "stride": 8}  # fmt: skip
    assert "MODEL.SOLO.NUM_CLASSES is 4 but the dataset has 3 classes" in report["warnings"][0]
    out = tmp_path / "hist.png"
    plot_scale_histogram(report, str(out))
    assert cv2.imread(str(out)).shape == (420, 700, 3)


def test_panoptic_segments_and_resize_helpers():
    dicts = [
        {"height": 100, "width": 200, "segments_info": [
            {"id": 1, "category_id": 0, "isthing": True, "iscrowd": 0, "bbox": [0, 0, 20, 20]},
            {"id": 2, "category_id": 1, "isthing": False, "iscrowd": 0, "bbox": [0, 0, 200, 50]},
            {"id": 3, "category_id": 1, "isthing": True, "iscrowd": 1, "bbox": [0, 0, 9, 9]},
        ]},
    ]  # fmt: skip
    objects = collect_objects(dicts)
    assert objects["category"].tolist() == [0] and objects["num_crowd"] == 1
    # ResizeShortestEdge: short side 800, longest 1333: 100 x 200 -> 667 x 1333
    h, w = resized_shape(np.array([100, 480]), np.array([200, 640]), 800, 1333)
    assert h.tolist() == [667, 800] and w.tolist() == [1333, 1067]
    assert resized_shape(np.array([7]), np.array([9]), 0, 1333)[0].tolist() == [7]
    assert train_short_sizes((640, 800), "range") == [640, 660, 680, 700, 720, 740, 760, 780, 800]
    assert train_short_sizes((160, 192), "choice") == [160, 192]
    with pytest.raises(ValueError, match="MIN_SIZE_TRAIN_SAMPLING"):
        train_short_sizes((1,), "uniform")


def test_resized_shape_equals_detectron2_resize_shortest_edge():
    """The vectorised resize gives detectron2's ResizeShortestEdge.get_output_shape on random
    image sizes, short sides and size limits."""
    from detectron2.data.transforms import ResizeShortestEdge

    rng = np.random.default_rng(0)
    h, w = rng.integers(1, 3000, 200), rng.integers(1, 3000, 200)
    for short, max_size in [(800, 1333), (640, 1000), (160, 352), (512, 512)]:
        got_h, got_w = resized_shape(h, w, short, max_size)
        expected = [
            ResizeShortestEdge.get_output_shape(a, b, short, max_size) for a, b in zip(h, w)
        ]
        assert list(zip(got_h.tolist(), got_w.tolist())) == [tuple(e) for e in expected]


def test_lost_to_shared_cells_equals_the_models_assignment():
    """The report's count from boxes is the model's own: on random centres, sizes, grids and
    sigmas, an object is lost exactly when assign_grid_targets gives each of its cells to
    another instance too (lost_in_positives)."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, images, (h, w) = int(rng.integers(1, 40)), 3, (256, 320)
        img = np.sort(rng.integers(0, images, n))
        bw, bh = rng.uniform(4, 120, n), rng.uniform(4, 120, n)
        cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
        s, sigma = int(rng.integers(2, 30)), float(rng.choice([0.1, 0.2, 0.4]))
        boxes = torch.tensor(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1),
                             dtype=torch.float32)  # fmt: skip
        centers = torch.tensor(np.stack([cx, cy], 1), dtype=torch.float32)
        _, positives = assign_grid_targets(
            boxes, centers, torch.zeros(n, dtype=torch.int64), torch.tensor(img), images, (h, w),
            [s], [[0, 1e9]], sigma, 1,
        )  # fmt: skip
        wh = (boxes[:, 2:] - boxes[:, :2]).numpy()
        canvas = np.tile([h, w], (n, 1))
        predicted = lost_to_shared_cells(img, cx, cy, wh[:, 0], wh[:, 1], canvas, s, sigma)
        np.testing.assert_array_equal(predicted, lost_in_positives(positives[0].numpy(), n))


def test_lost_in_positives_by_hand():
    # instance 0 owns cell 5; instance 1's cells 5 and 6 are both also 0's or 2's; 2 owns 7
    positives = np.array([[0, 5, 0], [0, 4, 0], [0, 4, 1], [0, 6, 1], [0, 6, 2], [0, 7, 2]])
    assert lost_in_positives(positives, 4).tolist() == [False, True, False, False]
    # the same cell in another image is another cell
    assert lost_in_positives(np.array([[0, 3, 0], [1, 3, 1]]), 2).tolist() == [False, False]


def test_measured_lost_targets_agree_with_the_prediction():
    """Squares as polygons, of sizes away from the ranges' ends: the count measured with the
    model's assignment on decoded masks (centres of mass, boxes of the rasterised masks) is the
    one predicted from the annotation boxes, within the half-pixel by which a rasterised square's
    centre of mass differs from its box centre (a few objects change cells)."""
    rng = np.random.default_rng(1)
    dicts = []
    for _ in range(6):
        anns = []
        for k in range(int(rng.integers(3, 12))):
            size, (x, y) = float(rng.choice([12, 20, 36, 60, 80])), rng.integers(0, 150, 2)
            poly = [x, y, x + size, y, x + size, y + size, x, y + size]
            anns.append({"bbox": [x, y, size, size], "bbox_mode": 1, "category_id": k % 2,
                         "iscrowd": 0, "segmentation": [poly]})  # fmt: skip
        dicts.append({"height": 256, "width": 256, "annotations": anns})
    args = dict(HAND_BUILT, scale_ranges=[[1, 48], [24, 96], [48, 192], [96, 384], [192, 2048]],
                num_grids=[14, 10, 8, 6, 4], test_size=256, max_size_test=256)  # fmt: skip
    report = analyze_dataset(dicts, ["a", "b"], **args, sigma=0.4)
    measured = measure_lost_targets(dicts, 256, 256, args["scale_ranges"], args["num_grids"], 0.4)
    assert measured["images"] == 6 and measured["instances"] == report["num_instances"]
    assert measured["per_level"] == [int(v) for v in report["test"]["per_level"]]
    predicted = np.array(report["test"]["lost_targets"])
    assert predicted.sum() >= 5  # the case is not trivial
    np.testing.assert_allclose(measured["lost_per_level"], predicted, atol=2)
