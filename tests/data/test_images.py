"""Odd and broken image files: reading, the training/evaluation mapper and the model (CPU).

The image "zoo" (also used by tests/demo/test_demo.py): grayscale, 1-bit, palette, gray+alpha, RGBA,
16-bit gray and 16-bit RGB PNGs, 32-bit float TIFF, a CMYK JPEG, EXIF-rotated JPEGs, 1x1 and 16x16
images; and broken files: truncated JPEG and PNG, a text file named .jpg, an empty .png, a
missing file, a folder named .jpg.
"""

import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import cv2
import numpy as np
import pytest
import torch
from conftest import IMAGE_ZOO_GRAY16 as GRAY16
from conftest import IMAGE_ZOO_RGB as RGB
from conftest import tiny_cfg, write_image_zoo
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.dataset_mapper import SOLODatasetMapper
from solo_d2.data.images import BadImageError, image_size, read_image
from solo_d2.engine import Trainer


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    good, bad = write_image_zoo(folder)
    return folder, good, bad


def test_every_good_image_reads_as_3_channel_uint8(zoo):
    folder, good, _ = zoo
    for name, hw in good.items():
        for fmt in ("BGR", "RGB"):
            image = read_image(str(folder / name), fmt)
            assert image.shape == (*hw, 3) and image.dtype == np.uint8, name
        assert image_size(str(folder / name)) == hw, name


