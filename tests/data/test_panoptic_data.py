"""COCO panoptic data: ``--dataset NAME=panoptic:...`` registration, its checks, the builtin-name
adoption, and the mapper's instance and semantic targets (solo_d2/data/panoptic.py)."""

import json
import logging
import uuid

import numpy as np
import pytest
import torch
from conftest import id_to_rgb, solo_cfg, tiny_panoptic_layout, write_tiny_panoptic
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from solo_d2.data.faults import DatasetError
from solo_d2.data.images import BadImageError
from solo_d2.data.panoptic import IGNORE_LABEL, adopt_builtin_panoptic, parse_panoptic_spec
from solo_d2.data.panoptic_mapper import SOLOPanopticDatasetMapper
from solo_d2.data.record import dataset_record
from solo_d2.engine.cli import register_dataset
from solo_d2.modeling.targets import panoptic_targets


def _name() -> str:
    return f"pan_{uuid.uuid4().hex[:8]}"


def _register(tmp_path, **kw) -> str:
    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path, **kw)
    return register_dataset(f"{_name()}=panoptic:{json_file}:{png_dir}:{image_dir}")


def _mapper(is_train: bool, strict: bool = False) -> SOLOPanopticDatasetMapper:
    cfg = solo_cfg(
        "Base-SOLOv2.yaml",
        ["INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MIN_SIZE_TEST", 64, "INPUT.RANDOM_FLIP", "none",
         "DATASETS.STRICT", strict],
    )  # fmt: skip
    return SOLOPanopticDatasetMapper(cfg, is_train)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("a=panoptic:p.json:png:img", ("a", "p.json", "png", "img")),
        ("a=panoptic:C:/x/p.json:png:img", ("a", "C:/x/p.json", "png", "img")),
    ],
)
def test_parse_panoptic_spec(spec, expected):
    assert parse_panoptic_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("=panoptic:a:b:c", "empty dataset name"),
        ("a=panoptic:p.json:img", "needs a JSON file, a PNG folder and an image folder"),
        ("a=panoptic::png:img", "empty panoptic JSON file"),
    ],
)
def test_bad_panoptic_spec_is_named(spec, reason):
    with pytest.raises(ValueError, match=reason) as e:
        parse_panoptic_spec(spec)
    assert "NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR" in str(e.value)


def test_registration_maps_categories_and_segments(tmp_path):
    name = _register(tmp_path)
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco_panoptic_seg"
    # categories sorted by dataset id within each kind: things 3, 5; stuff 11, 20
    assert meta.thing_classes == ["square", "bar"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 5: 1}
    assert meta.stuff_classes == ["things", "sky", "ground"]
    assert meta.stuff_dataset_id_to_contiguous_id == {11: 1, 20: 2}
    assert meta.thing_colors == [[220, 20, 60], [0, 200, 0]]
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [100, 101, 102, 103]
    segs = {s["id"]: s for s in dicts[1]["segments_info"]}
    assert segs[7002]["category_id"] == 1 and segs[7002]["isthing"] is False  # sky
    assert segs[123457]["category_id"] == 1 and segs[123457]["isthing"] is True  # bar
    assert segs[56]["iscrowd"] == 1
    assert dataset_record(name).faults == ()
    # the same files again: a no-op; other files under the same name: an error
    json_file, png_dir, image_dir = meta.panoptic_json, meta.panoptic_root, meta.image_root
    assert register_dataset(f"{name}=panoptic:{json_file}:{png_dir}:{image_dir}") == name
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(f"{name}=panoptic:{json_file}:{image_dir}:{image_dir}")


def test_missing_files_of_a_spec_are_named(tmp_path):
    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path)
    with pytest.raises(FileNotFoundError, match="Panoptic JSON file .*nope.json"):
        register_dataset(f"{_name()}=panoptic:{tmp_path}/nope.json:{png_dir}:{image_dir}")
    with pytest.raises(FileNotFoundError, match="PNG directory .*no_pngs.* does not exist"):
        register_dataset(f"{_name()}=panoptic:{json_file}:{tmp_path}/no_pngs:{image_dir}")
    with pytest.raises(NotADirectoryError, match="Image directory .* is not a directory"):
        register_dataset(f"{_name()}=panoptic:{json_file}:{png_dir}:{json_file}")


def test_unusable_json_is_an_error(tmp_path):
    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path)
    data = json.loads(open(json_file).read())
    data["categories"][0].pop("isthing")
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(
        DatasetError, match=r"category 3 \('square'\) has isthing=None; .* need 'isthing' 0 or 1"
    ):
        register_dataset(f"{_name()}=panoptic:{json_file}:{png_dir}:{image_dir}")


