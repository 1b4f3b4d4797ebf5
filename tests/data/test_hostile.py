"""Hostile annotation files and images: refused or skipped with a message, in bounded memory.

A polygon of 10^7 points, an image declared 100000 x 100000, 10^6 garbage annotations, huge or
inconsistent RLE counts, polygons far outside their image, a decompression-bomb PNG. The memory
test measures the peak RSS of registering and loading each in a child process.
"""

import json
import logging
import os
import resource
import struct
import subprocess
import sys
import uuid
import zlib
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools import mask as mask_util

from solo_d2.config import ConfigError
from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.dataset_dicts import clean_coco_dict
from solo_d2.data.dataset_mapper import SOLODatasetMapper
from solo_d2.data.faults import DatasetError, summarize_faults
from solo_d2.data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, image_size, read_image
from solo_d2.data.validation import (
    MAX_DESCRIBED_FAULTS,
    MAX_JSON_NUMBERS,
    MAX_POLYGON_OUTLINE,
    MAX_POLYGON_POINTS,
    MAX_RLE_RUNS,
    _rle_string_runs,
    check_coco_dict,
    read_coco_json,
)
from solo_d2.engine.cli import register_datasets_from_args
from solo_d2.engine.preflight import check_config

H, W = 40, 60
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
# Peak RSS that registering and loading one hostile dataset may add to Python, torch and
# detectron2 (0.72 GB here): the whole stays under 2 GB. Measured: 0.88 GB for 10^6 garbage
# annotations (0.47 GB of which is the parsed file's objects; orjson's 10^6 one-letter strings
# are 0.09 GB more than json.load's; 0.69 GB with json.load), 0.32 GB for a polygon of 10^7
# points (1.3 GB before the JSON number budget), 0.14 GB for an RLE of 10^7 runs, nothing for the
# others.
MAX_EXTRA_RSS = 1.0e9


