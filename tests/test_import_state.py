"""Importing solo_d2's modules changes no process-wide state: what they need (PIL's pixel limit,
lvis's numpy shim, a socket timeout) is set where it is used and restored, or by entry points."""

import os
import subprocess
import sys

from conftest import REPO

CHECK = r"""
import importlib, pkgutil, socket
import PIL.Image

def state():
    out = {"PIL.Image.MAX_IMAGE_PIXELS": PIL.Image.MAX_IMAGE_PIXELS,
           "socket.getdefaulttimeout()": socket.getdefaulttimeout()}
    try:
        import lvis.eval
    except ImportError:
        return out
    out["lvis.eval.np"] = lvis.eval.np
    return out

before = state()
import solo_d2
names = [m.name for m in pkgutil.walk_packages(solo_d2.__path__, "solo_d2.")]
for name in names:
    importlib.import_module(name)
after = state()
changed = {k: (before[k], after[k]) for k in before if after[k] is not before[k]
           and after[k] != before[k]}
assert not changed, f"importing solo_d2 changed: {changed}"
print(len(names), "modules", solo_d2.__file__)
"""


def test_importing_every_module_leaves_process_state_alone():
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    count, _, location = result.stdout.split()[-3:]
    assert int(count) > 30 and location.startswith(str(REPO / "solo_d2"))