def test_faulty_images_are_left_out_and_named(tmp_path, caplog):
    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path)
    data = json.loads(open(json_file).read())
    (tmp_path / "panoptic" / "0.png").unlink()  # image 100: missing PNG
    data["annotations"][1]["segments_info"][0]["category_id"] = 99  # image 101: unknown category
    data["annotations"][2]["segments_info"][1]["id"] = data["annotations"][2]["segments_info"][0][
        "id"
    ]  # image 102: a segment id used twice
    with open(json_file, "w") as f:
        json.dump(data, f)
    with caplog.at_level(logging.WARNING):
        name = register_dataset(f"{_name()}=panoptic:{json_file}:{png_dir}:{image_dir}")
    faults = dataset_record(name).faults
    assert [(f.kind, f.image_id) for f in faults] == [
        ("missing_png", 100),
        ("bad_segments", 101),
        ("bad_segments", 102),
    ]
    assert "0.png does not exist" in faults[0].message
    assert "category_id 99" in faults[1].message and "1.png" in faults[1].message
    assert "used twice" in faults[2].message
    assert "3 faults; left out 3 of 4 images" in caplog.text
    assert [d["image_id"] for d in DatasetCatalog.get(name)] == [103]


def test_panoptic_targets_by_hand():
    ids = np.array([[0, 7, 7, 9], [5, 5, 7, 9], [5, 8, 8, 9]])
    segments = [
        {"id": 9, "category_id": 2, "isthing": False},  # stuff 2
        {"id": 7, "category_id": 1, "isthing": True},  # thing class 1
        {"id": 5, "category_id": 0, "isthing": True},  # thing class 0
        {"id": 8, "category_id": 0, "isthing": True, "iscrowd": 1},  # crowd: no instance
        {"id": 3, "category_id": 1, "isthing": True},  # no pixel (cropped away): no instance
    ]
    masks, classes, sem_seg = panoptic_targets(ids, segments)
    # instances ordered by segment id: 5 then 7
    assert classes.tolist() == [0, 1]
    assert masks.tolist() == [(ids == 5).tolist(), (ids == 7).tolist()]
    v = IGNORE_LABEL
    assert sem_seg.tolist() == [[v, 0, 0, 2], [0, 0, 0, 2], [0, 0, 0, 2]]
    # an id map with no segment at all
    masks, classes, sem_seg = panoptic_targets(np.zeros((2, 3), dtype=np.int64), [])
    assert masks.shape == (0, 2, 3) and classes.shape == (0,)
    assert (sem_seg == v).all()