def test_sixteen_bit_png_is_scaled_not_clipped(zoo):
    folder = zoo[0]
    assert Image.open(folder / "gray16.png").mode == "I;16"
    image = read_image(str(folder / "gray16.png"), "RGB")
    expected = (GRAY16 >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(image[:, :, c], expected)
    # clipping (what Image.convert("RGB") does) would make almost every pixel 255
    assert (image == 255).mean() < 0.05
    rgb = read_image(str(folder / "rgb16.png"), "RGB").astype(int)
    for c, divisor in enumerate((1, 2, 4)):
        assert np.abs(rgb[:, :, c] - ((GRAY16 // divisor) >> 8)).max() <= 1


def test_cmyk_and_alpha_images_keep_their_colours(zoo):
    folder = zoo[0]
    cmyk = read_image(str(folder / "cmyk.jpg"), "RGB").astype(int)
    assert np.abs(cmyk - RGB).mean() < 20  # JPEG is lossy; an inverted CMYK would be ~128 off
    rgba = read_image(str(folder / "rgba.png"), "RGB")
    np.testing.assert_array_equal(rgba, RGB)
    bgr = read_image(str(folder / "rgba.png"), "BGR")
    np.testing.assert_array_equal(bgr, RGB[:, :, ::-1])


def test_exif_orientation_is_applied(zoo):
    folder = zoo[0]
    rotated = read_image(str(folder / "exif_rotated_90.jpg"), "RGB")[:, :, 0].astype(int)
    # orientation 6: displayed rotated 90 degrees clockwise, the white left quarter is on top
    assert rotated[:8].mean() > 240 and rotated[12:].mean() < 15
    flipped = read_image(str(folder / "exif_rotated_180.jpg"), "RGB")[:, :, 0].astype(int)
    assert flipped[:, -8:].mean() > 240 and flipped[:, :28].mean() < 15


def test_bad_files_raise_an_error_naming_the_file_and_the_problem(zoo):
    folder, _, bad = zoo
    for name, reason in bad.items():
        path = str(folder / name)
        with pytest.raises(BadImageError) as e:
            read_image(path)
        assert path in str(e.value) and reason in str(e.value), str(e.value)
        assert isinstance(e.value, ValueError)


def _mapper_cfg():
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    return cfg


def _record(folder: Path, name: str, hw: Tuple[int, int], image_id: int) -> dict:
    """A dataset dict with one instance: a rectangle over the middle of the image."""
    h, w = hw
    x0, y0, x1, y1 = w * 0.2, h * 0.2, max(w * 0.8, 1.0), max(h * 0.8, 1.0)
    if (h, w) == (1, 1):
        x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    return {
        "file_name": str(folder / name),
        "height": h,
        "width": w,
        "image_id": image_id,
        "annotations": [
            {
                "id": 100 + image_id,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "bbox_mode": 1,  # XYWH_ABS
                "category_id": image_id % 3,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                "iscrowd": 0,
            }
        ],
    }


def test_mapper_and_model_take_every_odd_image(zoo):
    """Train and test mapping of each good image, then a training step and inference on them."""
    folder, good, _ = zoo
    cfg = _mapper_cfg()
    train_mapper, test_mapper = SOLODatasetMapper(cfg, True), SOLODatasetMapper(cfg, False)
    train_batch, test_batch = [], []
    for i, (name, hw) in enumerate(good.items()):
        out = train_mapper(_record(folder, name, hw, i))
        assert out is not None and out["image"].shape[0] == 3, name
        assert len(out["instances"]) == 1, name
        train_batch.append(out)
        test = test_mapper(_record(folder, name, hw, i))
        assert "annotations" not in test and (test["height"], test["width"]) == hw
        test_batch.append(test)

    torch.manual_seed(0)
    model = build_model(cfg)
    with EventStorage(0):
        losses = model(train_batch)
    assert set(losses) == {"loss_cls", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model(test_batch)
    for (name, hw), out in zip(good.items(), outputs):
        assert out["instances"].image_size == hw, name
        assert out["instances"].pred_masks.shape[1:] == hw, name


def test_bad_training_image_is_skipped_with_a_warning_naming_it(zoo, caplog):
    folder, _, bad = zoo
    cfg = _mapper_cfg()
    mapper = SOLODatasetMapper(cfg, True)
    for i, name in enumerate(bad):
        record = _record(folder, name, (24, 32), 50 + i)
        with caplog.at_level(logging.WARNING, logger="solo_d2"):
            assert mapper(record) is None
        assert str(folder / name) in caplog.text and f"image id {50 + i}" in caplog.text
        assert bad[name] in caplog.text
        caplog.clear()

    cfg.DATASETS.STRICT = True
    strict = SOLODatasetMapper(cfg, True)
    with pytest.raises(BadImageError, match="truncated or corrupt"):
        strict(_record(folder, "truncated_jpg.jpg", (24, 32), 0))
    # evaluation never skips silently: the image would be missing from the results
    with pytest.raises(BadImageError, match="not an image file"):
        SOLODatasetMapper(_mapper_cfg(), False)(_record(folder, "text.jpg", (24, 32), 0))


def test_training_stops_when_no_image_can_be_read(zoo):
    folder, _, _ = zoo
    mapper = SOLODatasetMapper(_mapper_cfg(), True)
    record = _record(folder, "missing.jpg", (24, 32), 7)
    with pytest.raises(BadImageError, match="none of the 50 training images"):
        for _ in range(50):
            mapper(record)


def test_size_mismatch_from_exif_is_explained(zoo):
    folder = zoo[0]
    # the annotation tool measured the stored pixels (40 wide, 20 high), not the displayed ones
    record = _record(folder, "exif_rotated_90.jpg", (20, 40), 3)
    with pytest.raises(BadImageError) as e:
        SOLODatasetMapper(_mapper_cfg(), False)(record)
    message = str(e.value)
    assert "exif_rotated_90.jpg" in message and "image id 3" in message
    assert "20x40" in message and "40x20" in message and "EXIF orientation" in message


LARGE_HW = (6000, 8000)
# Peak memory evaluating an 8000 x 6000 image may add to evaluating an 800 x 600 one (5 detections:
# 48 MB per full-size mask, 144 MB for the RGB image). Measured: 0.39 GB; 1.19 GB when the mask
# resizing held 16 full-size float masks at once.
LARGE_IMAGE_EXTRA_RSS = 0.8e9


def measure_evaluation_memory(root: str) -> None:
    """Child action: evaluate the "small" then the "large" dataset of ``root``; print peak RSS."""
    cfg = _mapper_cfg()
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    cfg.DATALOADER.NUM_WORKERS = 0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # every class scores ~0.99 and masks cover the image: 5 detections
        model.ins_head.cate_pred.bias.fill_(5.0)
        model.ins_head.kernel_pred.bias.fill_(1.0)
    report = {}
    for size in ("small", "large"):
        name = register_coco_dataset(f"eval_{size}={root}/{size}.json:{root}")
        out = f"{root}/eval_{size}"
        evaluator = Trainer.build_evaluator(cfg, name, output_folder=out)
        results = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
        with open(f"{out}/coco_instances_results.json") as f:
            predictions = json.load(f)
        report[size] = {
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "segm_ap": results["segm"]["AP"],
            "mask_sizes": [p["segmentation"]["size"] for p in predictions],
        }
    print("REPORT " + json.dumps(report))


@pytest.mark.e2e  # an evaluation of an 8000 x 6000 image in a child process (~7 s)
def test_large_image_evaluation_with_bounded_memory(tmp_path):
    for size, (h, w) in (("small", (600, 800)), ("large", LARGE_HW)):
        image = np.zeros((h, w, 3), np.uint8)
        x0, y0, x1, y1 = w // 4, h // 4, 3 * w // 4, 3 * h // 4
        image[y0:y1, x0:x1] = (30, 200, 90)
        cv2.imwrite(str(tmp_path / f"{size}.jpg"), image)
        coco = {
            "images": [{"id": 1, "file_name": f"{size}.jpg", "height": h, "width": w}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                 "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
            ],
            "categories": [{"id": i, "name": f"class{i}"} for i in (1, 2, 3)],
        }  # fmt: skip
        (tmp_path / f"{size}.json").write_text(json.dumps(coco))
    here = Path(__file__).resolve().parent
    paths = [str(here), str(here.parent)]  # this module, and tests/ for its conftest helpers
    code = (
        f"import sys; sys.path[:0] = {paths!r}; import test_images as t; "
        f"t.measure_evaluation_memory({str(tmp_path)!r})"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [line] = [x for x in res.stdout.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line[len("REPORT ") :])
    assert report["large"]["mask_sizes"] == [list(LARGE_HW)] * 5
    assert report["small"]["mask_sizes"] == [[600, 800]] * 5
    assert 0 <= report["large"]["segm_ap"] <= 100
    extra = report["large"]["peak_rss"] - report["small"]["peak_rss"]
    print(f"evaluation peak RSS: {report['small']['peak_rss'] / 1e9:.2f} GB (800 x 600), "
          f"{report['large']['peak_rss'] / 1e9:.2f} GB (then 8000 x 6000)")  # fmt: skip
    assert extra < LARGE_IMAGE_EXTRA_RSS, f"peak RSS {extra / 1e9:.2f} GB above a small image's"
