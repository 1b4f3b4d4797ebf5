"""The outcome of checking an annotation file, kept on disk: each file content is checked once.

Checking COCO train2017's annotations takes longer than reading them, and a training run reads
them in several processes (the launcher, then every worker; evaluation). The first check of a
file stores its outcome (the faults, the ids left out, the classes: a few MB at most) under
``$SOLO_D2_CACHE/dataset_checks/`` (default ``$XDG_CACHE_HOME/solo_d2`` or ``~/.cache/solo_d2``);
the later ones read it back instead of checking again. An entry is found by:

* the annotation file's real path, size and modification time (any edit makes a new entry);
* the image directory's real path and modification time (adding or removing an image in it
  changes it; the missing-image faults are part of the outcome);
* the check's parameters (e.g. ``INPUT.MAX_IMAGE_PIXELS``) and kind (COCO, LVIS);
* the source of the modules that check (a new solo_d2 never reuses an older one's outcome).

Entries are JSON, written atomically, so a crash or two processes writing at once leave a whole
entry or none. ``SOLO_D2_CACHE=off`` turns the cache off; a folder that cannot be written turns
it off with one warning.
"""

import functools
import hashlib
import logging
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import orjson

from ..atomic_io import atomic_write_bytes
from . import validation
from .validation import CheckedCOCO, check_coco_dict

__all__ = [
    "CACHE_ENV",
    "cache_dir",
    "entry_key",
    "load_entry",
    "store_entry",
    "check_key",
    "read_and_check",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "SOLO_D2_CACHE"
_OFF = ("off", "0", "false", "none")
_CHECKING_MODULES = (
    "validation.py",
    "faults.py",
    "dataset_dicts.py",
    "lvis.py",
    "panoptic.py",
    "check_cache.py",
    "json_reader.py",
    "packed.py",
)


def cache_dir() -> Optional[str]:
    """The folder of the entries, or None when the cache is off."""
    root = os.environ.get(CACHE_ENV)
    if root is not None and root.strip().lower() in _OFF:
        return None
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "solo_d2")
    return os.path.join(root, "dataset_checks")


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CHECKING_MODULES:
        with open(os.path.join(here, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def entry_key(
    kind: str,
    json_file: str,
    image_root: Optional[str],
    params: Dict[str, Any],
    folders: Sequence[str] = (),
) -> str:
    """The name of the entry of checking ``json_file`` (see the module docstring); ``folders``:
    more folders whose contents the check looked at (a panoptic dataset's PNGs), as the image
    folder.

    Raises:
        OSError: ``json_file`` (or ``image_root``) cannot be read.
    """
    fingerprint = [kind, _code_version(), sorted(params.items())]
    for path in (json_file, image_root, *folders):
        if path is None:
            fingerprint.append(None)
            continue
        real = os.path.realpath(path)
        st = os.stat(real)
        fingerprint.append([real, st.st_size if path == json_file else 0, st.st_mtime_ns])
    return hashlib.sha256(orjson.dumps(fingerprint, default=str)).hexdigest()[:32]


def load_entry(key: str) -> Optional[dict]:
    """The entry stored under ``key``, or None (absent, unreadable or cache off)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, key + ".json"), "rb") as f:
            return orjson.loads(f.read())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _warn_unwritable(folder: str, error: str) -> None:
    logger.warning(
        f"Cannot write the dataset check cache in {folder} ({error}); every process checks the "
        f"annotation files itself (set {CACHE_ENV} to a writable folder, or to 'off')"
    )


def store_entry(key: str, entry: dict) -> None:
    """Store ``entry`` (JSON-serialisable) under ``key``; a failure only logs a warning."""
    folder = cache_dir()
    if folder is None:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write_bytes(os.path.join(folder, key + ".json"), orjson.dumps(entry))
    except OSError as e:
        _warn_unwritable(folder, f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# reading and checking a file once per content


def check_key(
    kind: str,
    json_file: str,
    image_root: Optional[str],
    max_image_pixels: Optional[int],
    folders: Sequence[str] = (),
) -> str:
    """The key of checking ``json_file`` with these parameters: it changes with the file's
    content (:func:`~solo_d2.data.check_cache.entry_key`; ``folders`` as it takes them).

    Raises:
        OSError: the file (or ``image_root``) cannot be read.
    """
    return entry_key(kind, json_file, image_root, {"max_image_pixels": max_image_pixels}, folders)


def read_and_check(
    json_file: str,
    image_root: Optional[str],
    max_image_pixels: Optional[int] = None,
    what: str = "",
    *,
    kind: str = "coco",
    prepare: Callable[[Dict[str, Any]], Dict[str, Any]] = lambda data: data,
    check: Optional[Callable[[Dict[str, Any]], Tuple[CheckedCOCO, Dict[str, Any]]]] = None,
    need_data: bool = True,
    with_faults: bool = True,
) -> Tuple[Optional[Dict[str, Any]], CheckedCOCO, Dict[str, Any]]:
    """Read ``json_file`` and check it, at most once per file content: (data, outcome, extra).

    The outcome of a check is kept (:mod:`~solo_d2.data.check_cache`); when the file (and the
    image directory) has not changed since, it is reused and the file is not checked again, nor
    read at all without ``need_data`` (data is then None).

    Args:
        what: extra context for error messages (:func:`read_coco_json`).
        kind: the kind of check, part of the cache key ("coco", "lvis").
        prepare: applied to the file's content before it is checked or returned (LVIS adapts
            its images).
        check: ``check(data) -> (outcome, extra)``, ``extra`` a JSON-serialisable dict kept
            with the outcome; default :func:`check_coco_dict` and no extra.
        with_faults: without it, a reused outcome comes without its list of faults (None;
            ``num_faults`` counts them): 10^6 faults take ~100 MB.
    Raises:
        DatasetError: the file cannot be used at all.
        OSError: the file cannot be read.
    """
    if check is None:

        def check(data):
            return check_coco_dict(data, json_file, image_root, max_image_pixels), {}

    key = check_key(kind, json_file, image_root, max_image_pixels)
    entry = load_entry(key)
    if entry is not None:
        checked, extra = CheckedCOCO.from_json(entry["checked"], with_faults), entry["extra"]
        data = prepare(validation.read_coco_json(json_file, what)) if need_data else None
    else:
        data = prepare(validation.read_coco_json(json_file, what))
        checked, extra = check(data)
        store_entry(key, {"checked": checked.to_json(), "extra": extra})
    checked.key = key
    return data, checked, extra
