"""Where the generated datasets go: $SOLO_D2_DATASETS, else ./datasets of the working directory."""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

import solo_d2
from solo_d2.data.shapes import datasets_root, register_shapes
from solo_d2.data.shapes_panoptic import register_shapes_panoptic


def test_datasets_root_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLO_D2_DATASETS", str(tmp_path / "data"))
    assert datasets_root() == str(tmp_path / "data")


def test_datasets_root_defaults_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SOLO_D2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert datasets_root() == str(tmp_path / "datasets")
    monkeypatch.setenv("SOLO_D2_DATASETS", "")  # empty: unset
    assert datasets_root() == str(tmp_path / "datasets")
    monkeypatch.setenv("SOLO_D2_DATASETS", "rel")  # relative: to the working directory
    assert datasets_root() == str(tmp_path / "rel")
    package = os.path.dirname(os.path.abspath(solo_d2.__file__))
    assert not datasets_root().startswith(package)


def test_both_shapes_registrations_use_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("SOLO_D2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    names = ("shapes_train", "shapes_val", "shapes_val_large")
    panoptic = ("shapes_panoptic_train", "shapes_panoptic_val")
    # registered by an earlier test: unregistered here, restored as they were after
    saved = {
        n: (DatasetCatalog[n], MetadataCatalog.get(n))
        for n in names + panoptic
        if n in DatasetCatalog
    }
    for n in names + panoptic:
        DatasetCatalog.pop(n, None)
        MetadataCatalog.pop(n, None)
    try:
        register_shapes()
        register_shapes_panoptic()
        root = tmp_path / "datasets"
        assert MetadataCatalog.get("shapes_val").image_root == str(root / "shapes" / "val")
        assert MetadataCatalog.get("shapes_panoptic_val").image_root == str(
            root / "shapes_panoptic" / "val"
        )
    finally:
        for n in names + panoptic:
            DatasetCatalog.pop(n, None)
            MetadataCatalog.pop(n, None)
        for n, (func, meta) in saved.items():
            DatasetCatalog[n] = func
            MetadataCatalog[n] = meta