def _coco(annotations, images=None):
    return {
        "images": images or [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }


def _ann(ann_id, segm=None, **extra):
    ann = {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}
    ann["segmentation"] = [SQUARE] if segm is None else segm
    return {**ann, **extra}


def _square_outline(points: int) -> list:
    """A polygon of ``points`` points along the outline of the square SQUARE (80 pixels long)."""
    t = np.arange(points) * (80.0 / points)
    side, step = np.divmod(t, 20.0)
    x = np.choose(
        side.astype(int), [10 + step, np.full_like(t, 30), 30 - step, np.full_like(t, 10)]
    )
    y = np.choose(
        side.astype(int), [np.full_like(t, 10), 10 + step, np.full_like(t, 30), 30 - step]
    )
    return np.stack([x, y], axis=1).ravel().tolist()


def _faults(data):
    return {f.annotation_id: f for f in check_coco_dict(data, "/data/ann.json").faults}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_images")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "a.png")
    return folder


# ---- polygons --------------------------------------------------------------------------------


def test_polygon_with_too_many_points_is_skipped_before_rasterising():
    many = _square_outline(MAX_POLYGON_POINTS + 1)
    at_cap = _square_outline(MAX_POLYGON_POINTS)
    faults = _faults(_coco([_ann(1), _ann(2, [many]), _ann(3, [at_cap[:100], at_cap[100:]])]))
    assert set(faults) == {2}
    assert faults[2].kind == "polygon_too_large"
    assert str(faults[2]) == (
        f"annotation id 2, image id 1, file a.png: 'segmentation' has {len(many) // 2} polygon "
        f"points, more than the {MAX_POLYGON_POINTS} allowed (it is not rasterised)"
    )


def test_a_json_polygon_of_millions_of_points_is_read_as_a_count(tmp_path):
    points = MAX_JSON_NUMBERS  # 2 * MAX_JSON_NUMBERS numbers: past the budget of one object
    ann = tmp_path / "ann.json"
    coords = ",".join(["12.5,20.25"] * points)
    text = json.dumps(_coco([_ann(1), _ann(7, "SEGM")])).replace('"SEGM"', f"[[{coords}]]")
    ann.write_text(text)
    data = read_coco_json(str(ann))
    assert repr(data["annotations"][1]["segmentation"]) == f"<an array of {2 * points} items>"
    checked = check_coco_dict(data, str(ann))
    [fault] = checked.faults
    assert fault.annotation_id == 7 and fault.kind == "polygon_too_large"
    assert f"'segmentation' has {points} polygon points" in str(fault)
    assert checked.bad_annotations == {7}


def test_polygons_far_outside_the_image_are_not_rasterised():
    far = [0.0, 0.0, 1e6, 0.0, 1e6, 1e6]  # a bbox inside the image, a 3e6-pixel outline
    absurd = [0.0, 0.0, 1e9, 0.0, 1e9, 1e9]  # pycocotools' int32 arithmetic overflows: segfault
    near = [-5e4, -5e4, 5e4, -5e4, 5e4, 5e4, -5e4, 5e4]  # 4e5 pixels of outline: rasterised
    data = _coco([_ann(1, [far]), _ann(2, [absurd]), _ann(3, [near]), _ann(4, [SQUARE, absurd])])
    checked = check_coco_dict(data, "/data/ann.json")
    faults = {f.annotation_id: f for f in checked.faults}
    assert faults[1].kind == "polygon_too_large"
    assert f"outline is 3000000 pixels long, more than the {MAX_POLYGON_OUTLINE}" in str(faults[1])
    assert faults[2].kind == "bad_polygons" and "absurd (beyond +-1e+08)" in str(faults[2])
    assert faults[4].kind == "dropped_polygons" and 3 not in faults
    clean = clean_coco_dict(data, checked)  # rasterises the kept polygons without an "area"
    assert [a["id"] for a in clean["annotations"]] == [3, 4]
    assert clean["annotations"][0]["area"] == H * W


# ---- images -----------------------------------------------------------------------------------


def test_an_image_declared_100000_by_100000_is_refused_naming_it(tmp_path, image_dir):
    images = [
        {"id": 1, "file_name": "a.png", "height": H, "width": W},
        {"id": 5, "file_name": "huge.png", "height": 100000, "width": 100000},
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_coco([_ann(1)], images)))
    name = f"huge_{uuid.uuid4().hex[:8]}"
    with pytest.raises(DatasetError) as e:
        register_coco_dataset(f"{name}={ann}:{image_dir}")
    assert str(e.value) == (
        f"Annotation file {str(ann)!r}: image id 5 (huge.png) declares height=100000, "
        "width=100000: 10000000000 pixels, more than INPUT.MAX_IMAGE_PIXELS = 100000000 (raise it "
        "if the image is genuine)"
    )
    assert name not in DatasetCatalog.list()
    # the limit is INPUT.MAX_IMAGE_PIXELS of the config train_net.py is given
    args = Namespace(
        dataset=[f"{name}={ann}:{image_dir}"],
        config_file=str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"),
        opts=["INPUT.MAX_IMAGE_PIXELS", "10000000000"],
    )
    try:
        assert register_datasets_from_args(args) == [name]
        assert [d["image_id"] for d in DatasetCatalog.get(name)] == [1]  # huge.png is missing
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    args.opts = ["INPUT.MAX_IMAGE_PIXELS", "2000"]  # a 60 x 40 image is 2400 pixels
    with pytest.raises(DatasetError, match="image id 1 .a.png. declares height=40, width=60"):
        register_datasets_from_args(args)


def test_max_image_pixels_must_be_positive():
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()
    cfg.INPUT.MAX_IMAGE_PIXELS = 0
    with pytest.raises(ConfigError, match="INPUT.MAX_IMAGE_PIXELS is 0; it must be a positive"):
        check_config(cfg, check_weights=False)
    assert tiny_cfg().INPUT.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


