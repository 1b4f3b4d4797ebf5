"""An export evaluated on a dataset, and int8 quantization (tools/export_model.py
--evaluate-dataset, --quantize int8; solo_d2.export.quantize / .evaluate) on CPU.

The model is the quickstart config (narrowed) after a few AdamW steps on a tiny COCO dataset of
drawn rectangles written to disk, and evaluated on the same images: what matters here is that the
PyTorch model and its exports are scored by the same evaluator on real detections, not the AP.
Int8 results differ between CPUs (VNNI or not, AVX2 or AVX-512 kernels): they are compared with
tolerances, never exactly.
"""

import json

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, load_script, solo_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from solo_d2.export import SOLOExportable, export_onnx
from solo_d2.export.compare import compare_detections
from solo_d2.export.quantize import (
    DEFAULT_KEEP_FLOAT,
    PREDICTION_CONVS,
    conv_nodes,
    layer_errors,
    quantize_export,
)
from solo_d2.export.runtime import ONNXRuntimeModel
from solo_d2.modeling.targets import instance_targets

QUICKSTART_CONFIG = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")

# image size of the dataset, and the test resize that keeps it (the model trains at this size)
H, W = 128, 160
TEST_SIZE = ["INPUT.MIN_SIZE_TEST", str(H), "INPUT.MAX_SIZE_TEST", str(W)]
STEPS = 30


def draw_dataset(folder, count=4, seed=0):
    """``count`` H x W images of 2-3 filled rectangles of 4 colours (the class) on a dim noisy
    background, as a COCO dataset (PNG files + json); returns (json path, training inputs)."""
    rng = np.random.default_rng(seed)
    colors = [(40, 40, 220), (40, 220, 40), (220, 40, 40), (220, 220, 40)]
    images, annotations, inputs = [], [], []
    for i in range(count):
        image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
        boxes, classes = [], []
        for _ in range(int(rng.integers(2, 4))):
            w, h = (int(v) for v in rng.integers(24, 64, 2))
            x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
            c = int(rng.integers(0, 4))
            image[y : y + h, x : x + w] = colors[c]
            boxes.append((x, y, x + w, y + h))
            classes.append(c)
        masks = np.zeros((len(boxes), H, W), dtype=bool)
        for m, (x1, y1, x2, y2) in zip(masks, boxes):
            m[y1:y2, x1:x2] = True
        for k in range(len(boxes) - 1, 0, -1):  # later rectangles cover earlier ones
            masks[:k] &= ~masks[k]
        cv2.imwrite(str(folder / f"{i}.png"), image)
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": H, "width": W})
        for m, c in zip(masks, classes):
            ys, xs = np.nonzero(m)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            poly = [float(v) for v in (x1, y1, x2, y1, x2, y2, x1, y2)]
            annotations.append(
                {
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float(m.sum()), "iscrowd": 0, "segmentation": [poly],
                }
            )  # fmt: skip
        inputs.append(training_input(image, masks, classes))
    categories = [{"id": c + 1, "name": n} for c, n in enumerate(["a", "b", "c", "d"])]
    path = folder / "ann.json"
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path, inputs


