"""Tests of the synthetic shapes dataset: determinism, COCO validity, content and registration."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from solo_d2.data.shapes import (
    CLASS_HUES,
    HUE_JITTER,
    SHAPES_CLASSES,
    SPLITS,
    generate_shapes,
    register_shapes,
)

NUM_IMAGES = 40


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 40-image split generated once for the content tests."""
    return generate_shapes(str(tmp_path_factory.mktemp("shapes")), "train", NUM_IMAGES, 0)


@pytest.fixture(scope="module")
def shapes(shapes_json: str) -> COCO:
    return COCO(shapes_json)


def read_image(json_file: str, image: dict) -> np.ndarray:
    """The image of a ``<split>.json`` entry, read from ``<split>/``."""
    return cv2.imread(str(Path(json_file).with_suffix("") / image["file_name"]), cv2.IMREAD_COLOR)


def non_crowd_masks(coco: COCO, image_id: int) -> list[tuple[dict, np.ndarray]]:
    """(annotation, decoded boolean mask) of the non-crowd annotations of an image."""
    anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
    return [(a, coco.annToMask(a).astype(bool)) for a in anns]


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    a = generate_shapes(str(tmp_path / "a"), "val", 12, seed=5)
    b = generate_shapes(str(tmp_path / "b"), "val", 12, seed=5)
    c = generate_shapes(str(tmp_path / "c"), "val", 12, seed=6)
    assert Path(a).read_bytes() == Path(b).read_bytes()
    assert Path(a).read_bytes() != Path(c).read_bytes()
    for image in json.loads(Path(a).read_text())["images"]:
        np.testing.assert_array_equal(read_image(a, image), read_image(b, image))
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    json_file = Path(generate_shapes(str(tmp_path), "val", 6, seed=3))
    first_image = tmp_path / "val" / "000000.png"
    stamps = json_file.stat().st_mtime_ns, first_image.stat().st_mtime_ns
    assert generate_shapes(str(tmp_path), "val", 6, seed=3) == str(json_file)
    assert (json_file.stat().st_mtime_ns, first_image.stat().st_mtime_ns) == stamps
    # Other parameters, a damaged json file or a missing image regenerate the split.
    generate_shapes(str(tmp_path), "val", 8, seed=3)
    assert len(json.loads(json_file.read_text())["images"]) == 8
    json_file.write_text('{"images": [')
    generate_shapes(str(tmp_path), "val", 8, seed=3)
    assert json.loads(json_file.read_text())["info"]["num_images"] == 8
    first_image.unlink()
    generate_shapes(str(tmp_path), "val", 8, seed=3)
    assert first_image.is_file()


def test_coco_structure_and_ids(shapes: COCO) -> None:
    data = shapes.dataset
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SHAPES_CLASSES) + 1))
    assert [c["name"] for c in data["categories"]] == list(SHAPES_CLASSES)
    assert [im["id"] for im in data["images"]] == list(range(1, NUM_IMAGES + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    for a in data["annotations"]:
        assert a["image_id"] in shapes.imgs and a["category_id"] in shapes.cats
        assert a["iscrowd"] in (0, 1)


def test_area_and_bbox_match_decoded_masks(shapes: COCO) -> None:
    """``area`` is exactly the decoded mask's pixel count and ``bbox`` exactly its tight XYWH box
    in the pycocotools convention ``[x_min, y_min, x_max - x_min + 1, y_max - y_min + 1]``
    (inclusive pixel indices), for crowd and non-crowd, polygon and RLE annotations alike."""
    for a in shapes.dataset["annotations"]:
        mask = shapes.annToMask(a).astype(bool)
        assert a["area"] == mask.sum() >= 20
        ys, xs = np.nonzero(mask)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_images_are_small_varied_and_noisy(shapes: COCO, shapes_json: str) -> None:
    sizes = set()
    for image in shapes.dataset["images"]:
        img = read_image(shapes_json, image)
        assert img.dtype == np.uint8 and img.shape == (image["height"], image["width"], 3)
        assert 160 <= min(img.shape[:2]) <= 256
        sizes.add(img.shape[:2])
        # Noisy background: neighbouring pixels differ almost everywhere.
        assert np.mean(img[:, 1:] != img[:, :-1]) > 0.5
    assert len(sizes) > NUM_IMAGES // 2
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)
    assert any(h % 2 or w % 2 for h, w in sizes)


def test_classes_have_hue_bands_and_textures_vary(shapes: COCO, shapes_json: str) -> None:
    """Each class keeps to its hue band with varied saturation and brightness; instances are
    solid or textured."""
    hues: dict[int, list[float]] = {}
    values: dict[int, list[float]] = {}
    spread = []
    for image in shapes.dataset["images"]:
        img = read_image(shapes_json, image)
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float64)
        for a, mask in non_crowd_masks(shapes, image["id"]):
            angle = hsv[..., 0][mask] * np.pi / 90  # OpenCV hue (0-180) as radians
            mean_hue = np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) / 2
            hues.setdefault(a["category_id"], []).append(mean_hue % 180)
            values.setdefault(a["category_id"], []).append(hsv[..., 2][mask].mean())
            spread.append(img[mask].astype(np.float64).std(axis=0).mean())
    assert sorted(hues) == list(range(1, len(SHAPES_CLASSES) + 1))
    for cat, cat_hues in hues.items():
        # circular distance (OpenCV hue wraps at 180) to the class's band centre; small shapes
        # blur a little into the background when the image is saved, hence the margin of 3
        diff = (np.array(cat_hues) - CLASS_HUES[cat - 1] + 90) % 180 - 90
        assert np.mean(np.abs(diff) <= HUE_JITTER + 3) > 0.95, (cat, np.round(diff))
        assert np.std(values[cat]) > 15  # brightness varies within a class
    spread = np.array(spread)
    assert np.mean(spread < 10) > 0.1  # solid
    assert np.mean(spread > 20) > 0.3  # stripes, checker, noise


