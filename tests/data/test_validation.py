"""Faulty COCO annotations: checks, registration, training (skip or strict) and evaluation."""

import copy
import json
import logging
import os
import uuid

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from PIL import Image

from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.dataset_dicts import clean_coco_dict
from solo_d2.data.dataset_mapper import SOLODatasetMapper
from solo_d2.data.faults import DatasetError
from solo_d2.data.record import dataset_record
from solo_d2.data.training_data import report_training_faults
from solo_d2.data.validation import LISTED_FOLDER_FILES, check_coco_dict, files_exist
from solo_d2.engine.trainer import Trainer

H, W = 40, 60
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]  # area 400


def _ann(ann_id, image_id=1, category_id=1, bbox=(10, 10, 20, 20), segm=SQUARE, **extra):
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox)}
    if segm is not None:  # a flat list of numbers is one polygon
        flat = isinstance(segm, list) and segm and not isinstance(segm[0], list)
        ann["segmentation"] = [segm] if flat else segm
    ann.update(extra)
    return ann


def _rle(size, counts):
    return {"size": list(size), "counts": counts}


# annotation id -> (annotation, expected fault kind or None when it is kept)
ANNOTATION_CASES = {
    10: (_ann(10), None),
    11: (_ann(11, segm=[]), "empty_segmentation"),
    12: (_ann(12, segm=[[10.0, 10.0, 20.0, 20.0]]), "bad_polygons"),  # 2 points
    13: (_ann(13, segm=[[10.0, 10.0, 20.0, 20.0, 30.0]]), "bad_polygons"),  # odd length
    14: (_ann(14, segm=_rle((20, 30), [0, 600])), "bad_rle"),  # size differs from 40 x 60
    15: (_ann(15, segm=_rle((H, W), [0, 100, 50])), "bad_rle"),  # counts cover 150 != 2400
    16: (
        _ann(16, bbox=(100, 10, 20, 20), segm=[100.0, 10, 120, 10, 120, 30]),
        "bbox_outside_image",
    ),
    17: (_ann(17, bbox=(50, 10, 30, 20), segm=[50.0, 10, 80, 10, 80, 30, 50, 30]), None),  # partly
    18: (_ann(18, segm=[10.0, 10.0, 20.0, 20.0, 30.0, 30.0]), "zero_area_mask"),  # collinear
    19: (_ann(19, segm=_rle((H, W), [H * W])), "zero_area_mask"),
    20: (_ann(20, category_id=2), "unknown_category"),
    21: (_ann(21, image_id=99), "unknown_image"),
    22: (_ann(22, segm=None), "no_segmentation"),
    23: (_ann(23, bbox=(10, 10, -5, 20)), "bad_bbox"),
    24: (_ann(24, bbox=(10, 10, 20)), "bad_bbox"),
    25: (_ann(25, segm=[SQUARE, [1.0, 1.0, 2.0, 2.0]]), "dropped_polygons"),  # kept, 1 polygon
    26: (_ann(26, segm="not a mask"), "bad_segmentation"),
    27: (_ann(27, segm=[10.0, 10.0, float("nan"), 10.0, 30.0, 30.0]), "bad_polygons"),
    28: (_ann(28, image_id=2, segm=_rle((H, W), [100, 300, H * W - 400]), iscrowd=1), None),
    29: (_ann(29, image_id=3), None),  # its image file is missing: left out with the image
    30: (_ann(30, image_id=4, category_id=3), None),
}
KEPT_ON_IMAGE_1 = {10, 17, 25}


def coco_dict():
    images = [
        {"id": 1, "file_name": "many.png", "height": H, "width": W},
        {"id": 2, "file_name": "crowd_only.png", "height": H, "width": W},
        {"id": 3, "file_name": "missing.png", "height": H, "width": W},
        {"id": 4, "file_name": "good.png", "height": H, "width": W},
    ]
    return {
        "images": images,
        "annotations": [copy.deepcopy(a) for a, _ in ANNOTATION_CASES.values()],
        "categories": [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}],
    }


@pytest.fixture(scope="module")
def faulty_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("many.png", "crowd_only.png", "good.png"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images / name)
    ann = root / "faulty.json"
    ann.write_text(json.dumps(coco_dict()))
    return ann, images


