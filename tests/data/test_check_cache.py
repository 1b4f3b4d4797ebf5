"""Each annotation file content is checked once: the check's outcome is kept and reused
(solo_d2.data.check_cache, solo_d2.data.check_cache.read_and_check)."""

import json
import logging
import os
import uuid

import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from solo_d2.data import check_cache, validation
from solo_d2.data.check_cache import read_and_check
from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.faults import DataFault
from solo_d2.data.record import dataset_record
from solo_d2.data.validation import CheckedCOCO

H, W = 40, 60
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]


def _write(root, annotations) -> tuple:
    images = root / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (W, H)).save(images / "a.png")
    ann = root / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    return str(ann), str(images)


def _ann(ann_id, **extra):
    return {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
            "segmentation": [SQUARE], **extra}  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(check_cache.CACHE_ENV, str(folder))
    return folder / "dataset_checks"


@pytest.fixture
def count_reads(monkeypatch):
    reads = []
    original = validation.read_coco_json

    def counting(json_file, what=""):
        reads.append(json_file)
        return original(json_file, what)

    monkeypatch.setattr(validation, "read_coco_json", counting)
    return reads


def test_a_file_is_checked_once_then_not_read_to_register(tmp_path, cache, count_reads):
    ann, images = _write(tmp_path, [_ann(1), _ann(2, category_id=7), _ann("x", segmentation=[])])
    _, first, _ = read_and_check(ann, images, 10**8, need_data=False)
    assert len(count_reads) == 1 and len(list(cache.iterdir())) == 1
    _, again, _ = read_and_check(ann, images, 10**8, need_data=False)
    assert len(count_reads) == 1  # the outcome was reused: the file was not read
    assert again.faults == first.faults and again.key == first.key
    assert (again.bad_annotations, again.id_map) == ({2, "x"}, {1: 0})
    data, loaded, _ = read_and_check(ann, images, 10**8, with_faults=False)
    assert len(count_reads) == 2 and len(data["annotations"]) == 3  # read, not checked again
    assert loaded.faults is None and loaded.num_faults == 2
    # another parameter is another check
    read_and_check(ann, images, 10**9, need_data=False)
    assert len(count_reads) == 3 and len(list(cache.iterdir())) == 2


def test_an_edited_file_is_checked_again(tmp_path, cache):
    ann, images = _write(tmp_path, [_ann(1)])
    _, before, _ = read_and_check(ann, images, need_data=False)
    _write(tmp_path, [_ann(1), _ann(2, category_id=7)])
    os.utime(ann, ns=(os.stat(ann).st_atime_ns, os.stat(ann).st_mtime_ns + 10**9))
    _, after, _ = read_and_check(ann, images, need_data=False)
    assert (before.num_faults, after.num_faults) == (0, 1) and before.key != after.key


def test_the_loader_warns_when_the_file_changed_since_registration(tmp_path, cache, caplog):
    ann, images = _write(tmp_path, [_ann(1)])
    name = register_coco_dataset(f"cached_{uuid.uuid4().hex[:8]}={ann}:{images}")
    assert dataset_record(name).check_key
    with caplog.at_level(logging.WARNING, logger="solo_d2"):
        assert len(DatasetCatalog.get(name)[0]["annotations"]) == 1
        assert "changed since it was registered" not in caplog.text
        _write(tmp_path, [_ann(1), _ann(2), _ann(3, category_id=7)])
        os.utime(ann, ns=(os.stat(ann).st_atime_ns, os.stat(ann).st_mtime_ns + 10**9))
        assert len(DatasetCatalog.get(name)[0]["annotations"]) == 2
    assert "changed since it was registered; it now has 1 faults" in caplog.text


def test_the_cache_can_be_off_and_an_unwritable_folder_only_warns(tmp_path, monkeypatch, caplog):
    ann, images = _write(tmp_path, [_ann(1)])
    monkeypatch.setenv(check_cache.CACHE_ENV, "off")
    assert check_cache.cache_dir() is None
    assert read_and_check(ann, images, need_data=False)[1].num_faults == 0
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(check_cache.CACHE_ENV, str(blocker))  # its dataset_checks/ can't be made
    with caplog.at_level(logging.WARNING, logger="solo_d2"):
        assert read_and_check(ann, images, need_data=False)[1].num_faults == 0
    assert "Cannot write the dataset check cache" in caplog.text


def test_the_outcome_round_trips_through_json_with_its_id_types():
    faults = [
        DataFault("unknown_category", "category_id 7 ...", "a.json", 1, 2, "a.png"),
        DataFault("empty_segmentation", "shared", "a.json", "img", "ann", None),
        DataFault("empty_segmentation", "shared", "a.json", None, 5, None),
    ]
    checked = CheckedCOCO(["a", "b"], {1: 0, 5: 1}, faults, {"img"}, {2, "ann", 5},
                          {9: [SQUARE]}, 3, 10, 3)  # fmt: skip
    back = CheckedCOCO.from_json(json.loads(json.dumps(checked.to_json())))
    assert back == checked
    # 2 kinds, 2 messages, 1 annotation file, 1 image file: each stored once
    assert len(checked.to_json()["faults"]["strings"]) == 6
