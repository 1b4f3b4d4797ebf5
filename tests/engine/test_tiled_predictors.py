"""Tiled inference through the predictors: ``SOLOPredictor`` (PyTorch) and the ONNX Runtime
model, which run the same tiling (solo_d2/modeling/tiling.py) around their one-pass model."""

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.structures import Instances

from solo_d2.config import ConfigError
from solo_d2.engine import SOLOPredictor
from solo_d2.engine.preflight import check_config
from solo_d2.export.runtime import ONNXRuntimeModel
from solo_d2.modeling.tiling import TileSettings


def predictor(**tile):
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.PRIOR_PROB = 0.3  # a random model that detects something
    cfg.INPUT.MIN_SIZE_TEST = 128  # small inputs: fast
    for key, value in tile.items():
        cfg.INPUT.TILE[key] = value
    torch.manual_seed(0)  # the same weights for every predictor
    return SOLOPredictor(cfg)


def test_solo_predictor_tiled_equals_untiled_on_one_tile_and_tiles_larger_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    untiled = predictor()([image])[0]
    tiled_predictor = predictor(TEST=True, SIZE=128)
    tiled = tiled_predictor([image])[0]
    assert len(untiled) > 0
    assert torch.equal(tiled.pred_masks, untiled.pred_masks)
    assert torch.equal(tiled.scores, untiled.scores)
    large = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)  # 2 x 3 tiles
    out = predictor(TEST=True, SIZE=96)([large])[0]
    assert out.image_size == (150, 200) and out.pred_masks.shape[1:] == (150, 200)


class _StubSession:
    """Stands in for an exported model in ONNX Runtime: the pixels of value 200 are one object."""

    def run(self, image):
        masks = (np.asarray(image)[0] == 200)[None]
        present = masks.any(axis=(1, 2))
        return {
            "scores": np.full(int(present.sum()), 0.9, np.float32),
            "classes": np.zeros(int(present.sum()), np.int64),
            "masks": masks[present],
        }


def test_onnx_runtime_model_tiles_around_the_exported_model():
    """An object cut by the tile borders comes out as one instance through the ONNX Runtime
    model's tiling too (its session replaced by a stub: the wiring, not ONNX, is tested)."""
    model = ONNXRuntimeModel.__new__(ONNXRuntimeModel)
    model.batched = False
    model.run = _StubSession().run
    model.tiling = TileSettings(size=64, overlap=0.25, whole_image=False)
    model.max_per_image = 10
    image = torch.zeros((3, 100, 160), dtype=torch.uint8)
    image[:, 10:50, 30:80] = 200  # crosses the tile columns at 48 and 64, rows at 36 and 64
    out = model([{"image": image, "height": 100, "width": 160}])[0]["instances"]
    assert isinstance(out, Instances) and len(out) == 1
    assert out.pred_boxes.tensor[0].tolist() == [30, 10, 80, 50]
    assert int(out.pred_masks[0].sum()) == 40 * 50


def test_preflight_names_a_bad_tile_key():
    cfg = tiny_cfg()
    cfg.INPUT.TILE.TRAIN = True
    cfg.INPUT.TILE.OVERLAP = 0.9
    with pytest.raises(ConfigError, match=r"INPUT.TILE.OVERLAP must be a number in \[0, 0.5\]"):
        check_config(cfg, splits=(), check_weights=False)
    cfg.INPUT.TILE.OVERLAP = 0.25
    check_config(cfg, splits=(), check_weights=False)
