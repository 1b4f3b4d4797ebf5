"""Packed datasets (solo_d2.data.packed): the training processes map the checked dataset dicts
from arrays on disk instead of reading the annotation file; the vectorised screen of the checks
(solo_d2.data.validation) gives the same outcome as checking every annotation one by one."""

import copy
import json
import logging
import os
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg, write_tiny_panoptic
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from PIL import Image
from test_validation import coco_dict

from solo_d2.data import check_cache, packed, panoptic, validation
from solo_d2.data.check_cache import check_key
from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.dataset_dicts import to_dataset_dicts
from solo_d2.data.lvis import IMAGE_CATEGORY_LISTS, read_and_check_lvis, register_lvis_dataset
from solo_d2.data.record import dataset_record
from solo_d2.data.training_data import packed_train_data
from solo_d2.data.validation import check_coco_dict
from solo_d2.kinds import register_dataset

SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(check_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "dataset_packs"


def _pack_folder(tmp_path, columns, key="k" * 32):
    packed.write_pack(key, str(tmp_path / "a.json"), columns, {"num_faults": 0})
    return packed.open_pack(key)


def _mixed_dataset(str_ids=False):
    """Several images (one without annotations, one crowd only), polygons of 1-3 parts, RLEs
    compressed and not, faults (left out) and a partly bad annotation (kept, a polygon dropped)."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in (5, 2, 9, 7, 3):  # ids out of order: the dicts are sorted by id
        images.append({"id": i, "file_name": f"img{i}.png", "height": 40, "width": 60})
    for n in range(40):
        image = int(rng.choice([5, 2, 7]))  # 9: no annotation
        parts = [
            (SQUARE + rng.integers(0, 5, 8)).tolist() if k % 2 else SQUARE[:6] + [12, 25]
            for k in range(int(rng.integers(1, 4)))
        ]
        ann = {"id": 100 + n, "image_id": image, "category_id": int(rng.choice([1, 3, 8])),
               "bbox": [10, 10, 20, 20.5], "segmentation": parts, "iscrowd": 0}  # fmt: skip
        if n % 9 == 4:
            ann["segmentation"], ann["iscrowd"] = {"size": [40, 60], "counts": [100, 300, 2000]}, 1
        if n % 9 == 5:
            ann["segmentation"] = {"size": [40, 60], "counts": "P3<Q4000"}
        if n % 13 == 6:
            ann["segmentation"] = [SQUARE, [1.0, 2.0]]  # kept, one polygon dropped
        if n % 11 == 7:
            ann["category_id"] = 99  # a fault
        annotations.append(ann)
    annotations.append({**annotations[0], "id": 999, "image_id": 3, "iscrowd": 1,
                        "segmentation": {"size": [40, 60], "counts": [0, 10, 2390]}})  # fmt: skip
    if str_ids:
        for img in images:
            img["id"] = f"i{img['id']}"
        for ann in annotations:
            ann["id"], ann["image_id"] = f"a{ann['id']}", f"i{ann['image_id']}"
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 8)]
    return {"images": images, "annotations": annotations, "categories": cats}


@pytest.mark.parametrize("str_ids", [False, True])
def test_a_pack_gives_the_dataset_dicts(tmp_path, cache, str_ids):
    data = _mixed_dataset(str_ids)
    checked = check_coco_dict(data, "a.json")
    assert checked.faults and checked.kept_polygons  # the case has both
    dicts = to_dataset_dicts(data, checked, "/data/images")
    pack = _pack_folder(tmp_path, packed.pack_dataset(data, checked, "/data/images"))
    assert len(pack) == len(dicts) == 5
    assert pack.to_dicts() == dicts
    assert [type(a["id"]) for d in pack.to_dicts() for a in d["annotations"]] == [
        type(a["id"]) for d in dicts for a in d["annotations"]
    ]
    # pickled (a data loader worker under "spawn"): the folder and indices, not the data
    again = pickle.loads(pickle.dumps(pack.subset([3, 1])))
    assert len(pickle.dumps(pack)) < 1000 and again.to_dicts() == [dicts[3], dicts[1]]


def test_a_crashed_write_leaves_no_pack_and_is_cleaned_up_later(tmp_path, cache, monkeypatch):
    data = _mixed_dataset()
    columns = packed.pack_dataset(data, check_coco_dict(data, "a.json"), "/x")

    def full_disk(path, array, allow_pickle):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(np, "save", full_disk)
        packed.write_pack("a" * 32, str(tmp_path / "a.json"), columns, {"num_faults": 0})
    assert packed.open_pack("a" * 32) is None and os.listdir(cache) == []
    abandoned = cache / ("b" * 32 + ".tmp-0123")  # a process killed while writing
    abandoned.mkdir()
    os.utime(abandoned, (0, 0))
    assert _pack_folder(tmp_path, columns) is not None and not abandoned.exists()


def test_mixed_id_types_are_not_packed():
    data = _mixed_dataset()
    data["images"][0]["id"] = "five"
    for ann in data["annotations"]:
        ann["image_id"] = "five" if ann["image_id"] == 5 else ann["image_id"]
    assert packed.pack_dataset(data, check_coco_dict(data, "a.json"), "/x") is None


def test_filter_histogram_and_repeat_factors_are_detectron2s(tmp_path, cache):
    data = _mixed_dataset()
    checked = check_coco_dict(data, "a.json")
    dicts = to_dataset_dicts(data, checked, "/x")
    pack = _pack_folder(tmp_path, packed.pack_dataset(data, checked, "/x"))
    kept = pack.with_instances()
    assert kept.to_dicts() == filter_images_with_only_crowd_annotations(copy.deepcopy(dicts))
    assert len(kept) == 3  # not 3 (crowd only) nor 9 (none)
    plain = [a["category_id"] for d in dicts for a in d["annotations"] if not a["iscrowd"]]
    assert pack.class_histogram(3).tolist() == np.bincount(plain, minlength=3).tolist()
    for sqrt in (True, False):
        for thresh in (0.3, 0.9):
            expected = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                dicts + dicts[:2], thresh, sqrt
            )
            got = packed.repeat_factors([pack, pack.subset([0, 1])], thresh, sqrt)
            assert torch.allclose(got, expected)


def test_the_screen_and_the_one_by_one_checks_agree(monkeypatch):
    """The vectorised screen passes only annotations without faults; every fault is found by
    the exact checks, with the same message, with or without it."""
    cases = [coco_dict(), _mixed_dataset(), _mixed_dataset(True)]
    hostile = _mixed_dataset()
    odd = [None, True, "3", 2.5, [1], {"a": 1}, float("inf"), -1, 10**30]
    for k, ann in enumerate(hostile["annotations"]):
        field = ("image_id", "category_id", "bbox", "iscrowd", "segmentation")[k % 5]
        ann[field] = odd[k % len(odd)]
        if k % 7 == 3:
            ann["bbox"] = [1, 2, odd[k % len(odd)], 4]
        if k % 7 == 5:
            ann["segmentation"] = [[1.0, 2.0, 30.0, odd[k % len(odd)], 5.0, 30.0]]
    cases.append(hostile)
    mixed = _mixed_dataset()
    images = {img["id"]: img for img in mixed["images"]}
    screened = validation._clean_annotations(mixed["annotations"], images, {1: 0, 3: 1, 8: 2})
    assert screened.sum() >= 20  # the usual annotations pass the screen (RLEs do not)
    for data in cases:
        fast = check_coco_dict(copy.deepcopy(data), "a.json")
        with monkeypatch.context() as m:
            m.setattr(validation, "_clean_annotations", lambda anns, *a: np.zeros(len(anns), bool))
            slow = check_coco_dict(copy.deepcopy(data), "a.json")
        assert fast.faults == slow.faults and fast.bad_annotations == slow.bad_annotations
        assert fast.kept_polygons == slow.kept_polygons
    assert len(fast.faults) > 20


def _write(root, data):
    images = root / "images"
    images.mkdir(exist_ok=True)
    for img in data["images"]:
        Image.new("RGB", (img["width"], img["height"])).save(images / img["file_name"])
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return str(ann), str(images)


def test_registration_packs_and_the_loader_uses_the_pack(tmp_path, cache, monkeypatch):
    ann, images = _write(tmp_path, _mixed_dataset())
    name = register_coco_dataset(f"packed_{uuid.uuid4().hex[:8]}={ann}:{images}")
    key = dataset_record(name).check_key
    assert packed.has_pack(key) and len(os.listdir(cache)) == 1
    expected = to_dataset_dicts(*check_cache.read_and_check(ann, images)[:2], images)

    def no_read(*args, **kwargs):
        raise AssertionError("the annotation file was read")

    with monkeypatch.context() as m:
        m.setattr(validation, "read_coco_json", no_read)
        assert DatasetCatalog.get(name) == expected
        [pack] = packed.open_packs([name])
        assert pack.to_dicts() == expected
    # the file changes: its pack no longer serves; the new registration replaces it
    data = _mixed_dataset()
    data["annotations"] = data["annotations"][:10]
    _write(tmp_path, data)
    os.utime(ann, ns=(os.stat(ann).st_atime_ns, os.stat(ann).st_mtime_ns + 10**9))
    assert packed.open_packs([name]) is None
    other = register_coco_dataset(f"packed_{uuid.uuid4().hex[:8]}={ann}:{images}")
    assert len(os.listdir(cache)) == 1 and packed.open_packs([other]) is not None
    for n in (name, other):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_lvis_packs_keep_the_image_lists(tmp_path, cache):
    data = _mixed_dataset()
    for c, freq in zip(data["categories"], "rcf"):
        c["frequency"] = freq
    data["images"][0]["neg_category_ids"] = [3, 8]
    data["images"][2]["not_exhaustive_category_ids"] = [1]
    ann, images = _write(tmp_path, data)
    name = register_lvis_dataset(f"packed_{uuid.uuid4().hex[:8]}=lvis:{ann}:{images}")
    [pack] = packed.open_packs([name])
    dicts = to_dataset_dicts(*read_and_check_lvis(ann, images)[:2], images, IMAGE_CATEGORY_LISTS)
    assert pack.to_dicts() == dicts and any(d[k] for d in dicts for k in IMAGE_CATEGORY_LISTS)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_the_trainer_maps_packs_with_detectron2s_samplers(tmp_path, cache, caplog):
    ann, images = _write(tmp_path, _mixed_dataset())
    name = register_coco_dataset(f"packed_{uuid.uuid4().hex[:8]}={ann}:{images}")
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = (name, name)
    with caplog.at_level(logging.INFO):
        dataset, sampler = packed_train_data(cfg)
    assert len(dataset) == 6 and isinstance(sampler, TrainingSampler)  # 3 images with instances
    assert "Removed 4 images" in caplog.text and "c8" in caplog.text  # the histogram
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    assert isinstance(packed_train_data(cfg)[1], RepeatFactorTrainingSampler)
    cfg.DATALOADER.SAMPLER_TRAIN = "WeightedTrainingSampler"  # needs the dicts: detectron2 reads
    assert packed_train_data(cfg) == (None, None)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_without_cache_or_with_a_broken_pack_the_file_is_read(tmp_path, cache, monkeypatch):
    ann, images = _write(tmp_path, _mixed_dataset())
    name = register_coco_dataset(f"packed_{uuid.uuid4().hex[:8]}={ann}:{images}")
    expected = DatasetCatalog.get(name)
    key = dataset_record(name).check_key
    (cache / key / "coords.npy").write_bytes(b"truncated")
    packed._mapped.cache_clear()
    assert packed.open_pack(key) is None and DatasetCatalog.get(name) == expected
    monkeypatch.setenv(check_cache.CACHE_ENV, "off")
    assert packed.open_packs([name]) is None and not packed.has_pack(key)
    assert DatasetCatalog.get(name) == expected
    assert check_key("coco", ann, images, dataset_record(name).max_image_pixels) == key
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _panoptic(tmp_path):
    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path, num_images=4)
    data = json.loads(open(json_file).read())
    (tmp_path / "panoptic" / "0.png").unlink()  # a fault: image 100 left out
    data["annotations"][1]["segments_info"][0].pop("bbox", None)  # kept without a box
    with open(json_file, "w") as f:
        json.dump(data, f)
    return f"pan_{uuid.uuid4().hex[:8]}=panoptic:{json_file}:{png_dir}:{image_dir}"


def test_panoptic_datasets_are_packed_checked_once_and_mapped(tmp_path, cache, monkeypatch):
    spec = _panoptic(tmp_path)
    name = register_dataset(spec)
    record = dataset_record(name)
    assert record.kind == "panoptic" and packed.has_pack(record.check_key)
    monkeypatch.setenv(check_cache.CACHE_ENV, "off")  # the reference: read from the JSON
    expected = panoptic.load_panoptic_dicts(*record.files.values(), record.max_image_pixels)
    monkeypatch.setenv(check_cache.CACHE_ENV, str(cache.parent))
    assert len(expected) == 3 and "bbox" not in expected[0]["segments_info"][0]
    assert all(set(s) <= set(panoptic.PANOPTIC_SEGMENT_KEYS) for d in expected
               for s in d["segments_info"])  # fmt: skip

    def no_read(*args, **kwargs):
        raise AssertionError("the panoptic JSON was read")

    with monkeypatch.context() as m:
        m.setattr(panoptic, "read_coco_json", no_read)
        assert DatasetCatalog.get(name) == expected  # from the pack
        # another process registering the same files: the kept check, no read, same faults
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        assert register_dataset(spec) == name
        assert dataset_record(name) == record
        cfg = tiny_cfg()
        cfg.DATASETS.TRAIN = (name,)
        dataset, sampler = packed_train_data(cfg)  # no filtering of panoptic dicts, as detectron2
        assert [dataset[i] for i in range(len(dataset))] == expected
        assert isinstance(sampler, TrainingSampler)
        cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"  # needs classes: the dicts
        assert packed_train_data(cfg) == (None, None)
    # a damaged panoptic pack: one warning, read from the JSON again, packed again
    (cache / record.check_key / "seg_isthing.npy").write_bytes(b"damaged")
    packed._mapped.cache_clear()
    assert packed.open_packs([name]) is None and DatasetCatalog.get(name) == expected
    packed._mapped.cache_clear()
    assert packed.open_pack(record.check_key).to_dicts() == expected
    # a PNG added or removed changes the key: the pack no longer serves the registered name
    (tmp_path / "panoptic" / "extra.png").write_bytes(b"")
    os.utime(tmp_path / "panoptic", ns=(0, os.stat(tmp_path / "panoptic").st_mtime_ns + 10**9))
    assert packed.open_packs([name]) is None
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


class _Payload:
    """Unpickled, it would create the file ``path`` (what an attacker's pickle would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _save(folder, name, array):
    np.save(folder / f"{name}.npy", array, allow_pickle=True)


def _pickle_as_counts(folder, marker):
    """A consistent tampering: the RLE counts are the bytes of a pickle, the offsets fit them."""
    payload = np.frombuffer(pickle.dumps(_Payload(marker)), np.uint8)
    offsets = np.load(folder / "rle_offsets.npy").copy()
    offsets[1:] = len(payload)
    _save(folder, "rle_counts", payload)
    _save(folder, "rle_offsets", offsets)


# Each kind of damage an attacker or a crash can leave: (what is done to the pack folder).
DAMAGE = {
    "pickled object column": lambda f, marker: _save(
        f, "rle_counts", np.array([_Payload(marker)], dtype=object)
    ),
    "pickle bytes as RLE counts": lambda f, marker: _pickle_as_counts(f, marker),
    "truncated file": lambda f, marker: (f / "coords.npy").write_bytes(
        (f / "coords.npy").read_bytes()[:90]
    ),
    "wrong dtype": lambda f, marker: _save(
        f, "ann_category", np.load(f / "ann_category.npy").astype(np.float32)
    ),
    "wrong length": lambda f, marker: _save(f, "ann_bbox", np.load(f / "ann_bbox.npy")[:-1]),
    "offsets out of range": lambda f, marker: _save(
        f, "image_anns", np.load(f / "image_anns.npy") + 5
    ),
    "index out of range": lambda f, marker: _save(
        f, "ann_rle", np.full_like(np.load(f / "ann_rle.npy"), 10**6)
    ),
    "missing file": lambda f, marker: os.remove(f / "polygon_coords.npy"),
    "meta that does not match": lambda f, marker: (f / "meta.json").write_text(
        json.dumps({**json.loads((f / "meta.json").read_text()), "num_images": 1})
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_pack_is_detected_removed_and_rewritten(tmp_path, cache, caplog, damage):
    """Tampered with, truncated or inconsistent: found when the pack is opened, one warning naming
    its folder, the dataset read from its JSON again (the same dicts), the pack written again;
    nothing in the pack runs code (the payload's marker file never appears)."""
    ann, images = _write(tmp_path, _mixed_dataset())
    name = register_coco_dataset(f"packed_{uuid.uuid4().hex[:8]}={ann}:{images}")
    key = dataset_record(name).check_key
    expected = DatasetCatalog.get(name)
    folder, marker = cache / key, tmp_path / "code_ran"
    DAMAGE[damage](folder, marker)
    packed._mapped.cache_clear()
    with caplog.at_level(logging.WARNING, logger="solo_d2.data.packed"):
        opened = packed.open_packs([name])
        dicts = DatasetCatalog.get(name)
    if damage == "pickle bytes as RLE counts":  # consistent: bytes read as bytes, never unpickled
        assert opened is not None
        assert not marker.exists()
        rles = [a["segmentation"] for d in opened[0].to_dicts() for a in d["annotations"]]
        assert all(isinstance(r["counts"], (str, bytes)) for r in rles if isinstance(r, dict))
        return
    assert opened is None and dicts == expected and not marker.exists()
    warnings = [r.getMessage() for r in caplog.records if "is damaged (" in r.getMessage()]
    assert len(warnings) == 1 and str(folder) in warnings[0], warnings
    # read again from the JSON, and packed again: the next process maps a sound pack
    packed._mapped.cache_clear()
    assert packed.has_pack(key) and packed.open_pack(key).to_dicts() == expected
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


# The one place that may read pickles: converting a checkpoint the user trusts
# (load_torch_file / load_checkpoint_file with trust_pickle=True, tools/convert_official.py).
TRUSTED_PICKLE_MODULES = {"solo_d2/checkpoint/safe_load.py"}


def test_nothing_in_the_package_unpickles_outside_the_trusted_conversion():
    import re

    import solo_d2

    root = Path(solo_d2.__file__).resolve().parent
    pattern = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    found = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).as_posix()
        hits = [
            n for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)
        ]
        if hits:
            found[rel] = hits
    assert set(found) <= TRUSTED_PICKLE_MODULES, found
    # and there, only behind trust_pickle
    text = (root / "checkpoint" / "safe_load.py").read_text()
    assert "if trust_pickle:\n            return pickle.load(" in text
