"""LVIS-format data: ``--dataset NAME=lvis:ANNOTATIONS.json:IMAGE_DIR``, detectron2's builtin LVIS
dicts through the SOLO mapper, and repeat-factor sampling."""

import copy
import json
import math
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json
from detectron2.data.samplers import RepeatFactorTrainingSampler
from PIL import Image

from solo_d2.data.dataset_mapper import SOLODatasetMapper
from solo_d2.data.faults import DatasetError
from solo_d2.data.lvis import parse_lvis_spec, register_lvis_dataset
from solo_d2.data.record import dataset_record
from solo_d2.engine import Trainer
from solo_d2.engine.cli import register_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def name() -> Iterator[str]:
    """A dataset name unique to the test (the catalogs are global), unregistered afterwards."""
    name = f"test_lvis_{uuid.uuid4().hex[:12]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _box_ann(ann_id, image_id, category_id, x, y, w, h):
    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": w * h,
        "segmentation": [poly],
    }


# Categories with non-contiguous ids: 3 ("cat_f", frequent), 7 ("cat_c"), 20 ("cat_r", rare).
CATEGORIES = [
    {"id": 20, "name": "cat_r", "frequency": "r", "image_count": 1, "synonyms": ["cat_r"]},
    {"id": 3, "name": "cat_f", "frequency": "f", "image_count": 4, "synonyms": ["cat_f"]},
    {"id": 7, "name": "cat_c", "frequency": "c", "synonyms": ["cat_c"]},  # no image_count
]


def lvis_dict():
    """Four 40 x 48 images: category 3 in all, 7 in images 2 and 3, 20 in image 1.

    Image 1 is found by file_name, 2 by coco_url's file name, 3 by coco_url's split folder and
    file name, 4 by file_name; image 4 lists negative and not-exhaustive categories.
    """
    images = [
        {"id": 1, "file_name": "a.png", "height": 40, "width": 48},
        {"id": 2, "coco_url": "http://images.example.org/val2017/b.png", "height": 40, "width": 48},
        {"id": 3, "coco_url": "http://images.example.org/train2017/c.png", "height": 40,
         "width": 48},
        {"id": 4, "file_name": "d.png", "height": 40, "width": 48, "neg_category_ids": [20],
         "not_exhaustive_category_ids": [7, 3]},
    ]  # fmt: skip
    anns = [
        _box_ann(1, 1, 3, 2, 2, 20, 20),
        _box_ann(2, 1, 20, 24, 10, 16, 20),
        _box_ann(3, 2, 3, 4, 4, 24, 24),
        _box_ann(4, 2, 7, 30, 20, 12, 12),
        _box_ann(5, 3, 3, 10, 8, 20, 22),
        _box_ann(6, 3, 7, 1, 1, 8, 8),
        _box_ann(7, 4, 3, 5, 5, 30, 30),
    ]
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def write_lvis(root: Path, data: dict) -> str:
    """Write the images of lvis_dict() (c.png in train2017/) and ``data`` as root/lvis.json;
    the spec body ``lvis:JSON:IMAGE_DIR``."""
    images = root / "images"
    (images / "train2017").mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    for path in ("a.png", "b.png", "train2017/c.png", "d.png"):
        Image.fromarray(pixels).save(images / path)
    (root / "lvis.json").write_text(json.dumps(data))
    return f"lvis:{root / 'lvis.json'}:{images}"


def test_parse_lvis_spec():
    assert parse_lvis_spec("x=lvis:/a:b/c.json:/imgs") == ("x", "/a:b/c.json", "/imgs")
    with pytest.raises(ValueError, match="NAME=lvis:ANNOTATIONS.json:IMAGE_DIR"):
        parse_lvis_spec("x=lvis:only.json")


