"""solo_d2: the SOLO family of instance segmentation models for Detectron2.

detectron2 is not on PyPI under its own name, so it is not listed in install_requires: install it
first (``python3 tools/setup_env.py`` does it, see README "How detectron2 gets installed").
"""

from setuptools import find_packages, setup

setup(
    name="solo_d2",
    version="0.1.0",
    description="SOLO, Decoupled SOLO and SOLOv2 instance segmentation for Detectron2",
    packages=find_packages(include=["solo_d2", "solo_d2.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.2",
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
