"""What the data checks report: :class:`DatasetError` (a file that cannot be used at all) and
:class:`DataFault` (one annotation or image left out), their compact JSON form (kept by the check
cache) and their summary in log messages."""

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "DatasetError",
    "DataFault",
    "faults_to_columns",
    "faults_from_columns",
    "summarize_faults",
    "MAX_LISTED_FAULTS",
]

MAX_LISTED_FAULTS = 10  # faults named one by one in a log message; all are kept in the list


class DatasetError(ValueError):
    """A dataset that cannot be used at all; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class DataFault:
    """One annotation or image left out of a dataset, and why.

    Attributes:
        kind: short machine-readable name, e.g. "empty_segmentation", "rle_size".
        message: what is wrong, in words.
        json_file: the annotation file.
        image_id, annotation_id: the COCO ids involved (None when not applicable).
        file_name: the image file name as written in the annotation file.
    """

    kind: str
    message: str
    json_file: str
    image_id: Optional[Any] = None
    annotation_id: Optional[Any] = None
    file_name: Optional[str] = None

    def __str__(self) -> str:
        where = []
        if self.annotation_id is not None:
            where.append(f"annotation id {self.annotation_id}")
        if self.image_id is not None:
            where.append(f"image id {self.image_id}")
        if self.file_name is not None:
            where.append(f"file {self.file_name}")
        return f"{', '.join(where) or self.json_file}: {self.message}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def faults_to_columns(faults: Sequence[DataFault]) -> Dict[str, list]:
    """Faults as JSON columns: a value per fault, the repeated strings (kinds, files, the
    messages past ``MAX_DESCRIBED_FAULTS``) once each, so 10^6 faults stay a few MB."""
    strings: Dict[str, int] = {}

    def index(text: Optional[str]) -> int:
        return -1 if text is None else strings.setdefault(text, len(strings))

    columns = {
        "kind": [index(f.kind) for f in faults],
        "message": [index(f.message) for f in faults],
        "json_file": [index(f.json_file) for f in faults],
        "file_name": [index(f.file_name) for f in faults],
        "image_id": [f.image_id for f in faults],
        "annotation_id": [f.annotation_id for f in faults],
    }
    return {"strings": list(strings), **columns}


def faults_from_columns(columns: Dict[str, list]) -> List[DataFault]:
    strings = [*columns["strings"], None]  # index -1: None
    text = {
        k: [strings[i] for i in columns[k]] for k in ("kind", "message", "json_file", "file_name")
    }
    return [
        DataFault(*fault)
        for fault in zip(
            text["kind"],
            text["message"],
            text["json_file"],
            columns["image_id"],
            columns["annotation_id"],
            text["file_name"],
        )
    ]


def summarize_faults(faults: Sequence[DataFault], limit: int = MAX_LISTED_FAULTS) -> str:
    """Counts by kind and the first ``limit`` faults by name, one per line."""
    kinds = Counter(f.kind for f in faults)
    lines = [", ".join(f"{n} {kind}" for kind, n in kinds.most_common())]
    lines += [f"  {f}" for f in faults[:limit]]
    if len(faults) > limit:
        lines.append(f"  ... and {len(faults) - limit} more")
    return "\n".join(lines)
