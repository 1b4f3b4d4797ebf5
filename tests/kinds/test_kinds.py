"""The registry of dataset kinds (solo_d2.kinds): lookups, errors, and a kind added from outside the
package that train_net.py's functions then train and evaluate."""

import json
from collections import defaultdict

import pytest
from conftest import REPO, TINY_OPTS, load_script
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools import mask as mask_util

import solo_d2.kinds as kinds
from solo_d2.data.dataset_mapper import SOLODatasetMapper
from solo_d2.data.record import DatasetRecord, dataset_record, set_dataset_record
from solo_d2.data.shapes import SHAPES_CLASSES, generate_shapes
from solo_d2.data.shapes_panoptic import register_shapes_panoptic
from solo_d2.data.specs import is_registered_with, parse_dataset_spec, resolve_spec_paths
from solo_d2.evaluation import SOLOCOCOEvaluator
from solo_d2.kinds import DatasetKind, get_kind, kind_of, kind_of_spec, register_kind, spec_forms


class JSONLinesKind(DatasetKind):
    """A kind of dataset the package does not know: one JSON object per line, each an image's
    detectron2 dataset dict (polygons, XYWH boxes, contiguous category ids)."""

    name = "jsonl"
    spec_prefix = "jsonl:"
    spec_form = "NAME=jsonl:IMAGES.jsonl:IMAGE_DIR"
    description = "JSON lines"
    calls = defaultdict(int)

    def register(self, spec, max_image_pixels):
        name, path, image_dir = parse_dataset_spec(spec, self.spec_prefix, self.spec_form)
        path, image_dir = resolve_spec_paths(
            spec, ("Image list", path), [("Image directory", image_dir)]
        )
        files = {"jsonl_file": path, "image_root": image_dir}
        if is_registered_with(name, self.name, files, f"spec {spec!r}"):
            return name

        def load():
            with open(path) as f:
                dicts = [json.loads(line) for line in f if line.strip()]
            for d in dicts:
                d["file_name"] = f"{image_dir}/{d['file_name']}"
            return dicts

        DatasetCatalog.register(name, load)
        record = DatasetRecord(self.name, files, max_image_pixels=max_image_pixels)
        set_dataset_record(name, record, image_root=image_dir, thing_classes=list(SHAPES_CLASSES))
        return name

    def files(self, name):
        record = dataset_record(name)
        return [
            ("image list", record.files["jsonl_file"]),
            ("image folder", record.files["image_root"]),
        ]

    def build_mapper(self, cfg, is_train):
        self.calls["mapper"] += 1
        return SOLODatasetMapper(cfg, is_train)

    def build_evaluator(self, cfg, name, output_dir):
        self.calls["evaluator"] += 1
        return SOLOCOCOEvaluator(name, ("segm", "bbox"), output_dir=output_dir)


def _write_jsonl(coco_json, out_path):
    """The COCO file of generated shapes as JSON lines of dataset dicts (RLEs compressed)."""
    data = json.loads(coco_json.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    by_image = defaultdict(list)
    for a in data["annotations"]:
        segm = a["segmentation"]
        if isinstance(segm, dict) and isinstance(segm["counts"], list):  # compressed RLE
            segm = mask_util.frPyObjects(segm, *sizes[a["image_id"]])
            segm = {"size": segm["size"], "counts": segm["counts"].decode()}
        by_image[a["image_id"]].append(
            {
                "bbox": a["bbox"],
                "bbox_mode": 1,  # BoxMode.XYWH_ABS
                "category_id": a["category_id"] - 1,  # shapes' ids start at 1
                "segmentation": segm,
                "iscrowd": 0,
            }
        )
    with open(out_path, "w") as f:
        for im in data["images"]:
            d = {k: im[k] for k in ("file_name", "height", "width")}
            f.write(json.dumps({**d, "image_id": im["id"], "annotations": by_image[im["id"]]}))
            f.write("\n")


@pytest.fixture
def jsonl_kind(monkeypatch):
    kind = JSONLinesKind()
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))  # the package's kinds afterwards
    return register_kind(kind)


