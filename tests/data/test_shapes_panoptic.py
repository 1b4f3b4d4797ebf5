"""Tests of the synthetic shapes panoptic dataset: COCO panoptic validity (PNG ids against
segments_info), layout, determinism, caching and registration."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from solo_d2.data.panoptic import panoptic_things_coco
from solo_d2.data.shapes import MIN_VISIBLE_AREA, SHAPES_CLASSES
from solo_d2.data.shapes_panoptic import (
    STUFF,
    STUFF_CLASSES,
    STUFF_HUES,
    THING_IDS,
    generate_shapes_panoptic,
    register_shapes_panoptic,
)

NUM_IMAGES = 30
STUFF_IDS = {name: cid for name, (cid, _) in STUFF.items()}


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 30-image split generated once for the content tests: (its folder, its JSON)."""
    root = tmp_path_factory.mktemp("shapes_panoptic")
    json_file = Path(generate_shapes_panoptic(str(root), "train", NUM_IMAGES, 0))
    return root, json.loads(json_file.read_text())


def read_ids(png: Path) -> np.ndarray:
    """Segment ids of a panoptic PNG: R + 256 G + 256^2 B (read as RGB with PIL)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def images_and_ids(root: Path, data: dict):
    """(image entry, annotation, decoded id map) per image of the split."""
    anns = {a["image_id"]: a for a in data["annotations"]}
    for image in data["images"]:
        ann = anns[image["id"]]
        yield image, ann, read_ids(root / "train_panoptic" / ann["file_name"])


def all_files(folder: Path) -> dict[str, bytes]:
    """Relative path -> contents of the files under ``folder``, lock files left out."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.suffix != ".lock")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate_shapes_panoptic(str(tmp_path / name), "val", 8, seed)
    a, b, c = (all_files(tmp_path / name) for name in "abc")
    assert len(a) == 1 + 2 * 8 and not any(name.endswith(".tmp") for name in a)
    assert a == b
    assert a["val.json"] != c["val.json"]
    assert a["val_panoptic/000000.png"] != c["val_panoptic/000000.png"]


def test_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    json_file = Path(generate_shapes_panoptic(str(tmp_path), "val", 4, seed=3))
    image, png = tmp_path / "val" / "000000.jpg", tmp_path / "val_panoptic" / "000000.png"
    stamps = [p.stat().st_mtime_ns for p in (json_file, image, png)]
    assert generate_shapes_panoptic(str(tmp_path), "val", 4, seed=3) == str(json_file)
    assert [p.stat().st_mtime_ns for p in (json_file, image, png)] == stamps
    # Other parameters, a damaged JSON, a missing image or a missing PNG regenerate the split.
    generate_shapes_panoptic(str(tmp_path), "val", 5, seed=3)
    assert len(json.loads(json_file.read_text())["annotations"]) == 5
    json_file.write_text('{"images": [')
    generate_shapes_panoptic(str(tmp_path), "val", 5, seed=3)
    assert json.loads(json_file.read_text())["info"]["num_images"] == 5
    for missing in (image, png):
        missing.unlink()
        generate_shapes_panoptic(str(tmp_path), "val", 5, seed=3)
        assert missing.is_file()


def test_categories_have_non_contiguous_ids(split: tuple[Path, dict]) -> None:
    categories = split[1]["categories"]
    things = [c for c in categories if c["isthing"] == 1]
    stuff = [c for c in categories if c["isthing"] == 0]
    assert len(things) + len(stuff) == len(categories)
    assert [c["name"] for c in things] == list(SHAPES_CLASSES)
    assert [c["id"] for c in things] == list(THING_IDS) == [1, 2, 3, 5]
    assert [c["name"] for c in stuff] == list(STUFF_CLASSES)
    assert [c["id"] for c in stuff] == [101, 102, 104, 107]
    for c in categories:
        assert c["supercategory"] and len(c["color"]) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])


def test_files_and_sizes(split: tuple[Path, dict]) -> None:
    root, data = split
    assert [im["id"] for im in data["images"]] == list(range(1, NUM_IMAGES + 1))
    assert sorted(a["image_id"] for a in data["annotations"]) == list(range(1, NUM_IMAGES + 1))
    for image, ann, ids in images_and_ids(root, data):
        assert Path(image["file_name"]).stem == Path(ann["file_name"]).stem  # COCO convention
        assert image["file_name"].endswith(".jpg") and ann["file_name"].endswith(".png")
        img = cv2.imread(str(root / "train" / image["file_name"]))
        assert img.shape == (image["height"], image["width"], 3)
        assert ids.shape == img.shape[:2]
        assert 160 <= min(img.shape[:2]) <= 256