def test_mapper_builds_instance_and_semantic_targets(tmp_path):
    name = _register(tmp_path)
    d = DatasetCatalog.get(name)[1]
    out = _mapper(is_train=True)(d)
    ids, _ = tiny_panoptic_layout(64, 96, 1)
    sem = out["sem_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (64, 96)
    assert (sem[:, :2] == IGNORE_LABEL).all()  # the void column
    assert (sem[ids == 7002] == 1).all() and (sem[ids == 90211] == 2).all()  # sky, ground
    assert (sem[ids == 4243] == 0).all() and (sem[ids == 56] == 0).all()  # thing, crowd thing
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [0, 1]  # square (id 4243) then bar (id 123457)
    # the square spans rows 8..28, columns 7..27: its box and its centre of mass
    assert inst.gt_boxes.tensor[0].tolist() == [7.0, 8.0, 28.0, 29.0]
    assert torch.allclose(inst.gt_centers[0], torch.tensor([17.5, 18.5]), atol=0.5)
    assert inst.gt_masks_small.shape[1:] == (16, 24)


def test_mapper_resizes_the_png_with_the_image(tmp_path):
    name = _register(tmp_path)
    cfg = solo_cfg(
        "Base-SOLOv2.yaml", ["INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.RANDOM_FLIP", "none"]
    )
    out = SOLOPanopticDatasetMapper(cfg, True)(DatasetCatalog.get(name)[0])
    assert out["image"].shape[-2:] == out["sem_seg"].shape == (128, 192)
    assert (out["sem_seg"][:, :4] == IGNORE_LABEL).all()  # 2 void columns, scaled x2
    assert set(out["sem_seg"].unique().tolist()) == {0, 1, 2, IGNORE_LABEL}


def _corrupt_png(d: dict, ids: np.ndarray) -> None:
    Image.fromarray(id_to_rgb(ids)).save(d["pan_seg_file_name"])


@pytest.mark.parametrize("problem", ["wrong size", "unknown id", "missing"])
def test_bad_png_is_skipped_in_training_and_an_error_otherwise(tmp_path, problem, caplog):
    name = _register(tmp_path)
    d = DatasetCatalog.get(name)[0]
    ids, _ = tiny_panoptic_layout(64, 96, 0)
    if problem == "wrong size":
        _corrupt_png(d, ids[:32])
        expected = "is a 96x32 panoptic PNG .* but its image .*0.png is 96x64"
    elif problem == "unknown id":
        ids[5, 5] = 31337
        _corrupt_png(d, ids)
        expected = "holds segment ids 31337 that segments_info of image id 100 lacks"
    else:
        (tmp_path / "panoptic" / "0.png").unlink()
        expected = "panoptic PNG does not exist"
    with caplog.at_level(logging.WARNING):
        assert _mapper(is_train=True)(d) is None
    assert "Skipping training image" in caplog.text and "panoptic" in caplog.text
    for mapper in (_mapper(is_train=True, strict=True), _mapper(is_train=False)):
        with pytest.raises(BadImageError, match=expected) as e:
            mapper(d)
        assert str(tmp_path / "panoptic" / "0.png") in str(e.value)


def test_builtin_panoptic_names_are_adopted(tmp_path):
    """detectron2's standard registration (one id space for all categories) is re-registered with
    the project's convention from the same files."""
    from detectron2.data.datasets import register_coco_panoptic

    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path)
    name = _name()
    register_coco_panoptic(name, {}, image_dir, png_dir, json_file, instances_json=None)
    assert adopt_builtin_panoptic([name, "no_such_dataset"]) == [name]
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == ["things", "sky", "ground"]
    assert len(DatasetCatalog.get(name)) == 4
    assert adopt_builtin_panoptic([name]) == []  # already adopted


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda segs: "nope", "'segments_info' is missing or not a list"),
        (lambda segs: segs + [7], "segments_info has 7, not an object"),
        (lambda segs: [{**segs[0], "id": True}] + segs[1:], "segment id True is not an integer"),
        (lambda segs: [{**segs[0], "id": 0}] + segs[1:], "segment id 0 is not an integer"),
        (lambda segs: [{**segs[0], "id": 256**3}] + segs[1:], "is not an integer in 1..16777215"),
        (lambda segs: [{**segs[0], "id": 10**30}] + segs[1:], "is not an integer in 1.."),
        (lambda segs: [{**segs[0], "category_id": [1]}] + segs[1:], "category_id [1], not in"),
        (lambda segs: [{**segs[0], "category_id": 999}] + segs[1:], "category_id 999, not in"),
        (lambda segs: [{**segs[0], "iscrowd": 2}] + segs[1:], "iscrowd=2, not 0 or 1"),
        (lambda segs: segs + [dict(segs[0])], "is used twice"),
        (lambda segs: [{**segs[0], "iscrowd": True}] + segs[1:], {"iscrowd": 1}),  # kept
        (lambda segs: [{**segs[0], "bbox": "x", "area": None}] + segs[1:], {}),  # kept, no box
    ],
)
def test_the_segment_screen_names_what_the_one_by_one_check_names(tmp_path, change, problem):
    """The segments of all images are checked with array operations; an image they refuse gets the
    message of the one-by-one check, and an image they keep has the same segments as before."""
    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path)
    data = json.loads(open(json_file).read())
    before = data["annotations"][1]["segments_info"]
    data["annotations"][1]["segments_info"] = change([dict(s) for s in before])
    with open(json_file, "w") as f:
        json.dump(data, f)
    name = register_dataset(f"{_name()}=panoptic:{json_file}:{png_dir}:{image_dir}")
    faults = dataset_record(name).faults
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(name)}
    if isinstance(problem, dict):  # kept: the segment as the layout has it
        assert faults == () and len(dicts) == 4
        kept = dicts[101]["segments_info"]
        assert [s["id"] for s in kept] == [s["id"] for s in before]
        assert set(kept[0]) == {"id", "category_id", "iscrowd", "isthing"} | set(problem) | (
            {"bbox", "area"} if problem else set()
        )
        assert all(kept[0][k] == v for k, v in problem.items())
        return
    assert [(f.kind, f.image_id) for f in faults] == [("bad_segments", 101)]
    assert problem in faults[0].message and "1.png" in faults[0].message
    assert sorted(dicts) == [100, 102, 103]
