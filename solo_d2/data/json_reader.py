"""Reading JSON annotation files of any size: fast, and in memory bounded whatever they hold.

:func:`read_json` gives what Python's ``json.load`` gives, except that a JSON array holding more
than :data:`MAX_JSON_NUMBERS` numbers between the ends of two objects is not kept: it becomes a
:class:`LongArray` (its item count), so that a polygon of 10^7 points or 10^7 RLE runs costs
8 bytes a number while it is read, then nothing.

Two readers give that same result:

* **Fast** (every well-formed file of the usual kind): a vectorised scan of the bytes
  (:func:`scan_layout`) finds the strings, the nesting depth and the ends of the objects. When no
  stretch between two object ends is long enough to hold more than ``MAX_JSON_NUMBERS`` numbers
  (each takes at least two bytes), nothing would be dropped, so ``orjson`` parses the file; the
  top-level arrays (COCO's ``images`` and ``annotations``) are parsed a batch of items at a time,
  so the parser's own working copy stays small and the peak memory is that of the result plus
  the file's bytes.
  Integers beyond 64 bits (which no COCO field can use) are read as floats, not as ints.
* **Bounded** (the others: long number arrays, escaped quotes, anything ``orjson`` rejects such
  as ``NaN``): ``json.load`` with number hooks that count the numbers of each object and keep
  only a shared placeholder past the budget. It is ~3x slower; its errors are the reported ones.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import orjson

__all__ = ["MAX_JSON_NUMBERS", "LongArray", "read_json", "scan_layout", "JSONLayout"]

logger = logging.getLogger(__name__)

# Numbers read in full in one JSON object (past them, only counted): more than any usable COCO
# annotation or RLE holds (validation.MAX_RLE_RUNS runs, MAX_POLYGON_POINTS points; a test checks).
MAX_JSON_NUMBERS = 1_000_000 + 1000

_SCAN_CHUNK = 1 << 24  # bytes scanned at a time (the scan's temporaries are a few times this)
_BATCH_BYTES = 1 << 23  # bytes of array items parsed at a time by the fast reader
# byte classes of the scan: 1 quote, 2 "{", 3 "[", 4 "}", 5 "]", 0 the others
_CLASSES = bytearray(256)
for _char, _cls in zip(b'"{[}]', range(1, 6)):
    _CLASSES[_char] = _cls
_QUOTE, _OPEN_ARRAY, _CLOSE_OBJECT, _CLOSE_ARRAY = 1, 3, 4, 5
_CLASSES = bytes(_CLASSES)


class LongArray:
    """Stands for a JSON array read only in part: it held numbers past ``MAX_JSON_NUMBERS``."""

    __slots__ = ("items",)

    def __init__(self, items: int):
        self.items = items  # its items, nested arrays flattened

    def __repr__(self) -> str:
        return f"<an array of {self.items} items>"


_DROPPED = float("nan")  # every number read past the budget: one shared object, 8 bytes a number


def _nested_size(value: list) -> int:
    return sum(_nested_size(v) if type(v) is list else 1 for v in value)


def _holds_dropped(value: list) -> bool:
    return _DROPPED in value or any(_holds_dropped(v) for v in value if type(v) is list)


class _NumberBudget:
    """``json.load`` hooks that read at most ``MAX_JSON_NUMBERS`` numbers in full between the
    ends of two objects (the others are ``_DROPPED``); once a number was dropped, the arrays of
    every object that hold one become :class:`LongArray` as the object ends."""

    def __init__(self):
        self.count = 0  # numbers since the last object ended
        self.dropped = False

    def parse_int(self, text: str):
        self.count += 1
        return int(text) if self.count <= MAX_JSON_NUMBERS else _DROPPED

    def parse_float(self, text: str):
        self.count += 1
        return float(text) if self.count <= MAX_JSON_NUMBERS else _DROPPED

    def object_hook(self, obj: dict) -> dict:
        self.dropped |= self.count > MAX_JSON_NUMBERS
        if self.dropped:
            for key, value in obj.items():
                if type(value) is list and _holds_dropped(value):
                    obj[key] = LongArray(_nested_size(value))
        self.count = 0
        return obj


def _read_bounded(path: str) -> Any:
    budget = _NumberBudget()
    with open(path, encoding="utf-8") as f:
        return json.load(
            f,
            parse_int=budget.parse_int,
            parse_float=budget.parse_float,
            object_hook=budget.object_hook,
        )


@dataclass
class JSONLayout:
    """Where the top-level object's array values lie in the file (byte offsets).

    Attributes:
        arrays: ``(open, close)`` offsets of the ``[`` and ``]`` of each array that is a value of
            the top-level object, in file order.
        item_ends: for each of those arrays, the offsets of the closing brace or bracket of its
            object and array items (its numbers and strings have none).
    """

    arrays: List[tuple] = field(default_factory=list)
    item_ends: List[np.ndarray] = field(default_factory=list)


def scan_layout(buf: bytes) -> Optional[JSONLayout]:
    """The layout of a JSON text whose top level is an object, if the fast reader may read it.

    None when it may not: the top level is not an object, a quote is escaped (strings are then
    not found by counting quotes), the brackets do not balance, or some stretch between two
    object ends (outside strings) is long enough to hold more than ``MAX_JSON_NUMBERS`` numbers.
    Vectorised; ``_SCAN_CHUNK`` bytes at a time.
    """
    text_start = len(buf) - len(buf.lstrip())
    if text_start == len(buf) or buf[text_start] != ord("{") or buf.find(b'\\"') >= 0:
        return None  # not an object; an escaped quote: counting quotes does not find strings
    max_gap = 2 * MAX_JSON_NUMBERS
    quotes_before, depth, last_object_end = 0, 0, 0
    opens, closes, ends = [], [], []  # depth-2 containers opened; closed; depth-3 items closed
    for start in range(0, len(buf), _SCAN_CHUNK):
        classes = np.frombuffer(buf[start : start + _SCAN_CHUNK].translate(_CLASSES), np.uint8)
        marks = np.flatnonzero(classes)
        kinds = classes[marks]
        quote = kinds == _QUOTE
        in_string = (np.cumsum(quote) - quote + quotes_before) % 2 == 1
        quotes_before += int(quote.sum())
        keep = ~quote & ~in_string
        marks, kinds = marks[keep] + start, kinds[keep]
        delta = np.where(kinds <= _OPEN_ARRAY, 1, -1)  # +1 opens, -1 closes
        after = depth + np.cumsum(delta)  # the depth after each mark
        if len(after):
            if after.min() < 0:
                return None
            depth = int(after[-1])
        object_ends = marks[kinds == _CLOSE_OBJECT]
        if len(object_ends):
            if np.diff(object_ends, prepend=last_object_end).max() > max_gap:
                return None
            last_object_end = int(object_ends[-1])
        opens.append(marks[(after == 2) & (kinds == _OPEN_ARRAY)])
        closes.append(marks[(after == 1) & (kinds == _CLOSE_ARRAY)])
        ends.append(marks[(after == 2) & (delta < 0)])
    if depth != 0 or quotes_before % 2 or len(buf) - last_object_end > max_gap:
        return None
    opens, closes, ends = (
        np.concatenate([np.zeros(0, np.int64), *x]) for x in (opens, closes, ends)
    )
    if len(opens) != len(closes):
        return None
    layout = JSONLayout()
    for open_at, close_at in zip(opens.tolist(), closes.tolist()):
        lo, hi = np.searchsorted(ends, [open_at, close_at])
        layout.arrays.append((open_at, close_at))
        layout.item_ends.append(ends[lo:hi])
    return layout


def _parse_array(buf: bytes, open_at: int, close_at: int, item_ends: np.ndarray) -> list:
    """The array ``buf[open_at : close_at + 1]``, parsed ``_BATCH_BYTES`` of items at a time.

    Raises:
        ValueError: the items are not separated by single commas.
    """
    items: list = []
    view = memoryview(buf)
    start = open_at + 1
    cuts = item_ends[np.diff(item_ends // _BATCH_BYTES, append=-1) != 0]
    for k, cut in enumerate([*cuts.tolist(), close_at - 1]):
        piece = bytes(view[start : cut + 1]).strip()
        if k and piece:  # after an item: a comma, then items
            if piece[:1] != b"," or not piece[1:].strip():
                raise ValueError("items not separated by commas")
            piece = piece[1:]
        if piece:
            items.extend(orjson.loads(b"[" + piece + b"]"))
        start = cut + 1
    return items


def _read_fast(buf: bytes, layout: JSONLayout) -> Any:
    """Parse with orjson, the top-level arrays a batch of items at a time (see the module)."""
    pieces, last = [], 0
    for k, (open_at, close_at) in enumerate(layout.arrays):
        pieces += [buf[last : open_at + 1], str(k).encode()]  # the array stands as [k]
        last = close_at
    pieces.append(buf[last:])
    top = orjson.loads(b"".join(pieces))
    for key, value in top.items():
        if type(value) is list:  # every array value is a [k] stand-in
            k = value[0]
            top[key] = _parse_array(buf, *layout.arrays[k], layout.item_ends[k])
    return top


def read_json(path: str) -> Any:
    """The content of the JSON file ``path`` (see the module docstring).

    Raises:
        ValueError: not valid JSON (``json.JSONDecodeError``) or not UTF-8
            (``UnicodeDecodeError``), as ``json.load`` raises them.
        RecursionError: nested too deeply to be read.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        buf = f.read()
    layout = scan_layout(buf)
    if layout is not None:
        try:
            return _read_fast(buf, layout)
        except (ValueError, IndexError, TypeError):  # orjson.JSONDecodeError is a ValueError
            pass  # e.g. NaN or integers beyond 64 bits, which json reads: read it as json does
    del buf
    return _read_bounded(os.fspath(path))
