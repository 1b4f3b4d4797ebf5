#!/usr/bin/env python3
"""Create or reuse the project's virtual environment at ``.venv/`` and install everything.

Run with any Python >= 3.11 (``make quickstart`` / ``make test`` call it for you)::

    python3 tools/setup_env.py [--force]

Steps (each one is skipped when its result is already there, so a second run takes seconds):

1. ``python -m venv .venv``.
2. torch + torchvision as a matching pair from PyPI (``TORCH_SPEC``/``TORCHVISION_SPEC``). Machines
   that offer a local ``torch+cpu`` wheel through ``PIP_FIND_LINKS`` would otherwise mix that wheel
   with PyPI's CUDA torchvision, which cannot load; the ``!=...+cpu`` clause excludes it. The
   pair is verified by running ``torchvision.ops.nms``.
3. The pinned requirements (``requirements.txt``; ``--test`` adds ``requirements-test.txt``), then
   the evaluation packages of ``requirements-nodeps.txt`` without their declared dependencies
   (their pins contradict ours; the file says why each is safe).
4. detectron2: from its official GitHub source when GitHub is reachable (compiled C++/CUDA ops),
   else the Python sources of the PyPI wheel ``sal-detectron2==0.7.2`` (sha256-verified; its
   ``tools/`` package and its Python-3.10 ``_C`` library are left out: compiled ops are absent).
5. ``pip install -e .`` (solo_d2 itself, without dependencies: they are all installed above).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0,!=2.13.0+cpu")
TORCHVISION_SPEC = os.environ.get("TORCHVISION_SPEC", "torchvision==0.28.0")
D2_GIT_URL = "https://github.com/facebookresearch/detectron2.git"
D2_GIT_REF = os.environ.get("DETECTRON2_GIT_REF", "02b5c4e295e990042a714712c21dc79b731e8833")
D2_PYPI_SPEC = "sal-detectron2==0.7.2"
D2_PYPI_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
# Where the detectron2 install records how it was obtained (read by `python -m solo_d2.env`).
D2_SOURCE_FILE = "SOLO_D2_SOURCE"


def log(msg):
    print(f"[setup] {msg}", flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def pip(*args):
    run([PY, "-m", "pip", "install", "--disable-pip-version-check", *args])


def venv_check(code):
    return subprocess.run([str(PY), "-c", code], capture_output=True, text=True)


def stamp_of(test):
    """Hash of everything that decides what gets installed."""
    h = hashlib.sha256()
    for name in [
        "tools/setup_env.py",
        "requirements.txt",
        "requirements-nodeps.txt",
        "setup.py",
    ] + (["requirements-test.txt"] if test else []):
        h.update((ROOT / name).read_bytes())
    h.update(f"{TORCH_SPEC}|{TORCHVISION_SPEC}|{D2_GIT_REF}|{sys.version_info[:2]}".encode())
    return h.hexdigest()


def ensure_venv():
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])


def ensure_torch():
    probe = (
        "import torch, torchvision;"
        "b=torch.tensor([[0.,0,1,1],[0,0,1,1]]);"
        "torchvision.ops.nms(b, torch.tensor([1.,.5]), .5);"
        "print(torch.__version__, torchvision.__version__)"
    )
    if venv_check(probe).returncode == 0:
        return
    pip(TORCH_SPEC, TORCHVISION_SPEC)
    res = venv_check(probe)
    if res.returncode != 0:
        sys.exit(
            "[setup] ERROR: torch and torchvision were installed but torchvision.ops.nms does not "
            "run, so they are not a matching pair:\n"
            f"{res.stderr.strip()[-2000:]}\n"
            "Set TORCH_SPEC and TORCHVISION_SPEC to a pair built together (same release and same "
            "CUDA/CPU variant) and run again."
        )
    log("torch/torchvision OK: " + res.stdout.strip())


def github_reachable():
    try:
        subprocess.run(
            ["git", "ls-remote", D2_GIT_URL, "HEAD"],
            check=True,
            capture_output=True,
            timeout=20,
        )
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def site_packages():
    res = venv_check("import sysconfig; print(sysconfig.get_paths()['purelib'])")
    return Path(res.stdout.strip())


def install_d2_from_pypi_copy():
    """Install the Python sources of the sal-detectron2 wheel (compiled ops absent)."""
    with tempfile.TemporaryDirectory() as tmp:
        run(
            [PY, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "--python-version", "3.10", "-d", tmp, D2_PYPI_SPEC]
        )  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            sys.exit(f"[setup] ERROR: expected one wheel for {D2_PYPI_SPEC}, got {wheels}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != D2_PYPI_SHA256:
            sys.exit(
                f"[setup] ERROR: sha256 of {wheels[0].name} is {digest}, expected "
                f"{D2_PYPI_SHA256}. Refusing to install an unknown detectron2 copy."
            )
        dest = site_packages()
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [
                m
                for m in zf.namelist()
                if m.startswith("detectron2/") and not m.endswith((".so", ".pyd"))
            ]
            zf.extractall(dest, members)
        info = {
            "source": "pypi-copy",
            "package": D2_PYPI_SPEC,
            "sha256": digest,
            "compiled_ops": False,
            "note": "Python sources only: detectron2._C (DeformConv, rotated boxes, fast "
            "COCOeval) is absent; solo_d2 does not need it.",
        }
        (dest / "detectron2" / D2_SOURCE_FILE).write_text(json.dumps(info, indent=1))
        log(f"detectron2 installed from {wheels[0].name} (sha256 verified, no compiled ops)")


def ensure_detectron2():
    if venv_check("import detectron2.engine, detectron2.model_zoo").returncode == 0:
        return
    if github_reachable():
        log(f"GitHub reachable: building detectron2 {D2_GIT_REF[:10]} from source")
        pip("--no-build-isolation", f"git+{D2_GIT_URL}@{D2_GIT_REF}")
        info = {"source": "github", "ref": D2_GIT_REF, "compiled_ops": True}
        (site_packages() / "detectron2" / D2_SOURCE_FILE).write_text(json.dumps(info, indent=1))
    else:
        log("GitHub unreachable: installing detectron2's Python sources from PyPI's copy")
        install_d2_from_pypi_copy()
    res = venv_check("import detectron2.engine, detectron2.model_zoo")
    if res.returncode != 0:
        sys.exit(f"[setup] ERROR: detectron2 does not import:\n{res.stderr[-2000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test", action="store_true", help="also install test requirements")
    parser.add_argument("--force", action="store_true", help="re-check every step")
    args = parser.parse_args()
    if sys.version_info < (3, 11):  # numpy 2.4, pillow 13, matplotlib 3.11 (requirements.txt)
        sys.exit(
            f"[setup] ERROR: Python >= 3.11 is required (this is {sys.version.split()[0]}): the "
            "pinned numpy, pillow and matplotlib need it; run with python3.11 or newer"
        )

    stamp_file = VENV / (".solo_d2_setup_test" if args.test else ".solo_d2_setup")
    stamp = stamp_of(args.test)
    if not args.force and stamp_file.exists() and stamp_file.read_text() == stamp:
        log(f"environment up to date: {VENV}")
        return
    ensure_venv()
    ensure_torch()
    pip("-r", ROOT / "requirements.txt")
    pip("--no-deps", "-r", ROOT / "requirements-nodeps.txt")
    if args.test:
        pip("-r", ROOT / "requirements-test.txt")
    ensure_detectron2()
    pip("--no-deps", "--no-build-isolation", "-e", ROOT)
    stamp_file.write_text(stamp)
    log(f"environment ready: {VENV}")


if __name__ == "__main__":
    main()
