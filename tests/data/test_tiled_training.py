"""Training on tiles (solo_d2/data/tiling.py): the crop, the sliver filter and the mapper."""

import cv2
import detectron2.data.transforms as T
import numpy as np
import pytest
from conftest import solo_cfg
from detectron2.structures import BoxMode

from solo_d2.data.dataset_mapper import SOLODatasetMapper
from solo_d2.data.tiling import TileCrop, mapper_args, tile_annotations, visible_fractions


def test_visible_fractions_by_hand():
    crop = np.array([10, 10, 50, 50])
    boxes = np.array(
        [
            [20, 20, 30, 30],  # inside: 1
            [0, 20, 20, 30],  # half in x: 0.5
            [45, 45, 55, 55],  # a quarter
            [60, 60, 70, 70],  # outside: 0
            [20, 20, 20, 30],  # empty box inside: kept (1)
        ]
    )
    np.testing.assert_allclose(visible_fractions(boxes, crop), [1, 0.5, 0.25, 0, 1])


def test_tile_crop_holds_the_chosen_instance_and_has_the_tile_size():
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    aug = TileCrop(64, 1.0, whole_prob=0.0, instance_prob=1.0, whole=T.ResizeShortestEdge(100))
    box = np.array([[350.0, 250.0, 360.0, 260.0]])  # near the bottom-right corner
    for seed in range(20):
        np.random.seed(seed)
        t = aug.get_transform(image, box)
        assert isinstance(t, T.CropTransform) and (t.w, t.h) == (64, 64)
        assert t.x0 <= 355 < t.x0 + 64 and t.y0 <= 255 < t.y0 + 64  # the box's centre
        assert t.x0 + 64 <= 400 and t.y0 + 64 <= 300  # inside the image


def test_tile_crop_scale_whole_images_and_small_images():
    image = np.zeros((300, 400, 3), dtype=np.uint8)
    whole = T.ResizeShortestEdge(100, 1000)
    t = TileCrop(64, 2.0, 0.0, 0.0, whole).get_transform(image, None)
    assert t.apply_image(image).shape == (128, 128, 3)  # the crop, resized x2
    t = TileCrop(64, 2.0, 1.0, 0.0, whole).get_transform(image, None)  # always whole
    assert t.apply_image(image).shape == (100, 133, 3)
    small = np.zeros((50, 60, 3), dtype=np.uint8)  # fits in one tile: whole, resized as usual
    assert TileCrop(64, 2.0, 0.0, 1.0, whole).get_transform(small, None).apply_image(
        small
    ).shape == (100, 120, 3)


def test_tile_annotations_only_after_a_crop():
    annos = [
        {"bbox": [20, 20, 10, 10], "bbox_mode": BoxMode.XYWH_ABS},  # inside
        {"bbox": [45, 20, 10, 10], "bbox_mode": BoxMode.XYWH_ABS},  # half inside (x 45-55)
        {"bbox": [48, 20, 10, 10], "bbox_mode": BoxMode.XYWH_ABS},  # 0.2 inside
    ]
    d = {"annotations": list(annos)}
    tile_annotations(d, T.TransformList([T.CropTransform(0, 0, 50, 50)]), 0.3)
    assert d["annotations"] == annos[:2]
    d = {"annotations": list(annos)}
    tile_annotations(d, T.TransformList([T.HFlipTransform(100)]), 0.3)  # not cropped
    assert d["annotations"] == annos


def _rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_mapper_trains_on_tiles(tmp_path):
    """A 200 x 300 image, 64-px tiles at x1.5: the input is the 96-px tile, instances clipped to
    it with boxes from the clipped masks, and the cut one with 20% inside dropped."""
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.full((200, 300, 3), 128, dtype=np.uint8))
    cfg = solo_cfg(
        "SOLOv2_R18_quickstart_shapes.yaml",
        [
            "INPUT.TILE.TRAIN", True, "INPUT.TILE.SIZE", 64, "INPUT.TILE.SCALE", 1.5,
            "INPUT.TILE.WHOLE_IMAGE_PROB", 0.0, "INPUT.TILE.INSTANCE_PROB", 0.0,
            "INPUT.RANDOM_FLIP", "none",
        ],
    )  # fmt: skip
    mapper = SOLODatasetMapper(cfg, is_train=True)
    assert isinstance(mapper.augmentations.augs[0], TileCrop) and mapper.recompute_boxes

    def ann(x0, y0, x1, y1):
        box = [x0, y0, x1 - x0, y1 - y0]
        poly = _rect_poly(x0, y0, x1, y1)
        return {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                "segmentation": poly, "iscrowd": 0}  # fmt: skip

    annos = [ann(10, 10, 30, 30), ann(50, 40, 70, 60), ann(60, 10, 110, 20)]
    d = {"file_name": str(path), "height": 200, "width": 300, "image_id": 1, "annotations": annos}
    np.random.seed(0)
    out = mapper(d)  # a random crop
    assert tuple(out["image"].shape) == (3, 96, 96)
    assert (out["instances"].gt_boxes.tensor <= 96).all()
    # a known crop: (0, 0) - (64, 64)
    aug = mapper.augmentations.augs[0]
    aug.get_transform = lambda image, boxes=None: T.TransformList(
        [T.CropTransform(0, 0, 64, 64), T.ResizeTransform(64, 64, 96, 96)]
    )
    out = mapper(d)
    inst = out["instances"]
    # the first inside, the second cut (14 of 20 px wide inside: 0.7 kept), the third 4 of 50
    # px inside (0.08 < MIN_VISIBLE 0.3): dropped
    assert len(inst) == 2
    boxes = inst.gt_boxes.tensor.round().tolist()
    assert boxes[0] == [15, 15, 45, 45]  # x1.5
    assert boxes[1] == [75, 60, 96, 90]  # clipped at the tile's edge (64 * 1.5)


@pytest.mark.parametrize(
    "opts,match",
    [
        (["INPUT.TILE.TRAIN", True, "INPUT.CROP.ENABLED", True], "INPUT.CROP.ENABLED"),
        (["INPUT.TILE.TRAIN", True, "INPUT.TILE.INSTANCE_PROB", 2.0], "INSTANCE_PROB"),
    ],
)
def test_bad_training_tile_config(opts, match):
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml", opts)
    with pytest.raises(ValueError, match=match):
        mapper_args(cfg, True, [T.ResizeShortestEdge(100)])


def test_test_mapper_keeps_full_resolution(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.full((200, 300, 3), 128, dtype=np.uint8))
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml", ["INPUT.TILE.TEST", True])
    out = SOLODatasetMapper(cfg, is_train=False)({"file_name": str(path), "height": 200,
                                                   "width": 300, "image_id": 1})  # fmt: skip
    assert tuple(out["image"].shape) == (3, 200, 300)
    cfg = solo_cfg("SOLOv2_R18_quickstart_shapes.yaml")  # untiled: the test resize
    out = SOLODatasetMapper(cfg, is_train=False)({"file_name": str(path), "height": 200,
                                                   "width": 300, "image_id": 1})  # fmt: skip
    assert tuple(out["image"].shape[1:]) == T.ResizeShortestEdge.get_output_shape(
        200, 300, 288, 416
    )
