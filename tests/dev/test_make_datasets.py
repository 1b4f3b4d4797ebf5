"""dev/make_datasets.py: the four non-shapes datasets' images and annotations are consistent."""

import numpy as np
import pytest
from pycocotools import mask as mask_util

from dev.make_datasets import DATASETS, make_image


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_images_and_masks_agree(name):
    spec = DATASETS[name]
    num_classes = spec.get("num_classes", len(spec["outlines"]) * spec["hues"])
    img, anns = make_image(np.random.default_rng(0), spec, num_classes)
    h, w = img.shape[:2]
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert 1 <= len(anns) <= spec["count"][1]
    for a in anns:
        rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode("ascii"))
        m = mask_util.decode(rle)
        assert m.shape == (h, w) and m.sum() == a["area"] > 0
        x, y, bw, bh = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, bw, bh) == (
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        )
        assert 1 <= a["category_id"] <= num_classes and a["iscrowd"] == 0
