"""dev/score_distribution.py: matched and unmatched detection scores, RQ at each paste threshold;
and the panoptic paste threshold default those measurements set (docs/your_data.md)."""

import inspect
import json

import numpy as np
import pytest
from conftest import solo_cfg
from pycocotools import mask as mask_util

from dev.score_distribution import THRESHOLDS, matched_scores, recognition_quality
from solo_d2.modeling.panoptic import PanopticSOLO


def test_recognition_quality_by_hand():
    # 4 ground-truth objects; matched detections score 0.35, 0.25, 0.15; unmatched 0.6, 0.12
    rq = recognition_quality(np.array([0.35, 0.25, 0.15]), np.array([0.6, 0.12]), 4)
    assert set(rq) == set(THRESHOLDS)
    assert rq[0.5] == 0.0  # TP 0, FP 1, FN 4
    assert rq[0.3] == pytest.approx(1 / (1 + 0.5 + 1.5))  # TP 1, FP 1, FN 3
    assert rq[0.2] == pytest.approx(2 / (2 + 0.5 + 1.0))
    assert rq[0.1] == pytest.approx(3 / (3 + 1.0 + 0.5))


def test_matched_scores_from_coco_files(tmp_path):
    m = np.zeros((40, 40), np.uint8, order="F")
    m[5:25, 5:25] = 1
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    gt = {
        "images": [{"id": 1, "width": 40, "height": 40, "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                         "area": 400.0, "bbox": [5, 5, 20, 20], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }  # fmt: skip
    far = np.zeros((40, 40), np.uint8, order="F")
    far[30:38, 30:38] = 1
    far_rle = mask_util.encode(far)
    far_rle["counts"] = far_rle["counts"].decode("ascii")
    results = [
        {"image_id": 1, "category_id": 1, "segmentation": rle, "score": 0.3},  # match
        {"image_id": 1, "category_id": 2, "segmentation": rle, "score": 0.7},  # wrong class
        {"image_id": 1, "category_id": 1, "segmentation": far_rle, "score": 0.2},  # no overlap
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    matched, unmatched, num_gt = matched_scores(
        str(tmp_path / "gt.json"), str(tmp_path / "res.json")
    )
    assert matched.tolist() == [0.3] and sorted(unmatched.tolist()) == [0.2, 0.7] and num_gt == 1


def test_paste_threshold_default_suits_matrix_nms_scores():
    # measured: RQ of the things peaks at 0.2 (docs/your_data.md); the model's own default agrees
    assert solo_cfg().MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH == 0.2
    default = inspect.signature(PanopticSOLO.__init__).parameters["instances_score_threshold"]
    assert default.default == 0.2
    for name in ("SOLOv2_R50_3x_panoptic.yaml", "SOLOv2_R18_quickstart_panoptic_shapes.yaml"):
        assert solo_cfg(name).MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH == 0.2, name