def test_png_ids_match_segments_info(split: tuple[Path, dict]) -> None:
    """Every non-zero PNG id has a segment and every segment has pixels; areas and bboxes (COCO
    panoptic convention: [x, y, w, h] of the inclusive pixel extent) agree with the PNG."""
    root, data = split
    cats = {c["id"]: c for c in data["categories"]}
    all_ids = []
    for _, ann, ids in images_and_ids(root, data):
        segments = ann["segments_info"]
        seg_ids = [s["id"] for s in segments]
        assert len(set(seg_ids)) == len(seg_ids)
        assert set(np.unique(ids).tolist()) - {0} == set(seg_ids)
        for s in segments:
            mask = ids == s["id"]
            ys, xs = np.nonzero(mask)
            assert s["area"] == mask.sum() >= MIN_VISIBLE_AREA
            assert s["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            assert s["category_id"] in cats and s["iscrowd"] in (0, 1)
            assert not s["iscrowd"] or cats[s["category_id"]]["isthing"]
        stuff = [s["category_id"] for s in segments if not cats[s["category_id"]]["isthing"]]
        assert stuff and len(set(stuff)) == len(stuff)  # at most one segment per stuff class
        all_ids += seg_ids
    # arbitrary ids, not 1..n: they use the G and B channels of the PNG
    assert min(all_ids) > 255 and max(all_ids) >= 256**2 and max(all_ids) < 256**3


def test_stuff_layout_and_colours(split: tuple[Path, dict]) -> None:
    """Sky is above the ground classes; each stuff class has its hue and appears often."""
    root, data = split
    seen = {name: 0 for name in STUFF_CLASSES}
    for image, ann, ids in images_and_ids(root, data):
        img = cv2.imread(str(root / "train" / image["file_name"]))
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float64)
        rows = {}
        for s in ann["segments_info"]:
            name = next((n for n, cid in STUFF_IDS.items() if cid == s["category_id"]), None)
            if name is None:
                continue
            seen[name] += 1
            mask = cv2.erode((ids == s["id"]).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            rows[name] = np.nonzero(ids == s["id"])[0].mean()
            if mask.sum() < 200:
                continue
            angle = hsv[..., 0][mask] * np.pi / 90  # OpenCV hue (0-180) as radians
            hue = np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) / 2 % 180
            lo, hi = STUFF_HUES[name]
            # clouds, glints and JPEG blur move the mean a little; thing pixels are not in masks
            assert lo - 8 <= hue <= hi + 8, (image["file_name"], name, hue)
        for ground in ("grass", "sand", "water"):
            if "sky" in rows and ground in rows:
                assert rows["sky"] < rows[ground]
    assert all(n >= NUM_IMAGES // 4 for n in seen.values()), seen
    assert seen["sky"] < NUM_IMAGES  # some images look down, without sky


def test_things_void_crowds_and_empty_images(split: tuple[Path, dict]) -> None:
    root, data = split
    thing_ids = set(THING_IDS)
    without_things, crowds, with_void, occluded = 0, 0, 0, 0
    for _, ann, ids in images_and_ids(root, data):
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        without_things += not things
        crowds += sum(s["iscrowd"] for s in things)
        void = np.mean(ids == 0)
        with_void += void > 0
        assert void < 0.15
        for s in things:  # a thing split in parts by shapes on top of it
            mask = (ids == s["id"]).astype(np.uint8)
            occluded += cv2.connectedComponents(mask, connectivity=8)[0] - 1 > 1
    assert 1 <= without_things <= 0.3 * NUM_IMAGES
    assert crowds >= 2
    assert with_void >= NUM_IMAGES // 2
    assert occluded >= 1


def test_register_shapes_panoptic(tmp_path: Path) -> None:
    pytest.importorskip("solo_d2.data.panoptic")
    for name in ("shapes_panoptic_train", "shapes_panoptic_val"):  # drop earlier registrations
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_shapes_panoptic(str(tmp_path))
    register_shapes_panoptic(str(tmp_path))
    root = tmp_path / "shapes_panoptic"
    meta = MetadataCatalog.get("shapes_panoptic_val")
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.panoptic_json == str(root / "val.json")
    assert meta.panoptic_root == str(root / "val_panoptic")
    assert meta.image_root == str(root / "val")
    assert not meta.get("json_file")  # would make COCOEvaluator treat it as instances
    assert meta.thing_classes == list(SHAPES_CLASSES)
    assert meta.stuff_classes == ["things"] + list(STUFF_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 5: 3}
    assert meta.stuff_dataset_id_to_contiguous_id == {101: 1, 102: 2, 104: 3, 107: 4}
    assert len(meta.thing_colors) == 4 and len(meta.stuff_colors) == 5
    assert not Path(meta.panoptic_json).exists()  # generated lazily

    dicts = DatasetCatalog.get("shapes_panoptic_val")
    assert len(dicts) == 50 and Path(meta.panoptic_json).is_file()
    assert not (root / "train.json").exists()  # each split is generated on its own first use
    for d in dicts:
        assert Path(d["file_name"]).is_file() and Path(d["pan_seg_file_name"]).is_file()
        ids = read_ids(Path(d["pan_seg_file_name"]))
        assert ids.shape == (d["height"], d["width"])
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in d["segments_info"]}
        for s in d["segments_info"]:
            if s["isthing"]:
                assert 0 <= s["category_id"] < len(SHAPES_CLASSES)
            else:
                assert 1 <= s["category_id"] <= len(STUFF_CLASSES) and not s["iscrowd"]
    assert any(not any(s["isthing"] for s in d["segments_info"]) for d in dicts)

    # the things as COCO instances (the instance AP beside PQ): one per thing segment
    coco = panoptic_things_coco("shapes_panoptic_val")
    things = [s for d in dicts for s in d["segments_info"] if s["isthing"]]
    assert len(coco["annotations"]) == len(things) and len(coco["images"]) == 50
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 5]
    assert sum(a["iscrowd"] for a in coco["annotations"]) == sum(s["iscrowd"] for s in things)


def test_entry_points_register_the_panoptic_splits(tmp_path: Path, monkeypatch) -> None:
    """The entry points' registration (train_net.py, demo, tools) registers both kinds of shapes
    datasets; ``register_shapes`` itself registers only the instance splits."""
    import argparse

    from solo_d2.engine.cli import register_datasets_from_args

    for name in ("shapes_panoptic_train", "shapes_panoptic_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    monkeypatch.setenv("SOLO_D2_DATASETS", str(tmp_path))
    assert register_datasets_from_args(argparse.Namespace(dataset=[])) == []
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"shapes_panoptic_{split}")
        assert meta.panoptic_json == str(tmp_path / "shapes_panoptic" / f"{split}.json")
