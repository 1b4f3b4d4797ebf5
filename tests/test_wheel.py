"""The wheel: built from this repository, installed into a fresh virtual environment that sees
torch, torchvision and detectron2 of the running one but not its (editable) solo_d2, and used from
a folder outside the checkout: a model from a shipped config by its zoo name, inference, two
training iterations on the generated shapes data. Offline; nothing is written into the package.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, TINY_OPTS

# not copied into the build folder: environments, caches, outputs, earlier builds
BUILD_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "datasets", "output*", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", "*.pyc",
)  # fmt: skip

# run by the fresh environment's Python in a temporary folder: argv[1] the environment,
# argv[2] the config overrides (json)
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import torch

    import solo_d2
    from solo_d2 import model_zoo
    from solo_d2.data.shapes import register_shapes
    from solo_d2.engine import Trainer

    venv, opts = Path(sys.argv[1]).resolve(), json.loads(sys.argv[2])
    package = Path(solo_d2.__file__).resolve().parent
    assert venv in package.parents, f"solo_d2 imported from {package}, not from {venv}"
    assert model_zoo.configs_dir() == package / "model_zoo" / "configs", model_zoo.configs_dir()

    model = model_zoo.get("SOLOv2_R18_quickstart_shapes", device="cpu", opts=opts)
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    assert instances.image_size == (96, 128)

    cfg = model_zoo.get_config(
        "SOLOv2_R18_quickstart_shapes",
        opts=opts + ["SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", "out"],
    )
    register_shapes()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert Path("datasets/shapes/train.json").is_file(), os.listdir(".")
    assert Path("out/model_final.pth").is_file()
    print("WHEEL OK", package)
    """)


def package_files(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in
            sorted(root.rglob("*"))}  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of this repository (so no build output lands in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=BUILD_IGNORE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)],
        check=True,
    )  # fmt: skip
    [built] = (tmp / "dist").glob("solo_d2-*.whl")
    return built


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/")[-1] for n in names if n.startswith("solo_d2/model_zoo/configs/")}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert "solo_d2/model_zoo/__init__.py" in names
    # the developer harnesses (benchmark, AdelaiDet parity) and the repository's folders stay out
    workshop = ("tests/", "tools/", "dev/", "configs/", "demo/", "solo_d2/benchmark/")
    assert not [n for n in names if n.startswith(workshop)]
    assert not [n for n in names if n.endswith("parity.py")]


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # torch, torchvision, detectron2 ... of this environment; .pth files in a directory added by
    # a .pth file are not processed, so this environment's editable solo_d2 stays invisible
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "project_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
        check=True,
    )  # fmt: skip
    package = site / "solo_d2"
    before = package_files(package)
    assert "model_zoo/configs/SOLOv2_R18_quickstart_shapes.yaml" in before

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOLO_D2_DATASETS")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    opts = TINY_OPTS + ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2"]
    res = subprocess.run(
        [str(python), "-c", SCRIPT, str(venv), json.dumps(opts)],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"WHEEL OK {package.resolve()}" in res.stdout
    assert (work / "datasets" / "shapes" / "train").is_dir()  # ./datasets of the working dir
    assert package_files(package) == before  # nothing written inside the installed package
