"""Tests of registering COCO-format datasets from ``--dataset NAME=ANNOTATIONS.json:IMAGE_DIR``."""

import argparse
import json
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.shapes import SHAPES_CLASSES, generate_shapes
from solo_d2.data.specs import parse_dataset_spec
from solo_d2.engine.cli import add_dataset_arguments, register_datasets_from_args
from solo_d2.kinds import kind_of_spec

FORM = "NAME=ANNOTATIONS.json:IMAGE_DIR"


@pytest.fixture
def name() -> Iterator[str]:
    """A dataset name unique to the test (the catalogs are global), unregistered afterwards."""
    name = f"test_ds_{uuid.uuid4().hex[:12]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(generate_shapes(str(tmp_path_factory.mktemp("shapes")), "mini", 20, seed=7))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("coco=/data/train.json:/data/train2017", ("coco", "/data/train.json", "/data/train2017")),
        ("a=ann.json:imgs", ("a", "ann.json", "imgs")),
        ("x=/d/k=v/ann=1.json:/d/img=s", ("x", "/d/k=v/ann=1.json", "/d/img=s")),
        ("x=/d/a:b/ann.json:/d/imgs", ("x", "/d/a:b/ann.json", "/d/imgs")),
    ],
)
def test_parse_good_specs(spec: str, expected: tuple[str, str, str]) -> None:
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["ann.json:imgs", "=ann.json:imgs", "a=ann.json", "a=:imgs", "a=ann.json:", ""]
)
def test_parse_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_dataset_spec(spec)
    assert repr(spec) in str(e.value) and FORM in str(e.value)


def test_missing_files_are_named(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        register_coco_dataset(f"{name}={missing}:{tmp_path}")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        register_coco_dataset(f"{name}={ann}:{tmp_path / 'no_such_dir'}")
    with pytest.raises(NotADirectoryError, match="ann.json"):
        register_coco_dataset(f"{name}={ann}:{ann}")
    assert name not in DatasetCatalog.list()


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"images": [], "annotations": []}', "'categories'"),
        ('{"images": {}, "annotations": [], "categories": []}', "'images'"),
        ("[1, 2]", "not an object"),
        ('{"images": [', "not valid JSON"),
    ],
)
def test_non_coco_json_is_rejected(tmp_path: Path, name: str, content: str, reason: str) -> None:
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    with pytest.raises(ValueError) as e:
        register_coco_dataset(f"{name}={ann}:{tmp_path}")
    assert str(ann) in str(e.value) and reason in str(e.value)
    assert name not in DatasetCatalog.list()


def test_register_shapes_json(shapes_json: Path, name: str, tmp_path: Path) -> None:
    image_dir = shapes_json.with_suffix("")
    spec = f"{name}={shapes_json}:{image_dir}"
    assert register_coco_dataset(spec) == name
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 20
    assert all(Path(d["file_name"]).is_file() for d in dicts)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == list(SHAPES_CLASSES)
    assert (meta.json_file, meta.image_root, meta.evaluator_type) == (
        str(shapes_json),
        str(image_dir),
        "coco",
    )
    assert register_coco_dataset(spec) == name  # same files again: fine
    with pytest.raises(ValueError, match=name):
        register_coco_dataset(f"{name}={shapes_json}:{tmp_path}")


def test_relative_paths_are_made_absolute(
    shapes_json: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(shapes_json.parent)
    register_coco_dataset(f"{name}={shapes_json.name}:{shapes_json.stem}")
    assert MetadataCatalog.get(name).json_file == str(shapes_json)
    assert MetadataCatalog.get(name).image_root == str(shapes_json.with_suffix(""))


def test_command_line(
    shapes_json: Path, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOLO_D2_DATASETS", str(tmp_path))  # in case shapes_* get generated
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert FORM in help_text and "DATASETS.TRAIN" in help_text

    assert register_datasets_from_args(parser.parse_args([])) == []
    spec = f"{name}={shapes_json}:{shapes_json.with_suffix('')}"
    args = parser.parse_args(["--dataset", spec, "--dataset", spec])
    assert register_datasets_from_args(args) == [name, name]
    assert {name, "shapes_train", "shapes_val"} <= set(DatasetCatalog.list())
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset"])


def test_kind_of_spec() -> None:
    assert kind_of_spec("a=ann.json:img").name == "coco"
    assert kind_of_spec("a=panoptic:p.json:png:img").name == "panoptic"
    assert kind_of_spec("a=lvis:ann.json:img").name == "lvis"
    assert kind_of_spec("a=C:/data/ann.json:img").name == "coco"  # a drive letter is not a kind
