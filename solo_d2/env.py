"""Environment report for bug reports: ``python -m solo_d2.env``."""

import importlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import List, Tuple

__all__ = ["collect_env", "main"]


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # report any import failure, never crash the report
        return f"not importable ({type(e).__name__}: {e})"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
    return f"{version} at {Path(mod.__file__).parent}"


def _detectron2() -> List[Tuple[str, str]]:
    try:
        import detectron2
    except Exception as e:
        return [("detectron2", f"not importable ({type(e).__name__}: {e})")]
    rows = [("detectron2", f"{detectron2.__version__} at {Path(detectron2.__file__).parent}")]
    source_file = Path(detectron2.__file__).parent / "SOLO_D2_SOURCE"
    if source_file.exists():
        info = json.loads(source_file.read_text())
        if info.get("source") == "github":
            origin = f"built from GitHub source, commit {info.get('ref')}"
        else:
            origin = (
                f"Python sources of PyPI's {info.get('package')} (sha256 {info.get('sha256')}, "
                "installed by tools/setup_env.py)"
            )
    else:
        origin = "installed outside tools/setup_env.py"
    rows.append(("detectron2 source", origin))
    try:
        from .compat import import_compiled_ops

        ops = f"present ({Path(import_compiled_ops().__file__).name})"
    except Exception as e:
        ops = (
            f"ABSENT ({type(e).__name__}): DeformConv, rotated-box ops and the fast COCOeval are "
            "unavailable; solo_d2 does not need them"
        )
    rows.append(("detectron2 compiled ops", ops))
    return rows


def collect_env() -> List[Tuple[str, str]]:
    """(name, value) rows describing this machine and the installed stack."""
    rows = [
        ("Python", sys.version.replace("\n", " ")),
        ("platform", platform.platform()),
        ("solo_d2", _version("solo_d2")),
    ]
    try:
        import torch

        rows.append(("torch", f"{torch.__version__} at {Path(torch.__file__).parent}"))
        rows.append(("torch threads", str(torch.get_num_threads())))
        cuda = torch.cuda.is_available()
        rows.append(("CUDA available", str(cuda)))
        if cuda:
            rows.append(("CUDA (torch built with)", str(torch.version.cuda)))
            for i in range(torch.cuda.device_count()):
                rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
    except Exception as e:
        rows.append(("torch", f"not importable ({type(e).__name__}: {e})"))
    rows.append(("torchvision", _version("torchvision")))
    try:
        import torch
        import torchvision

        torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)
        rows.append(("torchvision ops", "OK (nms runs)"))
    except Exception as e:
        rows.append(("torchvision ops", f"BROKEN ({type(e).__name__}: {e})"))
    rows += _detectron2()
    for name, module in [("fvcore", "fvcore"), ("pycocotools", "pycocotools"), ("OpenCV", "cv2")]:
        rows.append((name, _version(module)))
    try:
        import numpy

        rows.append(("numpy", numpy.__version__))
    except Exception as e:
        rows.append(("numpy", f"not importable ({e})"))
    return rows


def main() -> None:
    rows = collect_env()
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
