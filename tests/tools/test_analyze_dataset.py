"""tools/analyze_dataset.py on COCO and panoptic specs and registered names; one-line errors."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import (
    HAND_CLASSES,
    HAND_GRIDS,
    HAND_RANGES,
    REPO,
    hand_built_dicts,
    load_script,
    write_tiny_panoptic,
)

analyze_dataset = load_script(REPO / "tools" / "analyze_dataset.py", "analyze_dataset")

CONFIG = str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml")
# the hand-built dataset's levels and resizes (conftest, test_dataset_report.py)
OPTS = ["--opts", "MODEL.SOLO.FPN_SCALE_RANGES", str(HAND_RANGES),
        "MODEL.SOLO.NUM_GRIDS", str(HAND_GRIDS), "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MIN_SIZE_TEST", "128", "MODEL.SOLO.NUM_CLASSES", "3"]  # fmt: skip


def write_coco(folder, dicts):
    """The dataset dicts as a COCO file (XYWH boxes) with blank images; return the spec's part
    after NAME=."""
    images, annotations = [], []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(dicts):
        cv2.imwrite(str(folder / "images" / f"{i}.png"), np.zeros((d["height"], d["width"], 3)))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": d["height"],
                       "width": d["width"]})  # fmt: skip
        for a in d["annotations"]:
            box = list(a["bbox"])
            if a["bbox_mode"] == 0:  # XYXY -> XYWH
                box = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            if box[0] >= d["width"]:  # the checks refuse boxes outside the image: leave it out
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": box,
                                "category_id": a["category_id"] + 1, "iscrowd": a["iscrowd"],
                                "segmentation": a["segmentation"]})  # fmt: skip
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(HAND_CLASSES)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "ann.json").write_text(json.dumps(data))
    return f"{folder / 'ann.json'}:{folder / 'images'}"


def test_coco_spec_then_registered_name(tmp_path, capsys):
    spec = "hand_coco=" + write_coco(tmp_path / "data", hand_built_dicts())
    out = tmp_path / "report"
    argv = ["--config-file", CONFIG, "--dataset", spec, "--output", str(out), *OPTS]
    assert analyze_dataset.main(argv) == 0
    printed = capsys.readouterr().out
    assert "dataset 'hand_coco': 4 images, 11 instances" in printed
    assert "warnings:" in printed and "MODEL.SOLO.NUM_GRIDS[0]" in printed
    report = json.loads((out / "report.json").read_text())
    # the hand-computed numbers (test_dataset_report.py); the no-segmentation annotation is a
    # fault the COCO checks leave out at registration, so it is not counted here
    assert report["test"]["per_level"] == [4, 5, 0, 1, 1]
    assert report["train"]["same_class_same_cell"] == [4, 0, 2, 0, 0]
    assert report["left_out"]["crowd"] == 1
    assert report["config_file"] == CONFIG
    assert cv2.imread(str(out / "scale_histogram.png")).shape == (420, 700, 3)

    # the name is registered now: --dataset NAME works too (and a model zoo name for the config)
    argv = ["--config-file", Path(CONFIG).stem, "--dataset", "hand_coco", "--output",
            str(tmp_path / "again"), *OPTS]  # fmt: skip
    assert analyze_dataset.main(argv) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["test"] == report["test"]
    assert again["config_file"] == CONFIG


def test_panoptic_spec(tmp_path, capsys):
    json_file, png_dir, image_dir = write_tiny_panoptic(tmp_path)
    spec = f"hand_pan=panoptic:{json_file}:{png_dir}:{image_dir}"
    argv = ["--config-file", CONFIG, "--dataset", spec, "--output", str(tmp_path / "r")]
    assert analyze_dataset.main(argv) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # 4 images, each with a square and a bar (thing segments); image 1's crowd square left out
    assert report["num_instances"] == 8 and report["left_out"]["crowd"] == 1
    assert report["instances_per_class"] == {"square": 4, "bar": 4}
    assert "MODEL.SOLO.NUM_CLASSES is 4 but the dataset has 2 classes" in report["warnings"][0]


@pytest.mark.parametrize(
    "dataset, phrase",
    [
        (
            "shapes_trian",
            "'shapes_trian' is not a registered dataset (did you mean 'shapes_train'?)",
        ),
        ("bad=nocolon.json", "Bad dataset spec 'bad=nocolon.json': missing ':'"),
        ("gone=missing.json:images", "Annotation file"),
    ],
)
def test_bad_dataset_is_one_line_and_status_2(tmp_path, capsys, dataset, phrase):
    argv = ["--config-file", CONFIG, "--dataset", dataset, "--output", str(tmp_path / "r")]
    assert analyze_dataset.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not (tmp_path / "r").exists()


def test_fit_writes_a_config_that_loads_and_passes_preflight(tmp_path, capsys):
    spec = "hand_fit=" + write_coco(tmp_path / "data", hand_built_dicts())
    out_yaml = tmp_path / "fitted" / "hand.yaml"
    out_yaml.parent.mkdir()
    argv = ["--config-file", CONFIG, "--dataset", spec, "--output", str(tmp_path / "r"),
            "--fit", str(out_yaml), *OPTS, "MODEL.SOLO.NMS_PRE_TOPK", "300"]  # fmt: skip
    assert analyze_dataset.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"fitted config {out_yaml}" in printed and "with the fitted config:" in printed
    # changed keys are marked with "*"
    assert "\n* DATASETS.TRAIN: ('shapes_train',) -> ('hand_fit',)  (the analysed" in printed
    assert "\n  MODEL.SOLO.NUM_CLASSES: 3 -> 3  (the dataset's 3 thing classes)" in printed
    fitted = analyze_dataset.load_config(str(out_yaml))
    assert fitted.DATASETS.TRAIN == ("hand_fit",) and fitted.MODEL.SOLO.NUM_CLASSES == 3
    # an --opts override the fit does not set is written too, with its source
    assert fitted.MODEL.SOLO.NMS_PRE_TOPK == 300 and "# from --opts" in out_yaml.read_text()
    assert fitted.MODEL.RESNETS.DEPTH == 18  # the base's architecture


@pytest.mark.parametrize(
    "dataset, fit, phrase",
    [
        (None, "missing_folder/fit.yaml", "missing_folder does not exist"),
        ("nope_dataset", "fit.yaml", "'nope_dataset' is not a registered dataset"),
    ],
)
def test_fit_bad_out_or_dataset_is_one_line_and_status_2(tmp_path, capsys, dataset, fit, phrase):
    dataset = dataset or "hand_bad=" + write_coco(tmp_path / "data", hand_built_dicts())
    argv = ["--config-file", CONFIG, "--dataset", dataset, "--output", str(tmp_path / "r"),
            "--fit", str(tmp_path / fit)]  # fmt: skip
    assert analyze_dataset.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
    assert not (tmp_path / fit).exists()


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--trials", "10"], "--trials and --val-dataset need --fit OUT.yaml"),
        (["--fit", "x.yaml", "--val-dataset", "shapes_val"], "--val-dataset needs --trials"),
        (["--fit", "x.yaml", "--trials", "-3"], "--trials must be 0 (off) or a number"),
    ],
)
def test_trial_arguments_are_checked(tmp_path, capsys, extra, phrase):
    argv = ["--config-file", CONFIG, "--dataset", "shapes_train", *extra]
    with pytest.raises(SystemExit) as e:
        analyze_dataset.main(argv)
    assert e.value.code == 2 and phrase in capsys.readouterr().err


def test_trials_with_a_bad_validation_set_is_one_line_and_status_2(tmp_path, capsys):
    spec = "hand_val=" + write_coco(tmp_path / "data", hand_built_dicts())
    argv = ["--config-file", CONFIG, "--dataset", spec, "--output", str(tmp_path / "r"),
            "--fit", str(tmp_path / "fit.yaml"), "--trials", "5", "--val-dataset",
            "nope_val", *OPTS]  # fmt: skip
    assert analyze_dataset.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope_val' is not a registered dataset" in err[0], err
    assert not (tmp_path / "fit.yaml").exists()  # OUT.yaml only once the trials chose
