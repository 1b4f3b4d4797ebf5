"""Tests of ``demo/demo.py`` on a panoptic model, run in-process on a tiny SOLOv2 (CPU, offline).

The model is a random-init tiny panoptic SOLOv2 whose outputs are steered far from the merge's
thresholds: one thing class's classifier bias is raised (on the test image the best instance
scores ~0.63 against INSTANCES_CONFIDENCE_THRESH 0.5, the next ~0.45) and the stuff classifier
predicts stuff class 2 everywhere by a margin of 6 logits. On the test image, that gives one
thing segment and one stuff segment (the ~2500 pixels the thing leaves, against
STUFF_AREA_LIMIT 64).
"""

import json
from pathlib import Path
from typing import Dict

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, confident_tiny_model, load_script, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.structures import Instances
from pycocotools import mask as mask_util

from solo_d2.engine import SOLOPredictor
from solo_d2.visualization import drawing

pytestmark = pytest.mark.usefixtures("one_thread")

demo = load_script(REPO / "demo" / "demo.py", "solo_demo_cli")

# Metadata of the test "dataset": project convention, "things" first among the stuff classes.
META_NAME = "demo_panoptic_test_meta"
THING_NAMES = ["circle", "square", "triangle"]
STUFF_NAMES = ["things", "sky", "grass", "water"]
NUM_STUFF = len(STUFF_NAMES) - 1
PANOPTIC_OPTS = {
    "MODEL.META_ARCHITECTURE": "PanopticSOLO",
    "MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES": NUM_STUFF,
    "MODEL.SOLO.PANOPTIC.CHANNELS": 32,
    "MODEL.SOLO.PANOPTIC.STUFF_AREA_LIMIT": 64,
    "MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH": 0.5,
}
THING_CLASS, THING_BIAS = 1, 2.0  # raised classifier bias: that class's best instance ~0.63
STUFF_CLASS, STUFF_BIAS = 2, 6.0  # the stuff class predicted everywhere, by 6 logits
IMAGE_HW = (96, 128)
# Fraction of a segment's pixels that drawing must change (alpha 0.7 blends change ~all).
MIN_CHANGED = 0.9


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The tiny panoptic config (dumped YAML), its steered checkpoint and a test image."""
    root = tmp_path_factory.mktemp("demo_panoptic")
    MetadataCatalog.get(META_NAME).set(thing_classes=THING_NAMES, stuff_classes=STUFF_NAMES)
    cfg = tiny_cfg()
    for key, value in PANOPTIC_OPTS.items():
        cfg.merge_from_list([key, value])
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = IMAGE_HW  # the image's own size
    cfg.DATASETS.TEST = (META_NAME,)
    config = root / "tiny_panoptic.yaml"
    config.write_text(cfg.dump())

    model = confident_tiny_model(**PANOPTIC_OPTS)
    with torch.no_grad():
        model.ins_head.cate_pred.bias[THING_CLASS] += THING_BIAS
        model.stuff_head.predictor.weight.zero_()
        model.stuff_head.predictor.bias.zero_()
        model.stuff_head.predictor.bias[STUFF_CLASS] = STUFF_BIAS
    DetectionCheckpointer(model, save_dir=str(root)).save("model")

    image = root / "image.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(image), rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8))
    return {"root": root, "config": config, "weights": root / "model.pth", "image": image}


def demo_cfg(files: Dict[str, Path]):
    """The demo's config of the tiny panoptic model (what ``main`` builds)."""
    return demo.setup_cfg(str(files["config"]), ["MODEL.WEIGHTS", str(files["weights"])])


def test_panoptic_image_json_and_drawing(files: Dict[str, Path], tmp_path: Path, capsys) -> None:
    """An image through ``main``: the drawing colours the segments, the json's segments decode to
    exactly the predicted segment map, with thing and stuff names and areas right."""
    out = tmp_path / "out" / "drawn.png"
    args = ["--config-file", str(files["config"]), "--input", str(files["image"])]
    args += ["--output", str(out), "--json", "--opts", "MODEL.WEIGHTS", str(files["weights"])]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "1 thing and 1 stuff segments" in printed, printed

    # the reference: the predictor in this process, on the same image
    cfg = demo_cfg(files)
    image = cv2.imread(str(files["image"]))
    if cfg.INPUT.FORMAT == "RGB":
        image = image[:, :, ::-1]
    predictor = SOLOPredictor(cfg)
    prediction = predictor.predict([image])[0]
    seg, segments_info = prediction["panoptic_seg"]
    assert seg.shape == IMAGE_HW and seg.dtype == torch.int32
    assert "sem_seg" not in prediction
    assert isinstance(predictor([image])[0], Instances)  # the instance interface still works
    things = [s for s in segments_info if s["isthing"]]
    stuff = [s for s in segments_info if not s["isthing"]]
    assert len(things) == 1 and things[0]["category_id"] == THING_CLASS, segments_info
    assert len(stuff) == 1 and stuff[0]["category_id"] == STUFF_CLASS, segments_info

    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["height"], record["width"]) == IMAGE_HW
    panoptic = record["panoptic"]
    assert (panoptic["height"], panoptic["width"]) == IMAGE_HW
    assert [s["id"] for s in panoptic["segments"]] == [s["id"] for s in segments_info]
    covered = np.zeros(IMAGE_HW, dtype=bool)
    for segment, info in zip(panoptic["segments"], segments_info):
        assert isinstance(segment["segmentation"]["counts"], str)
        mask = mask_util.decode(segment["segmentation"]).astype(bool)
        np.testing.assert_array_equal(mask, seg.numpy() == segment["id"])
        covered |= mask
        assert segment["area"] == int(mask.sum()) == int(mask_util.area(segment["segmentation"]))
        assert segment["area"] == info["area"]
        assert segment["isthing"] == info["isthing"]
        assert segment["category_id"] == info["category_id"]
        if segment["isthing"]:
            assert segment["category"] == THING_NAMES[segment["category_id"]]
            assert segment["score"] == pytest.approx(info["score"])
        else:
            assert segment["category"] == STUFF_NAMES[segment["category_id"]]
            assert "score" not in segment
    np.testing.assert_array_equal(covered, seg.numpy() > 0)
    for instance in record["instances"]:  # the instance records are there as before
        assert instance["score"] >= 0.5

    drawn = cv2.imread(str(out))
    assert drawn.shape == (*IMAGE_HW, 3)
    changed = np.any(drawn != cv2.imread(str(files["image"])), axis=2)
    for info in segments_info:
        inside = seg.numpy() == info["id"]
        assert changed[inside].mean() >= MIN_CHANGED, info