def write_png_bomb(path: Path, side: int = 30000) -> None:
    """A valid 1-bit ``side`` x ``side`` PNG of zeros: ~110 KB for 30000, 2.7 GB decoded as RGB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    write_png_bomb(bomb)
    assert bomb.stat().st_size < 200_000
    pil_limit = Image.MAX_IMAGE_PIXELS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with pytest.raises(BadImageError) as e:
        read_image(str(bomb))
    assert str(e.value) == (  # refused by PIL's guard, at twice the limit
        f"image {bomb}: has 900000000 pixels, more than INPUT.MAX_IMAGE_PIXELS = 100000000; it is "
        "not decoded (raise INPUT.MAX_IMAGE_PIXELS if the image is genuine)"
    )
    # a limit above PIL's own (which refuses over 2 x 89 million pixels) is the one that holds
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with pytest.raises(BadImageError, match="30000x30000 = 900000000 pixels, more than INPUT.MAX"):
        read_image(str(bomb), max_pixels=5 * 10**8)
    with pytest.raises(BadImageError, match="900000000 pixels, more than INPUT.MAX_IMAGE_PIXELS"):
        image_size(str(bomb))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert after - before < 100e6  # decoding would take 2.7 GB
    assert image_size(str(bomb), max_pixels=10**9) == (30000, 30000)
    # PIL's guard was raised only while the header was read
    assert Image.MAX_IMAGE_PIXELS == pil_limit


def test_the_mapper_skips_images_above_the_limit(image_dir, caplog):
    cfg = tiny_cfg()
    cfg.INPUT.MAX_IMAGE_PIXELS = 2000  # the 60 x 40 image has 2400
    mapper = SOLODatasetMapper(cfg, True)
    record = {"file_name": str(image_dir / "a.png"), "height": H, "width": W, "image_id": 1}
    with caplog.at_level(logging.WARNING, logger="solo_d2"):
        assert mapper(record) is None
    assert "Skipping training image (image id 1)" in caplog.text
    assert "60x40 = 2400 pixels, more than INPUT.MAX_IMAGE_PIXELS = 2000" in caplog.text
    with pytest.raises(BadImageError, match="INPUT.MAX_IMAGE_PIXELS = 2000"):
        SOLODatasetMapper(cfg, False)(record)  # evaluation: an error
    cfg.INPUT.MAX_IMAGE_PIXELS = 2400
    assert SOLODatasetMapper(cfg, True)(record)["image"].dtype == torch.uint8


# ---- garbage ----------------------------------------------------------------------------------


def test_many_garbage_annotations_are_counted_and_the_first_described():
    n = 3 * MAX_DESCRIBED_FAULTS
    long_box, long_category = list(range(100000)), [1] * 1000
    garbage = [
        {"id": i, "image_id": 1, "category_id": 1, "bbox": long_box} if i % 2 else
        {"id": i, "image_id": "nope", "category_id": long_category, "bbox": None}
        for i in range(n)
    ]  # fmt: skip
    checked = check_coco_dict(_coco(garbage), "/data/ann.json")
    assert len(checked.faults) == n and checked.bad_annotations == set(range(n))
    assert [f.annotation_id for f in checked.faults] == list(range(n))  # in file order
    assert str(checked.faults[1]) == (
        "annotation id 1, image id 1, file a.png: bbox [0, 1, 2, 3, 4, 5, ...] is not 4 finite "
        "numbers [x, y, width, height]"
    )
    assert str(checked.faults[0]) == (
        "annotation id 0, image id nope: image_id 'nope' is not in 'images'"
    )
    described = [f for f in checked.faults if "only the first" not in f.message]
    assert len(described) == MAX_DESCRIBED_FAULTS
    assert str(checked.faults[-1]) == (
        f"annotation id {n - 1}, image id 1, file a.png: bad_bbox (only the first "
        f"{MAX_DESCRIBED_FAULTS} faults are described)"
    )
    assert summarize_faults(checked.faults).splitlines()[0] == (
        f"{n // 2} unknown_image, {n // 2} bad_bbox"
    )
    assert max(len(f.message) for f in checked.faults) < 200


@pytest.mark.parametrize(
    "annotations, phrase",
    [
        ("[" + ",".join(["[1]"] * (MAX_JSON_NUMBERS + 1)) + "]",
         f"'annotations' is an array of {MAX_JSON_NUMBERS + 1} items holding more than "
         f"{MAX_JSON_NUMBERS} numbers outside objects"),
        ("[" + ",".join(['"x"'] * 1000) + "]", "annotations[0] has no integer 'id'"),
        ("[" * 100000 + "]" * 100000, "nests arrays or objects too deeply to be read"),
        ("[" + "9" * 5000 + "]", "is not valid JSON"),
    ],
)  # fmt: skip
def test_garbage_that_makes_a_file_unusable_is_an_error(tmp_path, annotations, phrase):
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(_coco([])).replace('"annotations": []', f'"annotations": {annotations}')
    )
    with pytest.raises(DatasetError) as e:
        check_coco_dict(read_coco_json(str(ann)), str(ann))
    assert phrase in str(e.value) and str(ann) in str(e.value)
    assert len(str(e.value)) < 400


def test_garbage_iscrowd_and_area_are_faults_or_recomputed():
    anns = [
        _ann(1, iscrowd="yes"), _ann(2, iscrowd=[1]), _ann(3, iscrowd=float("nan")),
        _ann(4, iscrowd=True, area="big"), _ann(5, area=-1.0), _ann(6, area=float("inf")),
    ]  # fmt: skip
    data = _coco(anns)
    checked = check_coco_dict(data, "/data/ann.json")
    assert {f.annotation_id: f.kind for f in checked.faults} == {
        i: "bad_iscrowd" for i in (1, 2, 3)
    }
    assert "iscrowd 'yes' is not 0 or 1" in str(checked.faults[0])
    clean = clean_coco_dict(data, checked)  # COCO's evaluation compares areas: 400 pixels
    assert [(a["id"], a["area"]) for a in clean["annotations"]] == [(4, 400), (5, 400), (6, 400)]


def test_garbage_values_are_shortened_in_error_messages():
    data = _coco([], [{"id": 1, "file_name": "a.png", "height": "x" * 10**6, "width": 3}])
    with pytest.raises(DatasetError, match=r"height='xxxxxxxxxxxxxxxxx\.\.\.xxxxxxxxxxxxxxxxxx'"):
        check_coco_dict(data, "/data/ann.json")
    data = _coco([], [{"id": 1, "file_name": ["a.png"], "height": 4, "width": 3}])
    with pytest.raises(DatasetError, match=r"images\[0\] has file_name \['a.png'\], not a file"):
        check_coco_dict(data, "/data/ann.json")
    [fault] = check_coco_dict(
        _coco([_ann(1, image_id=list(range(10**5)))]), "/data/ann.json"
    ).faults
    assert str(fault) == (
        "annotation id 1, image id [0, 1, 2, 3, 4, 5, ...]: image_id [0, 1, 2, 3, 4, 5, ...] is "
        "not in 'images'"
    )


# ---- RLE --------------------------------------------------------------------------------------


def test_compressed_rle_runs_are_decoded_as_pycocotools_does():
    rng = np.random.default_rng(0)
    for h, w, density in [(1, 1, 0.5), (7, 5, 0.0), (7, 5, 1.0), (37, 53, 0.3), (300, 200, 0.01)]:
        mask = np.asfortranarray((rng.random((h, w)) < density).astype(np.uint8))
        rle = mask_util.encode(mask)
        runs = _rle_string_runs(rle["counts"])
        assert runs.sum() == h * w and runs[1::2].sum() == mask.sum() == mask_util.area(rle)
    big = np.zeros((1000, 1000), np.uint8, order="F")
    big[1:999, 5:900] = 1  # long runs and large deltas: multi-character values, both signs
    runs = _rle_string_runs(mask_util.encode(big)["counts"])
    assert runs.sum() == 10**6 and runs[1::2].sum() == big.sum()
    for bad in (b"!", b"0P", b"o" * 8 + b"0"):  # outside '0'..'o', unfinished, over 35 bits
        assert _rle_string_runs(bad) is None


def test_huge_or_inconsistent_rle_counts_are_faults():
    other = mask_util.encode(np.ones((400, 400), np.uint8, order="F"))["counts"].decode()
    cases = {
        1: ({"size": [H, W], "counts": other}, f"cover 160000 pixels, the image has {H * W}"),
        2: ({"size": [H, W], "counts": "!!!"}, "not a valid COCO RLE string"),
        3: ({"size": [H, W], "counts": "é"}, "not a valid COCO RLE string"),
        4: ({"size": [H, W], "counts": [0, 10**30]}, "cover 1000000000000000000000000000000"),
        5: ({"size": [H, W], "counts": [1] * (MAX_RLE_RUNS + 1)},
            f"RLE 'counts' has {MAX_RLE_RUNS + 1} entries, more than the {MAX_RLE_RUNS} allowed"),
        6: ({"size": [H, W], "counts": "0" * (MAX_RLE_RUNS + 1)}, f"{MAX_RLE_RUNS + 1} entries"),
        7: ({"size": [H, W], "counts": [0, 100, H * W - 100]}, None),
    }  # fmt: skip
    faults = _faults(_coco([_ann(i, segm) for i, (segm, _) in cases.items()]))
    for i, (_, phrase) in cases.items():
        if phrase is None:
            assert i not in faults
        else:
            assert faults[i].kind == "bad_rle" and phrase in str(faults[i]), (i, str(faults[i]))


# ---- memory -----------------------------------------------------------------------------------


def _write_hostile(folder: Path, case: str) -> Path:
    """The annotation file of one hostile case (every one on the 60 x 40 image a.png)."""
    path = folder / f"{case}.json"
    if case == "polygon_1e7_points":
        head, tail = json.dumps(_coco([_ann(1), _ann(2, "SEGM")])).split('"SEGM"')
        with open(path, "w") as f:
            f.write(head + "[[")
            for _ in range(100):  # 10^7 points of 2 floats, 100 MB
                f.write("12.5,20.25," * 100000)
            f.write("12.5,20.25]]" + tail)
    elif case == "image_100000x100000":
        image = {"id": 2, "file_name": "a.png", "height": 100000, "width": 100000}
        big = _ann(1, [[0, 0, 99999, 0, 99999, 99999]], image_id=2)
        path.write_text(json.dumps(_coco([big], [_coco([])["images"][0], image])))
    elif case == "annotations_1e6_garbage_dicts":
        garbage = [
            {"id": i, "image_id": i % 3, "category_id": "x", "bbox": [i], "segmentation": i}
            for i in range(10**6)
        ]
        path.write_text(json.dumps(_coco(garbage)))
    elif case == "annotations_1e6_numbers":
        path.write_text(json.dumps(_coco(list(range(10**6)))))
    elif case == "rle_1e7_runs":
        rle = {"size": [H, W], "counts": [1] * 10**7}
        path.write_text(json.dumps(_coco([_ann(1), _ann(2, rle)])))
    return path


HOSTILE_CASES = {
    # case -> (registration error phrase or None, dataset dicts, annotations kept)
    "polygon_1e7_points": (None, 1, 1),
    "image_100000x100000": ("declares height=100000, width=100000", None, None),
    "annotations_1e6_garbage_dicts": (None, 1, 0),
    "annotations_1e6_numbers": ("annotations[0] has no integer 'id'", None, None),
    "rle_1e7_runs": (None, 1, 1),
}


# Child processes: import only what registration (or the mapper) needs, then measure.
# Peak RSS from VmHWM: ru_maxrss would include the RSS of the forked test process.
_CHILD_HEAD = """
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
"""
MEASURE_DATASET = _CHILD_HEAD + """
from detectron2.data import DatasetCatalog
from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.record import dataset_record
from solo_d2.data.faults import DatasetError
outcome = {"base_rss": rss()}
try:
    name = register_coco_dataset(f"hostile={sys.argv[1]}:{sys.argv[2]}")
    dicts = DatasetCatalog.get(name)
    outcome["dicts"] = len(dicts)
    outcome["annotations"] = sum(len(d["annotations"]) for d in dicts)
    outcome["faults"] = len(dataset_record(name).faults)
