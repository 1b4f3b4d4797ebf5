"""Atomic file writes: a file is either its previous content or its complete new content.

Checkpoints, ``last_checkpoint``, evaluation results and the demo's outputs are written to a
temporary file in the same folder, flushed to disk, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows). A process killed mid-write (SIGKILL, OOM killer,
power loss after the rename) leaves the previous file intact, plus at most one stray temporary
file named ``.<name>.tmp-<pid>`` next to it, which :func:`remove_stale_temporaries` deletes.
"""

import contextlib
import glob
import json
import logging
import os
import shutil
from typing import IO, Any, Iterator

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "remove_stale_temporaries",
    "TMP_MARKER",
]

logger = logging.getLogger(__name__)

TMP_MARKER = ".tmp-"  # temporary files are ".<target name>.tmp-<pid>"


def _temporary_path(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{TMP_MARKER}{os.getpid()}")


def _fsync_folder(folder: str) -> None:
    """Flush a rename in ``folder`` to disk (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``path`` when the block ends without error.

    Args:
        path: the file to (re)write; its folder must exist.
        mode: "wb" or "w".
    On an exception in the block the temporary file is removed and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    tmp = _temporary_path(path)
    kwargs = {} if "b" in mode else {"encoding": encoding}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj: Any, **dump_kwargs) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``json.dumps`` keyword arguments allowed)."""
    atomic_write_text(path, json.dumps(obj, **dump_kwargs))


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files (and staging folders) that killed writers left in ``folder``.

    Only files of processes that no longer run are deleted (the pid is in the name), so a
    concurrent writer's temporary file is never removed. Returns the removed paths.
    """
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".*{TMP_MARKER}*")):
        pid = tmp.rsplit(TMP_MARKER, 1)[1]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        removed.append(tmp)
    if removed:
        logger.info(f"Removed {len(removed)} partial file(s) left by killed writers: {removed}")
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would kill it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