def test_bad_arguments_still_error(files: Dict[str, Path], capsys) -> None:
    """--json without --output is refused (exit 2) before any model is built, as before."""
    with pytest.raises(SystemExit) as exc:
        demo.main(["--config-file", str(files["config"]), "--input", str(files["image"]), "--json"])
    assert exc.value.code == 2
    assert "--json needs --input images and an --output" in capsys.readouterr().err


def test_video_frames_drawn_panoptic(
    files: Dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    """Video frames of a panoptic model are drawn as panoptic segmentations."""
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, IMAGE_HW[::-1])
    rng = np.random.default_rng(1)
    for _ in range(2):
        writer.write(rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8))
    writer.release()
    drawn = []
    draw = drawing.InstanceDrawer.draw

    def spy(self, image, instances, panoptic=None):
        drawn.append(panoptic)
        return draw(self, image, instances, panoptic)

    monkeypatch.setattr(drawing.InstanceDrawer, "draw", spy)
    args = ["--config-file", str(files["config"]), "--video-input", str(video)]
    args += ["--output", str(tmp_path / "out"), "--opts", "MODEL.WEIGHTS", str(files["weights"])]
    assert demo.main(args) == 0
    assert "2 frames" in capsys.readouterr().out
    assert len(drawn) == 2 and all(p is not None for p in drawn)
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    capture.release()


def test_large_image_drawn_downscaled(files: Dict[str, Path], monkeypatch) -> None:
    """Above MAX_DRAW_PIXELS the image and its segment map are downscaled alike (nearest
    neighbour: every drawn id is a predicted one) and the drawing has the downscaled size."""
    seg = torch.zeros((300, 400), dtype=torch.int32)
    seg[:, 200:] = 7
    seg[100:200, 50:150] = 70000  # beyond uint16: ids must not be truncated or blended
    segments_info = [
        {"id": 7, "isthing": False, "category_id": 3, "area": 60000},
        {"id": 70000, "isthing": True, "category_id": 0, "area": 10000, "score": 0.9},
    ]
    image = np.full((300, 400, 3), 128, np.uint8)
    small, small_seg = drawing.fit_panoptic_for_drawing(image, seg, 120 * 160)
    assert small.shape == (120, 160, 3) and small_seg.shape == (120, 160)
    assert set(small_seg.unique().tolist()) == {0, 7, 70000}
    assert (small_seg[:, 81:] == 7).all() and (small_seg[:, :79] != 7).all()
    assert drawing.fit_panoptic_for_drawing(image, seg, 300 * 400)[1] is seg

    monkeypatch.setattr(drawing, "MAX_DRAW_PIXELS", 120 * 160)
    drawer = drawing.InstanceDrawer.from_config(demo_cfg(files))
    before = [dict(s) for s in segments_info]
    drawn = drawer.draw(image, Instances((300, 400)), (seg, segments_info))
    assert drawn.shape == (120, 160, 3)
    assert segments_info == before  # the Visualizer's area rewrite does not leak out
    assert (drawn[:, 90:] != 128).any(axis=2).all()  # the stuff half is coloured


def test_stuff_names(files: Dict[str, Path]) -> None:
    """Stuff names: the metadata's when it names every stuff class (the project's layout or
    detectron2's standard one, things then stuff), else "stuff <id>"; "things" first."""
    cfg = demo_cfg(files).clone()
    cfg.defrost()
    assert drawing.stuff_class_names(cfg) == STUFF_NAMES
    assert drawing.class_names(cfg) == THING_NAMES
    cfg.DATASETS.TEST = ()
    generic = ["things", "stuff 1", "stuff 2", "stuff 3"]
    assert drawing.stuff_class_names(cfg) == generic
    standard = "demo_panoptic_test_standard_meta"
    MetadataCatalog.get(standard).set(stuff_classes=THING_NAMES + STUFF_NAMES[1:])
    cfg.DATASETS.TEST = (standard,)
    assert drawing.stuff_class_names(cfg) == STUFF_NAMES
    wrong = "demo_panoptic_test_wrong_meta"
    MetadataCatalog.get(wrong).set(stuff_classes=["things", "sky"])
    cfg.DATASETS.TEST = (wrong,)
    assert drawing.stuff_class_names(cfg) == generic