@pytest.fixture
def registered(faulty_dataset, caplog):
    name = f"faulty_{uuid.uuid4().hex[:8]}"
    ann, images = faulty_dataset
    with caplog.at_level(logging.WARNING, logger="solo_d2"):
        register_coco_dataset(f"{name}={ann}:{images}")
    yield name, caplog.text
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


@pytest.mark.parametrize("ann_id", sorted(ANNOTATION_CASES))
def test_each_annotation_case(ann_id, faulty_dataset):
    ann, images = faulty_dataset
    checked = check_coco_dict(coco_dict(), str(ann), str(images))
    kinds = {f.kind for f in checked.faults if f.annotation_id == ann_id}
    expected = ANNOTATION_CASES[ann_id][1]
    assert kinds == ({expected} if expected else set())
    left_out = expected not in (None, "dropped_polygons")
    assert (ann_id in checked.bad_annotations) == left_out
    for fault in checked.faults:
        if fault.annotation_id == ann_id:
            text = str(fault)
            assert f"annotation id {ann_id}" in text
            if expected != "unknown_image":
                image_id = ANNOTATION_CASES[ann_id][0]["image_id"]
                assert f"image id {image_id}" in text and ".png" in text


def test_missing_image_file_is_a_fault_and_crowd_only_images_are_not(faulty_dataset):
    ann, images = faulty_dataset
    checked = check_coco_dict(coco_dict(), str(ann), str(images))
    [missing] = [f for f in checked.faults if f.kind == "missing_image_file"]
    assert missing.image_id == 3 and "missing.png" in str(missing)
    assert checked.bad_images == {3}
    assert not any(f.image_id == 2 for f in checked.faults)


def _fatal(mutate):
    data = coco_dict()
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate, phrase",
    [
        (
            lambda d: d["images"].append(dict(d["images"][0], file_name="x.png")),
            "image id 1 is used twice",
        ),
        (
            lambda d: d["annotations"].append(dict(d["annotations"][0])),
            "annotation id 10 is used twice",
        ),
        (lambda d: d["categories"].append({"id": 1, "name": "dup"}), "category id 1 is used twice"),
        (lambda d: d["images"][1].pop("height"), "images[1] (id 2) has no 'height'"),
        (lambda d: d["images"][1].update(width=0), "height=40, width=0"),
        (lambda d: d["images"][1].update(id=[2]), "images[1] has id [2]"),
        (lambda d: d["annotations"][3].pop("id"), "annotations[3] has no integer 'id'"),
        (lambda d: d["categories"].clear(), "has no categories"),
        (lambda d: d["categories"][0].pop("name"), "categories[0]"),
    ],
)
def test_unusable_files_are_errors_naming_the_entry(mutate, phrase):
    with pytest.raises(DatasetError) as e:
        check_coco_dict(_fatal(mutate), "/data/ann.json")
    assert phrase in str(e.value) and "/data/ann.json" in str(e.value)


def test_registration_reports_and_drops_faults(registered, faulty_dataset):
    name, log = registered
    assert "Dataset" in log and "faults" in log and "DATASETS.STRICT" in log
    assert "annotation id 11, image id 1, file many.png: 'segmentation' is an empty list" in log
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["circle", "square"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
    expected_faults = sum(1 for _, kind in ANNOTATION_CASES.values() if kind) + 1  # + image 3
    assert len(dataset_record(name).faults) == expected_faults
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(name)}
    assert sorted(dicts) == [1, 2, 4]
    assert {a["id"] for a in dicts[1]["annotations"]} == KEPT_ON_IMAGE_1
    assert [a["category_id"] for a in dicts[4]["annotations"]] == [1]
    [kept_25] = [a for a in dicts[1]["annotations"] if a["id"] == 25]
    assert kept_25["segmentation"] == [SQUARE]


def test_training_skips_faults_or_stops_when_strict(registered, tmp_path, caplog):
    name, _ = registered
    cfg = tiny_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="solo_d2"):
        report_training_faults(cfg, [name])
    listing = tmp_path / f"data_faults_{name}.json"
    assert str(listing) in caplog.text
    assert {f["annotation_id"] for f in json.loads(listing.read_text())} >= {11, 12, 14}

    cfg.DATASETS.STRICT = True
    with pytest.raises(DatasetError) as e:
        report_training_faults(cfg, [name])
    assert "DATASETS.STRICT" in str(e.value) and "annotation id 11" in str(e.value)

    cfg.DATASETS.STRICT = False
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    mapper = SOLODatasetMapper(cfg, True)
    counts = {d["image_id"]: len(mapper(d)["instances"]) for d in DatasetCatalog.get(name)}
    assert counts == {1: len(KEPT_ON_IMAGE_1), 2: 0, 4: 1}  # the crowd-only image: no instance