def training_input(image, masks, classes):
    """A training input dict as the mapper makes it (BGR image, SOLO targets)."""
    masks = torch.as_tensor(masks)
    valid, centers, small = instance_targets(masks, 4)
    inst = Instances(masks.shape[1:])
    inst.gt_boxes = Boxes(BitMasks(masks).get_bounding_boxes().tensor)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    inst.gt_centers = centers
    inst.gt_masks_small = small
    image = torch.as_tensor(image.transpose(2, 0, 1).copy())
    return {"image": image, "instances": inst[valid], "height": H, "width": W}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, dataset spec, dataset name): the quickstart config's model after
    ``STEPS`` AdamW steps on the drawn dataset."""
    folder = tmp_path_factory.mktemp("quantize")
    (folder / "images").mkdir()
    ann, inputs = draw_dataset(folder / "images")
    (folder / "ann.json").write_bytes(ann.read_bytes())
    cfg = solo_cfg(QUICKSTART_CONFIG)
    cfg.MODEL.SOLO.LOSS.FOCAL_WEIGHT = 1.0  # inference does not read it (see test_export.py)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(STEPS):
        optimizer.zero_grad()
        with EventStorage():
            sum(model(inputs).values()).backward()
        optimizer.step()
    model.eval()
    DetectionCheckpointer(model, save_dir=str(folder)).save("trained")
    name = f"drawn_{abs(hash(str(folder)))}"
    spec = f"{name}={folder / 'ann.json'}:{folder / 'images'}"
    return folder / "trained.pth", spec, name, model


def export_tool():
    return load_script(REPO / "tools" / "export_model.py", "export_model")


def run_tool(trained, out, *flags):
    weights, spec, _, _ = trained
    return export_tool().main(
        ["--config-file", str(QUICKSTART_CONFIG), "--format", "onnx", "--output", str(out)]
        + ["--dataset", spec, *flags, "--opts", "MODEL.WEIGHTS", str(weights), *TEST_SIZE]
    )


def test_float_export_evaluates_like_pytorch(trained, tmp_path, capsys):
    _, _, name, _ = trained
    assert run_tool(trained, tmp_path, "--evaluate-dataset", name) == 0
    info = json.loads((tmp_path / "export.json").read_text())
    evaluation = info["evaluation"]
    assert evaluation["dataset"] == name
    pytorch, export = evaluation["pytorch"], evaluation["export"]
    assert pytorch["segm"]["AP"] > 10  # a real comparison: the model detects the rectangles
    # the float export gives PyTorch's detections: equal AP up to float rounding
    for task in ("segm", "bbox"):
        assert abs(pytorch[task]["AP"] - export[task]["AP"]) < 0.05, task
    assert abs(evaluation["mask_ap_drop"]) < 0.05
    assert "PASS mask AP drop" in capsys.readouterr().out


def test_ap_drop_above_the_threshold_fails(trained, tmp_path, capsys, monkeypatch):
    """An export that loses detections (here: every other one) fails the check, exit status 1."""
    _, _, name, _ = trained
    tool = export_tool()

    class LosingHalf(ONNXRuntimeModel):
        def run(self, image):
            out = super().run(image)
            return {k: v[::2] for k, v in out.items()}

    monkeypatch.setattr(tool, "ONNXRuntimeModel", LosingHalf)
    weights, spec, _, _ = trained
    rc = tool.main(
        ["--config-file", str(QUICKSTART_CONFIG), "--format", "onnx", "--output", str(tmp_path)]
        + ["--dataset", spec, "--evaluate-dataset", name, "--max-ap-drop", "1"]
        + ["--opts", "MODEL.WEIGHTS", str(weights), *TEST_SIZE]
    )
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAIL mask AP drop" in out
    evaluation = json.loads((tmp_path / "export.json").read_text())["evaluation"]
    assert evaluation["mask_ap_drop"] > 1  # written even when it fails


def test_int8_export(trained, tmp_path, capsys):
    """--quantize int8: a QDQ model with the prediction convolutions left in float, its per-layer
    errors measured, that the runtime, the evaluation and the demo take, close to PyTorch."""
    _, _, name, model = trained
    rc = run_tool(
        trained, tmp_path, "--quantize", "int8", "--calibration-dataset", name,
        *[f for node in PREDICTION_CONVS for f in ("--keep-float", node)],
        "--layer-errors", "--evaluate-dataset", name, "--max-ap-drop", "100",
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "Conv nodes in int8" in out and "lowest SQNR" in out
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["file"] == "model_int8.onnx" and info["float_file"] == "model.onnx"
    q = info["quantization"]
    assert q["calibration_images"] == 4 and q["reduce_range"] is True
    assert len(q["kept_float"]) == 11  # 5 levels of category and of kernel predictions, 1 mask
    assert all(any(k in n for k in PREDICTION_CONVS) for n in q["kept_float"])
    assert len(q["quantized"]) == 55 and not set(q["quantized"]) & set(q["kept_float"])
    errors = q["layer_errors_db"]
    assert set(errors) == set(q["quantized"])
    # 8-bit activations, 7-bit weights: tens of dB of SQNR per layer, whatever the CPU
    assert all(e["output"] > 20 and e["weight"] > 20 for e in errors.values())

    graph = onnx.load(str(tmp_path / "model_int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    evaluation = info["evaluation"]
    # int8 keeps the model's detections to a few AP points on every CPU kind (tolerance, not
    # equality: the int8 kernels differ between CPUs)
    assert abs(evaluation["mask_ap_drop"]) < 10
    assert evaluation["export"]["segm"]["AP"] > 10

    # PyTorch's confident detections, to int8 precision
    images = trained[0].parent / "images"
    image = cv2.imread(str(images / "0.png"))
    x = torch.as_tensor(image.transpose(2, 0, 1).astype("float32"))
    with torch.no_grad():
        ref = model([{"image": x}])[0]["instances"]
    out = ONNXRuntimeModel(tmp_path / "model_int8.onnx").run(x)
    keep = out["scores"] > 0.3
    agreement = compare_detections(
        ref[ref.scores > 0.3], out["scores"][keep], out["classes"][keep], out["masks"][keep],
        score_tol=0.1, min_iou=0.8,
    )  # fmt: skip
    assert agreement.num_paired >= 1 and agreement.min_mask_iou >= 0.8, agreement

    # the demo takes the int8 export as it takes the float one
    demo = load_script(REPO / "demo" / "demo.py", "solo_demo")
    rc = demo.main(
        ["--config-file", str(QUICKSTART_CONFIG), "--input", str(images / "0.png")]
        + ["--onnx", str(tmp_path / "model_int8.onnx"), "--output", str(tmp_path / "demo")]
        + ["--json", "--confidence-threshold", "0.3", "--opts", *TEST_SIZE]
    )
    assert rc == 0
    record = json.loads((tmp_path / "demo" / "0.json").read_text())
    assert len(record["instances"]) >= 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "int8"], "--quantize int8 needs calibration images: --calibration-dataset"),
        (["--calibration-dataset", "x"], "--calibration-dataset applies to --quantize int8"),
        (["--quantize", "int8", "--calibration-dataset", "x", "--calibration-images", "0"],
         "--calibration-images must be at least 1"),
        (["--evaluate-dataset", "x", "--no-verify"], "--evaluate-dataset runs the export"),
        (["--evaluate-dataset", "x", "--batch-size", "2"], "drop --batch-size"),
        (["--max-ap-drop", "-1"], "--max-ap-drop must be >= 0"),
    ],
)  # fmt: skip
def test_bad_flags_are_usage_errors(flags, message, tmp_path, capsys):
    argv = ["--config-file", str(QUICKSTART_CONFIG), "--format", "onnx", "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        export_tool().main(argv + flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_quantize_needs_onnx(tmp_path, capsys):
    argv = ["--config-file", str(QUICKSTART_CONFIG), "--format", "torchscript"]
    with pytest.raises(SystemExit):
        export_tool().main(argv + ["--output", str(tmp_path), "--quantize", "int8"])
    assert "--quantize works on ONNX exports" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--evaluate-dataset", "--calibration-dataset"])
def test_unknown_dataset_names_the_flag(trained, tmp_path, capsys, flag):
    flags = [flag, "shapes_vall"]
    if flag == "--calibration-dataset":
        flags += ["--quantize", "int8"]
    assert run_tool(trained, tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} shapes_vall:" in err and "did you mean 'shapes_val'" in err
    assert not (tmp_path / "model.onnx").exists()  # checked before any work


def test_keep_float_must_name_a_conv(trained, tmp_path):
    _, _, _, model = trained
    export_onnx(SOLOExportable(model), torch.zeros(3, 64, 64), tmp_path / "m.onnx")
    images = [np.zeros((3, 64, 96), np.float32)]
    with pytest.raises(ValueError, match=r"keep-float \['/no/such/conv'\] match no Conv node"):
        quantize_export(
            tmp_path / "m.onnx", tmp_path / "q.onnx", images, keep_float=["/no/such/conv"]
        )
    with pytest.raises(ValueError, match="at least one image"):
        quantize_export(tmp_path / "m.onnx", tmp_path / "q.onnx", [])


def test_quantize_everything_by_default_and_measure(trained, tmp_path):
    """By default every Conv is int8, and :func:`layer_errors` measures them all."""
    _, _, _, model = trained
    export_onnx(SOLOExportable(model), torch.zeros(3, 64, 64), tmp_path / "m.onnx")
    g = np.random.default_rng(0)
    images = [g.integers(0, 256, (3, 96, 128)).astype(np.float32) for _ in range(2)]
    result = quantize_export(tmp_path / "m.onnx", tmp_path / "q.onnx", images)
    assert DEFAULT_KEEP_FLOAT == () and result.kept_float == [] and result.calibration_images == 2
    assert len(result.quantized) == len(conv_nodes(tmp_path / "m.onnx"))
    errors = layer_errors(tmp_path / "m.onnx", tmp_path / "q.onnx", images[:1])
    assert set(errors) == set(result.quantized)
    assert all(np.isfinite(e["output"]) for e in errors.values())


def test_panoptic_dataset_is_refused(trained, tmp_path, capsys):
    """The export holds the instances only: a panoptic dataset cannot evaluate it."""
    assert run_tool(trained, tmp_path, "--evaluate-dataset", "shapes_panoptic_val") == 2
    err = capsys.readouterr().err
    assert "error: --evaluate-dataset shapes_panoptic_val:" in err and "panoptic" in err