def test_empty_images_and_crowds(shapes: COCO) -> None:
    empty = [i for i in shapes.imgs if not shapes.imgToAnns[i]]
    assert 1 <= len(empty) <= 0.3 * NUM_IMAGES
    crowds = [a for a in shapes.dataset["annotations"] if a["iscrowd"]]
    assert crowds
    for a in crowds:  # COCO stores crowds as uncompressed RLE
        assert isinstance(a["segmentation"]["counts"], list)


def test_polygon_and_rle_masks(shapes: COCO) -> None:
    segms = [a["segmentation"] for a in shapes.dataset["annotations"] if not a["iscrowd"]]
    polygons = [s for s in segms if isinstance(s, list)]
    rles = [s for s in segms if isinstance(s, dict)]
    assert len(polygons) > 0.2 * len(segms) and len(rles) > 0.2 * len(segms)
    for rle in rles:
        assert isinstance(rle["counts"], str) and len(rle["size"]) == 2
    for segm in polygons:
        assert segm and all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in segm)
    assert any(len(segm) > 1 for segm in polygons)  # an occluded object split in parts


def test_occlusion_leaves_visible_disjoint_masks(shapes: COCO) -> None:
    overlapping_boxes = 0
    for image_id in shapes.imgs:
        masks = non_crowd_masks(shapes, image_id)
        for i, (a, mask_a) in enumerate(masks):
            for b, mask_b in masks[i + 1 :]:
                assert not (mask_a & mask_b).any()
                xa, ya, wa, ha = a["bbox"]
                xb, yb, wb, hb = b["bbox"]
                overlapping_boxes += xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha
    assert overlapping_boxes >= 5


def test_object_sizes_span_small_to_large(shapes: COCO) -> None:
    sizes = [np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in shapes.dataset["annotations"]]
    assert min(sizes) < 16 and max(sizes) > 128


def test_register_shapes(tmp_path: Path) -> None:
    for name in ("shapes_train", "shapes_val", "shapes_val_large"):  # drop earlier registrations
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_shapes(str(tmp_path))
    register_shapes(str(tmp_path))
    meta = MetadataCatalog.get("shapes_val")
    assert meta.thing_classes == list(SHAPES_CLASSES)
    assert len(meta.thing_colors) == len(SHAPES_CLASSES)
    assert meta.evaluator_type == "coco"
    assert meta.image_root == str(tmp_path / "shapes" / "val")
    assert not Path(meta.json_file).exists()  # generated lazily

    large = MetadataCatalog.get("shapes_val_large")
    assert large.thing_classes == list(SHAPES_CLASSES) and large.evaluator_type == "coco"
    assert large.image_root == str(tmp_path / "shapes" / "val_large")

    dicts = DatasetCatalog.get("shapes_val")
    assert len(dicts) == 50 and Path(meta.json_file).is_file()
    assert not (tmp_path / "shapes" / "train.json").exists()
    assert not Path(large.json_file).exists()  # each split is generated on its own first use
    anns = [a for d in dicts for a in d["annotations"]]
    assert any(isinstance(a["segmentation"], list) for a in anns)
    assert any(isinstance(a["segmentation"], dict) for a in anns)
    assert any(a["iscrowd"] for a in anns)
    assert any(not d["annotations"] for d in dicts)
    for d in dicts:
        assert Path(d["file_name"]).is_file()
        for a in d["annotations"]:
            segm = a["segmentation"]
            assert (
                isinstance(segm, dict)
                and {"size", "counts"} <= set(segm)
                or all(isinstance(poly, list) and len(poly) >= 6 for poly in segm)
            )


def test_longer_split_of_the_same_seed_starts_with_the_shorter(tmp_path: Path) -> None:
    """What makes shapes_val the first 50 images of shapes_val_large (same seed, more images)."""
    (_, n_val, seed_val), (_, n_large, seed_large) = (
        SPLITS["shapes_val"],
        SPLITS["shapes_val_large"],
    )
    assert seed_large == seed_val and n_large > n_val
    short = json.loads(Path(generate_shapes(str(tmp_path / "a"), "val", 3, seed_val)).read_text())
    long = json.loads(
        Path(generate_shapes(str(tmp_path / "b"), "val_large", 5, seed_large)).read_text()
    )
    assert long["images"][:3] == short["images"] and len(long["images"]) == 5
    n = len(short["annotations"])
    assert long["annotations"][:n] == short["annotations"]
    assert all(a["image_id"] > 3 for a in long["annotations"][n:])
    for im in short["images"]:
        a = cv2.imread(str(tmp_path / "a" / "val" / im["file_name"]))
        b = cv2.imread(str(tmp_path / "b" / "val_large" / im["file_name"]))
        np.testing.assert_array_equal(a, b)