except DatasetError as e:
    outcome["error"] = str(e)
outcome["peak_rss"] = rss()
print("REPORT " + json.dumps(outcome))
"""
MEASURE_BOMB = _CHILD_HEAD + """
from solo_d2.config import load_config
from solo_d2.data.dataset_mapper import SOLODatasetMapper
mapper = SOLODatasetMapper(load_config(sys.argv[2]), True)
outcome = {"base_rss": rss()}
record = {"file_name": sys.argv[1], "height": 30000, "width": 30000, "image_id": 1}
outcome["skipped"] = mapper(record) is None
outcome["peak_rss"] = rss()
print("REPORT " + json.dumps(outcome))
"""


def _child(code_and_args):
    res = subprocess.run(
        [sys.executable, "-c", *code_and_args], capture_output=True, text=True, timeout=600,
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [line] = [x for x in res.stdout.splitlines() if x.startswith("REPORT ")]
    return json.loads(line[len("REPORT ") :])


@pytest.mark.e2e  # six child processes reading files of up to 100 MB (~30 s)
def test_hostile_datasets_register_and_load_in_bounded_memory(tmp_path, image_dir):
    runs = [
        (MEASURE_DATASET, str(_write_hostile(tmp_path, c)), str(image_dir)) for c in HOSTILE_CASES
    ]
    write_png_bomb(tmp_path / "bomb.png")
    config = str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml")
    runs.append((MEASURE_BOMB, str(tmp_path / "bomb.png"), config))
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(_child, runs))
    for case, report in zip([*HOSTILE_CASES, "png_bomb_30000x30000"], reports):
        print(
            f"{case}: peak RSS {report['peak_rss'] / 1e9:.2f} GB "
            f"({report['base_rss'] / 1e9:.2f} GB after imports)"
        )
        assert report["peak_rss"] - report["base_rss"] < MAX_EXTRA_RSS, case
    for (case, (error, dicts, kept)), report in zip(HOSTILE_CASES.items(), reports):
        if error is not None:
            assert error in report["error"], case
        else:
            assert (report["dicts"], report["annotations"]) == (dicts, kept), case
    assert reports[-1]["skipped"]