def test_mapper_skips_unusable_annotations_of_other_loaders(tmp_path, caplog):
    """Datasets registered elsewhere are not checked on load; the mapper still copes."""
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(image)
    good = {"id": 1, "bbox": [10, 10, 20, 20], "bbox_mode": 1, "category_id": 0,
            "segmentation": [SQUARE], "iscrowd": 0}  # fmt: skip
    no_mask = dict(good, id=2, segmentation=[])
    bad_rle = dict(good, id=3, segmentation={"size": [20, 30], "counts": b"0"})
    record = {"file_name": str(image), "height": H, "width": W, "image_id": 5,
              "annotations": [good, no_mask, bad_rle]}  # fmt: skip
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (40,)
    with caplog.at_level(logging.WARNING, logger="solo_d2"):
        out = SOLODatasetMapper(cfg, True)(record)
    assert len(out["instances"]) == 1
    assert "annotation id 2 of image id 5" in caplog.text and "no segmentation" in caplog.text
    assert "annotation id 3 of image id 5" in caplog.text
    cfg.DATASETS.STRICT = True
    with pytest.raises(ValueError, match="annotation id 2 of image id 5"):
        SOLODatasetMapper(cfg, True)(record)


def test_evaluation_reports_faults_and_uses_the_checked_ground_truth(registered, tmp_path, caplog):
    name, _ = registered
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.NUM_CLASSES = 2
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.DATALOADER.NUM_WORKERS = 0
    with caplog.at_level(logging.WARNING):
        evaluator = Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path))
    assert f"Evaluation data {name!r}" in caplog.text and "annotation id 11" in caplog.text
    gt = evaluator._coco_api
    assert sorted(gt.getImgIds()) == [1, 2, 4]
    assert sorted(gt.getAnnIds()) == sorted(KEPT_ON_IMAGE_1 | {28, 30})
    areas = {a["id"]: a["area"] for a in gt.dataset["annotations"]}  # filled in: COCOeval needs
    assert areas[10] == 400 and areas[17] == 200  # pixels; 17 is clipped by the image border
    assert clean_coco_dict(coco_dict(), check_coco_dict(coco_dict(), "x"))["annotations"]

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    results = inference_on_dataset(model, Trainer.build_test_loader(cfg, name), evaluator)
    assert set(results) == {"segm", "bbox"}
    assert results["segm"]["AP"] >= 0 and results["bbox"]["AP"] >= 0
    faults = json.loads((tmp_path / "data_faults.json").read_text())
    assert len(faults) == len(dataset_record(name).faults)
    written = json.loads((tmp_path / "evaluation_results.json").read_text())
    assert written == {
        task: {k: None if np.isnan(v) else v for k, v in metrics.items()}
        for task, metrics in results.items()
    }


@pytest.mark.parametrize("many", [False, True])
def test_files_exist_answers_as_isfile(tmp_path, many, monkeypatch):
    """Listed folders (many paths in them) and stat'ed ones give os.path.isfile's answers."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "dir.jpg").mkdir()  # a folder named like an image
    filler = [f"f{i}.jpg" for i in range(LISTED_FOLDER_FILES if many else 2)]
    for name in filler + ["sub/a.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path / "f0.jpg", tmp_path / "link.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    names = filler + [
        "sub/a.jpg", "sub/b.jpg", "link.jpg", "broken.jpg", "dir.jpg", "missing.jpg",
        "nofolder/x.jpg", "sub/../f1.jpg", str(tmp_path / "f0.jpg"),
    ]  # fmt: skip
    expected = [os.path.isfile(os.path.join(tmp_path, n)) for n in names]
    listings = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listings.append(path) or scandir(path))
    assert files_exist(str(tmp_path), names) == expected
    assert listings == ([str(tmp_path)] if many else [])  # the folder of many, listed once
    assert expected[-9:] == [True, False, True, False, False, False, False, True, True]
