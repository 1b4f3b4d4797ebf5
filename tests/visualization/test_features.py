"""Pictures of what a model computes on one image (solo_d2.visualization.features), every head."""

import cv2
import numpy as np
import pytest
import torch
from conftest import confident_tiny_model

from solo_d2.modeling.postprocessing import resize_masks
from solo_d2.visualization.features import (
    instance_cells,
    mosaic,
    normalize_channels,
    run_model,
    write_feature_pictures,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
# (height, width) of each picture of the 96 x 128 input with the default tile (96) and panel (320)
# sizes; the soft masks of the tiny models are at stride 4 (24 x 32 -> tiles of 72 x 96):
SIZES = {
    # 32 channels in 6 columns of 96 + 2 px and 6 rows of 72 + 2 px (less the last gap) + 22 px
    "mask_features.png": (6 * 74 - 2 + 22, 6 * 98 - 2),
    # 5 levels x 8 cells, rows 72 + 4 px apart, + 22 px
    "level_masks.png": (5 * 76 - 4 + 22, 8 * 98 - 2),
    # 10 rows (X and Y per level) of tiles 54 x 72 (3/4 of 96), rows 58 px apart, 12 columns
    "decoupled_xy.png": (10 * 58 - 4 + 22, 12 * 74 - 2),
    # 5 panels of 240 x 320 (the canvas at most 320 px) + 22 px title, 6 px apart; legend 24 px
    "category_grids.png": (240 + 22 + 24, 5 * 326 - 6),
    # the input twice, 6 px apart (262 px) scaled up to 420 px wide (154 px high), + 36 px
    "instance_00.png": (154 + 36, 420),
}
FIRST = {
    "SOLOv2InstanceHead": "mask_features.png",
    "SOLOInstanceHead": "level_masks.png",
    "DecoupledSOLOInstanceHead": "decoupled_xy.png",
    "DecoupledSOLOLightInstanceHead": "decoupled_xy.png",
}


@pytest.mark.parametrize("head", list(FIRST))
def test_pictures_of_every_head(head, tmp_path):
    model = confident_tiny_model(head)
    summary = write_feature_pictures(
        model, IMAGE, str(tmp_path), class_names=["a", "b", "c"], max_instances=3
    )
    assert summary["head"] == head and summary["input_hw"] == [96, 128]
    assert summary["num_instances"] == 100  # confident_tiny_model's promise
    names = [FIRST[head], "category_grids.png", "instance_00.png", "instance_01.png",
             "instance_02.png"]  # fmt: skip
    assert summary["files"] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        image = cv2.imread(str(tmp_path / name))
        assert image is not None, name
        assert image.shape[:2] == SIZES.get(name, SIZES["instance_00.png"]), name
    # each instance's cell was found: its mask, resized as the model does, is the final mask
    assert len(summary["instances"]) == 3
    for record in summary["instances"]:
        assert record["class"] in ("a", "b", "c") and record["level"] in ("P2", "P3", "P4", "P5",
                                                                          "P6")  # fmt: skip
        assert record["iou"] >= 0.99, record


def test_instance_cells_are_the_cells_of_the_final_masks():
    """The recovered cells' masks give back the final masks, and their category scores are at
    least the final scores (maskness and Matrix NMS only lower them)."""
    model = confident_tiny_model("SOLOv2InstanceHead")
    view = run_model(model, IMAGE)
    cells, ious = instance_cells(view, 5)
    assert (cells >= 0).all() and (ious >= 0.99).all()
    inst = view.instances[:5]
    masks = resize_masks(
        view.soft_masks(torch.as_tensor(cells)), view.canvas_hw, (96, 128), (96, 128),
        view.mask_threshold,
    )  # fmt: skip
    agree = (masks == inst.pred_masks).flatten(1).float().mean(1)
    assert (agree >= 0.99).all()
    assert (view.cate[cells, inst.pred_classes] >= inst.scores * (1 - 1e-5)).all()
    # the view is the model's own inference
    with torch.no_grad():
        eager = model([{"image": torch.as_tensor(IMAGE.transpose(2, 0, 1)).float()}])[0]
    assert torch.equal(eager["instances"].scores, view.instances.scores)


def test_random_model_without_detections_draws_the_maps(tmp_path):
    """An untrained model (classifier at its prior, 0.01) detects nothing: the feature maps and
    the (empty) category grids are drawn, no instance picture."""
    from conftest import tiny_cfg
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    summary = write_feature_pictures(model, IMAGE, str(tmp_path))
    assert summary["num_instances"] == 0 and summary["instances"] == []
    assert summary["files"] == ["mask_features.png", "category_grids.png"]


def test_drawing_helpers():
    x = np.stack([np.arange(12.0).reshape(3, 4), np.full((3, 4), 7.0)])
    n = normalize_channels(x)
    assert n[0].min() == 0 and n[0].max() == 1 and (n[1] == 0).all()  # a flat channel is 0
    tiles = np.zeros((5, 4, 6, 3), dtype=np.uint8)
    out = mosaic(tiles, cols=3, pad=2)
    assert out.shape == (2 * 6 - 2, 3 * 8 - 2, 3)
    assert (out[4:6] == 255).all() and (out[6:, 16:] == 255).all()  # gap and empty sixth place
    assert (out[:4, :6] == 0).all()
