"""solo_d2.data.json_reader: the fast reader gives json.load's result, or hands the file over."""

import json
import math

import pytest

from solo_d2.data import json_reader, validation
from solo_d2.data.json_reader import MAX_JSON_NUMBERS, LongArray, read_json, scan_layout


def _same(a, b) -> bool:
    """Equal values of equal types (NaN equal to NaN), dict keys in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, LongArray):
        return a.items == b.items
    return a == b


def _coco_text() -> str:
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": 40, "width": 60} for i in range(50)]
    annotations = [
        {
            "id": k,
            "image_id": k % 50,
            "category_id": 1 + k % 3,
            "bbox": [1.5, 2.25, 10, 20.125],
            "segmentation": (
                [[1.5, 2, 30.25, 2, 30, 40.5]] if k % 7 else {"size": [40, 60], "counts": [5, 2395]}
            ),
            "iscrowd": int(k % 7 == 0),
            "note": "a string with } ] { [ , : inside",
        }
        for k in range(300)
    ]
    categories = [{"id": c, "name": f"class {c}"} for c in (1, 2, 3)]
    data = {"info": {"year": 2017, "tags": [1, [2, 3]]}, "images": images}
    data.update(annotations=annotations, categories=categories, empty=[], scalars=[1, "two", 3.0])
    return json.dumps(data, indent=1)


# (text, read by the fast reader): each must read as json.load reads it (value or error type)
CASES = [
    (_coco_text(), True),
    ('{"a": [1, 2, {"b": "}]{["}, [3, 4]], "c": {"d": [1]}, "e": [ ], "f": "x"}', True),
    ('{"a": [1], "a": [2, 3]}', True),  # duplicate key: the last one, as json.load
    ('  {"a": [{"k": 1}, 5, "s"] }  ', True),
    ('{"s": [{"t": "\\u00e9\\n\\/"}]}', True),
    ('{"a": [1, 2,], "b": 1}', True),  # trailing comma: an error
    ('{"a": [,1]}', True),
    ('{"a": [{"x": 1},,{"y": 2}]}', True),
    ('{"a": [{"x": 1} {"y": 2}]}', True),
    ('{"a": NaN, "b": [Infinity]}', True),  # json.load reads these; orjson hands them over
    ('{"a": "quote \\" inside"}', False),  # an escaped quote: strings are not found by parity
    ("[1, 2]", False),  # the top level is not an object
    ('{"a": [1, 2]', False),  # unbalanced
    ("", False),
]


def _bounded(path):
    return json_reader._read_bounded(str(path))


@pytest.mark.parametrize("text, fast", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("batch_bytes", [1 << 23, 64])  # 64: every array in many batches
def test_reads_as_json_load_does(tmp_path, monkeypatch, text, fast, batch_bytes):
    monkeypatch.setattr(json_reader, "_BATCH_BYTES", batch_bytes)
    path = tmp_path / "f.json"
    path.write_text(text)
    assert (scan_layout(text.encode()) is not None) == fast
    try:
        expected, error = _bounded(path), None
    except ValueError as e:
        expected, error = None, type(e)
    if error is not None:
        with pytest.raises(error):
            read_json(path)
    else:
        assert _same(read_json(path), expected)


def test_the_layout_finds_each_top_level_array_and_its_items():
    text = _coco_text().encode()
    layout = scan_layout(text)
    # images, annotations, categories, empty, scalars ("info" is an object: parsed whole)
    assert [len(ends) for ends in layout.item_ends] == [50, 300, 3, 0, 0]
    for (open_at, close_at), ends in zip(layout.arrays, layout.item_ends):
        assert text[open_at : open_at + 1] == b"[" and text[close_at : close_at + 1] == b"]"
        assert all(text[e : e + 1] in (b"}", b"]") for e in ends.tolist())


def test_an_object_with_too_many_numbers_goes_to_the_bounded_reader(tmp_path):
    path = tmp_path / "long.json"
    path.write_text('{"images": [], "annotations": [{"id": 1, "segmentation": [['
                    + ",".join(["1"] * (MAX_JSON_NUMBERS + 10)) + "]]}]}")  # fmt: skip
    assert scan_layout(path.read_bytes()) is None
    data = read_json(path)
    assert isinstance(data["annotations"][0]["segmentation"], LongArray)
    assert data["annotations"][0]["segmentation"].items == MAX_JSON_NUMBERS + 10


def test_the_budget_reads_every_usable_annotation_in_full():
    assert MAX_JSON_NUMBERS > max(validation.MAX_RLE_RUNS, 2 * validation.MAX_POLYGON_POINTS)