def test_builtin_kinds_and_lookups():
    assert [k.name for k in kinds.dataset_kinds()][:3] == ["coco", "panoptic", "lvis"]
    assert spec_forms()[0] == "NAME=ANNOTATIONS.json:IMAGE_DIR"  # the form without prefix first
    assert kind_of_spec("x=lvis:a.json:img") is get_kind("lvis")
    # detectron2's builtin datasets: by evaluator_type
    assert kind_of("coco_2017_val") is get_kind("coco")
    assert kind_of("lvis_v1_val") is get_kind("lvis")
    assert kind_of("coco_2017_val_panoptic") is get_kind("panoptic")
    register_shapes_panoptic()
    assert kind_of("shapes_panoptic_val") is get_kind("panoptic")  # its record says so
    assert get_kind("lvis").metric({"segm": {"AP": float("nan")}}) == 0.0
    assert all(get_kind(k).packs for k in ("coco", "lvis", "panoptic"))  # training maps packs


def test_registry_errors(jsonl_kind):
    with pytest.raises(KeyError, match="no dataset kind 'nope'; registered: coco, panoptic"):
        get_kind("nope")
    with pytest.raises(ValueError, match="'jsonl' is registered already"):
        register_kind(JSONLinesKind())
    other = type("Other", (JSONLinesKind,), {"name": "other"})()
    with pytest.raises(ValueError, match="spec prefix 'jsonl:' is kind 'jsonl'"):
        register_kind(other)
    nameless = type("Nameless", (DatasetKind,), {})()
    with pytest.raises(ValueError, match="has no name"):
        register_kind(nameless)
    with pytest.raises(NotImplementedError, match="kind 'nameless' has no evaluator"):
        type("Nameless", (DatasetKind,), {"name": "nameless"})().build_evaluator(None, "x", "")
    unregistrable = type("Builtin", (DatasetKind,), {"name": "builtin"})()  # spec_prefix None
    with pytest.raises(ValueError, match="kind 'builtin' cannot register a split of 'x'"):
        unregistrable.split_spec("x", "x_val", "val.json")


def test_kind_from_outside_trains_and_evaluates_through_train_net(jsonl_kind, tmp_path):
    train_net = load_script(REPO / "train_net.py", "train_net_kinds")
    root = tmp_path / "data"
    specs = []
    for split, n, seed in (("train", 8, 1), ("val", 4, 2)):
        generate_shapes(str(root), split, n, seed=seed)
        _write_jsonl(root / f"{split}.json", root / f"{split}.jsonl")
        specs += ["--dataset", f"k_{split}=jsonl:{root / f'{split}.jsonl'}:{root / split}"]
    parser = train_net.get_parser()
    assert "NAME=jsonl:IMAGES.jsonl:IMAGE_DIR" in parser.format_help().replace("\n", " ")
    out = tmp_path / "out"
    config = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
    args = parser.parse_args(
        ["--config-file", str(config), *specs, *TINY_OPTS]
        + ["DATASETS.TRAIN", "('k_train',)", "DATASETS.TEST", "('k_val',)", "MODEL.DEVICE", "cpu"]
        + ["SOLVER.MAX_ITER", "2", "TEST.SAVE_PLOTS", "False", "OUTPUT_DIR", str(out)]
    )
    try:
        assert train_net.preflight_error(args) is None
        assert kind_of("k_train") is jsonl_kind
        train_net.main(args)
        # trained 2 iterations with the kind's mapper, evaluated with the kind's evaluator
        records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
        assert max(r["iteration"] for r in records if "total_loss" in r) == 1
        assert jsonl_kind.calls["mapper"] >= 2 and jsonl_kind.calls["evaluator"] == 1
        results = json.loads((out / "inference" / "k_val" / "evaluation_results.json").read_text())
        assert "segm" in results and "bbox" in results
        # registering it again from the same files is a no-op; from others an error naming both
        assert kinds.register_dataset(specs[1]) == "k_train"
        other = f"k_train=jsonl:{root / 'val.jsonl'}:{root / 'val'}"
        with pytest.raises(ValueError, match="already registered with jsonl_file=.*a jsonl"):
            kinds.register_dataset(other)
    finally:
        for name in ("k_train", "k_val"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