def test_register_lvis_dataset(name, tmp_path):
    spec = f"{name}={write_lvis(tmp_path, lvis_dict())}"
    assert register_dataset(spec) == name  # dispatched on the "lvis:" prefix
    assert register_lvis_dataset(spec) == name  # same files: a no-op
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "lvis"
    assert meta.thing_classes == ["cat_f", "cat_c", "cat_r"]  # by increasing id
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 20: 2}
    assert meta.class_frequency == ["f", "c", "r"]
    # the file's image_count; for category 7, which has none, the images annotated with it
    assert meta.class_image_count == [
        {"id": 3, "image_count": 4},
        {"id": 7, "image_count": 2},
        {"id": 20, "image_count": 1},
    ]
    assert dataset_record(name).faults == ()
    assert meta.json_file == str(tmp_path / "lvis.json")
    dicts = DatasetCatalog.get(name)
    files = [Path(d["file_name"]).relative_to(tmp_path / "images").as_posix() for d in dicts]
    assert files == ["a.png", "b.png", "train2017/c.png", "d.png"]
    assert [sorted(a["category_id"] for a in d["annotations"]) for d in dicts] == [
        [0, 2], [0, 1], [0, 1], [0]
    ]  # fmt: skip
    assert [d["neg_category_ids"] for d in dicts] == [[], [], [], [20]]  # the file's ids
    assert dicts[3]["not_exhaustive_category_ids"] == [7, 3]


def test_faults_are_left_out_like_coco(name, tmp_path):
    data = lvis_dict()
    data["images"][3]["file_name"] = "missing.png"
    data["annotations"][1]["segmentation"] = []  # image 1's rare annotation
    spec = f"{name}={write_lvis(tmp_path, data)}"
    register_lvis_dataset(spec)
    faults = dataset_record(name).faults
    assert sorted(f.kind for f in faults) == ["empty_segmentation", "missing_image_file"]
    assert any("missing.png not found" in f.message for f in faults)
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    assert [a["id"] for a in dicts[0]["annotations"]] == [1]
    # the image count of a category without image_count counts the kept annotations only
    assert MetadataCatalog.get(name).class_image_count[1] == {"id": 7, "image_count": 2}


def _spec_error(tmp_path, name, change):
    data = lvis_dict()
    change(data)
    spec = f"{name}={write_lvis(tmp_path, data)}"
    with pytest.raises(DatasetError) as info:
        register_lvis_dataset(spec)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "lvis.json") in message
    assert name not in DatasetCatalog.list()
    return message


@pytest.mark.parametrize(
    "change, phrase",
    [
        (lambda d: d["categories"][0].pop("frequency"),
         "category id 20 ('cat_r') has frequency None"),
        (lambda d: d["categories"][1].update(frequency="x"), "'r' (rare), 'c' (common) or 'f'"),
        (lambda d: d["categories"][1].update(image_count=-1), "image_count -1"),
        (lambda d: d["images"][3].update(neg_category_ids=5), "neg_category_ids 5, not a list"),
        (lambda d: d["images"][3].update(not_exhaustive_category_ids=[99]),
         "image id 4 lists category ids [99] in not_exhaustive_category_ids"),
        (lambda d: d["images"][1].pop("coco_url"), "neither a 'file_name' nor a 'coco_url'"),
        (lambda d: d["categories"].clear(), "has no categories"),
        (lambda d: d.pop("annotations"), "key 'annotations' is missing"),
    ],
)  # fmt: skip
def test_bad_lvis_fields_are_one_line_errors(tmp_path, name, change, phrase):
    assert phrase in _spec_error(tmp_path, name, change)


def test_bad_spec_paths_are_one_line_errors(tmp_path, name):
    body = write_lvis(tmp_path, lvis_dict())
    images = tmp_path / "images"
    with pytest.raises(FileNotFoundError, match="Annotation file .*nope.json.* does not exist"):
        register_lvis_dataset(f"{name}=lvis:{tmp_path / 'nope.json'}:{images}")
    with pytest.raises(FileNotFoundError, match="Image directory .*nowhere.* does not exist"):
        register_lvis_dataset(f"{name}=lvis:{tmp_path / 'lvis.json'}:{tmp_path / 'nowhere'}")
    with pytest.raises(NotADirectoryError, match="a.png.* is not a directory"):
        register_lvis_dataset(f"{name}=lvis:{tmp_path / 'lvis.json'}:{images / 'a.png'}")
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"bad.json.*is not valid JSON") as info:
        register_lvis_dataset(f"{name}=lvis:{tmp_path / 'bad.json'}:{images}")
    assert "\n" not in str(info.value)
    register_lvis_dataset(f"{name}={body}")
    with pytest.raises(ValueError, match="already registered"):
        register_lvis_dataset(f"{name}=lvis:{tmp_path / 'lvis.json'}:{tmp_path}")


