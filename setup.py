"""solo_d2: the SOLO family of instance segmentation models for Detectron2.

detectron2 is not on PyPI under its own name, so it is not listed in install_requires: install it
first (``python3 tools/setup_env.py`` does it; README "Install into an existing detectron2
environment" says what an existing environment needs).

The model zoo's configs live once, in the top-level ``configs/``; building the package (a wheel,
or ``pip install .``) copies them into ``solo_d2/model_zoo/configs/``, where
``solo_d2.model_zoo`` finds them in an installed package. A source checkout and an editable
install read ``configs/`` itself.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    """build_py that also places ``configs/*.yaml`` into the built ``solo_d2.model_zoo``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads configs/ itself
            return
        dest = Path(self.build_lib) / "solo_d2" / "model_zoo" / "configs"
        self.mkpath(str(dest))
        for config in sorted(CONFIGS.glob("*.yaml")):
            self.copy_file(str(config), str(dest / config.name))


setup(
    name="solo_d2",
    version="0.1.0",
    description="SOLO, Decoupled SOLO and SOLOv2 instance segmentation for Detectron2",
    packages=find_packages(include=["solo_d2", "solo_d2.*"]),
    cmdclass={"build_py": BuildPyWithConfigs},
    # the pins of requirements.txt (numpy 2.4, pillow 13, matplotlib 3.11) need Python 3.11
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
        "orjson>=3.9",  # fast reading of COCO/LVIS-size annotation files
        "opencv-python-headless>=4.5",
        "numpy",
        "setuptools<81",  # detectron2.model_zoo needs pkg_resources
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
        # tools/export_model.py (onnx) and running exports, demo --onnx (onnxruntime)
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],
    },
)