def test_repeat_factors_by_hand(name, tmp_path):
    """r(c) = max(1, sqrt(t / f(c))), f(c) the fraction of images with c; an image's factor is
    the largest of its categories'. Here f = 1 (id 3), 1/2 (id 7), 1/4 (id 20); t = 0.5."""
    register_lvis_dataset(f"{name}={write_lvis(tmp_path, lvis_dict())}")
    dicts = DatasetCatalog.get(name)
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.5)
    r3, r7, r20 = 1.0, 1.0, math.sqrt(0.5 / 0.25)
    expected = [max(r3, r20), max(r3, r7), max(r3, r7), r3]  # images 1..4
    assert factors.tolist() == pytest.approx(expected, abs=1e-6)
    # t = 1: r(7) = sqrt(2), r(20) = 2
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 1.0)
    assert factors.tolist() == pytest.approx([2.0, math.sqrt(2), math.sqrt(2), 1.0], abs=1e-6)


def test_repeat_factor_sampler_with_the_solo_mapper(name, tmp_path):
    register_lvis_dataset(f"{name}={write_lvis(tmp_path, lvis_dict())}")
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.NUM_CLASSES = 3
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    cfg.DATALOADER.REPEAT_THRESHOLD = 1.0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    batch = next(iter(Trainer.build_train_loader(cfg)))
    assert len(batch) == 2
    for item in batch:
        inst = item["instances"]
        assert len(inst) > 0 and inst.gt_classes.max() < 3
        assert inst.has("gt_masks_small") or inst.has("gt_masks")


def test_detectron2_builtin_lvis_dicts_go_through_the_solo_mapper(tmp_path):
    """detectron2's builtin LVIS names are registered with evaluator_type "lvis"; its loader's
    dicts (image under <root><split>/<file> from coco_url, no iscrowd, the per-image lists) are
    accepted by the SOLO mapper."""
    import detectron2.data.datasets  # noqa: F401  (registers the builtin datasets)

    for builtin, classes in (("lvis_v1_train", 1203), ("lvis_v1_val", 1203),
                             ("lvis_v0.5_train", 1230), ("lvis_v0.5_val", 1230)):  # fmt: skip
        meta = MetadataCatalog.get(builtin)
        assert meta.evaluator_type == "lvis" and len(meta.thing_classes) == classes
    data = lvis_dict()
    data["categories"] = [{"id": i, "name": f"c{i}", "frequency": "f"} for i in (1, 2, 3)]
    for ann in data["annotations"]:
        ann["category_id"] = {3: 1, 7: 2, 20: 3}[ann["category_id"]]
    for img in data["images"]:
        img.pop("file_name", None)
        img["coco_url"] = "http://images.example.org/train2017/c.png"
        img.setdefault("neg_category_ids", [])
        img.setdefault("not_exhaustive_category_ids", [])
    write_lvis(tmp_path, data)
    dicts = load_lvis_json(str(tmp_path / "lvis.json"), str(tmp_path / "images") + "/")
    assert "neg_category_ids" in dicts[0] and "iscrowd" not in dicts[0]["annotations"][0]
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    mapper = SOLODatasetMapper(cfg, True)
    out = mapper(copy.deepcopy(dicts[0]))
    assert out["image"].shape[0] == 3
    assert sorted(out["instances"].gt_classes.tolist()) == [0, 2]
    test_out = SOLODatasetMapper(cfg, False)(copy.deepcopy(dicts[1]))
    assert test_out["image_id"] == 2
