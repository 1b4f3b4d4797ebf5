"""TorchScript and ONNX export (solo_d2.export, tools/export_model.py, demo --onnx) on CPU.

Parity is checked against the eager PyTorch model by ``compare_detections``: the same number of
detections, each paired with one of the same class whose score is within 1e-3 and whose mask has
IoU >= 0.99 (paired, not compared in order: near-tied scores may swap between runtimes), on:

* the parity fixture's checkpoint (AdelaiDet layout, every grid cell above the score threshold:
  Matrix NMS at its 500-candidate worst case, 100 detections per image) at the fixture's 3 input
  sizes;
* the quickstart model (its config unchanged) after a few AdamW steps from a fixed seed on
  synthetic rectangles, exported by tools/export_model.py, at 4 input sizes including odd ones;
* the other SOLO variants (SOLO, Decoupled SOLO, Decoupled SOLO light) and a DCN model, tiny
  random-init models set to detect with sharp masks and spread scores (conftest's
  ``confident_tiny_model``), on inputs where float32 rounding decides nothing (checked against
  a float64 copy of the model: ``assert_rounding_insensitive``).

Each kind of comparison is also shown to fail on a real discrepancy (a changed weight, offsets
ignored, a shifted mask, a wrong class, a missing detection).
"""

import json

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import (
    REPO,
    assert_rounding_insensitive,
    confident_tiny_model,
    eager,
    load_script,
    make_input,
    require_parity_fixture,
    solo_cfg,
    tiny_cfg,
)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from dev.parity import load_fixture_model
from solo_d2.export import (
    DEFORM_CONV_OPSET,
    MIN_OPSET,
    SOLOExportable,
    check_standard_onnx,
    export_onnx,
    export_torchscript,
    min_opset_for,
)
from solo_d2.export.compare import SCORE_TOL, compare_detections
from solo_d2.export.runtime import ONNXModelError, ONNXRuntimeModel
from solo_d2.modeling.postprocessing import matrix_nms

QUICKSTART_CONFIG = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def load_tool(name):
    return load_script(REPO / "tools" / f"{name}.py", name)


def assert_parity(reference, scores, classes, masks, what):
    agreement = compare_detections(reference, scores, classes, masks)
    assert agreement.ok, f"{what}: {agreement}"
    return agreement


# ---------------------------------------------------------------------------------- units


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_float_masks_equal_bool_masks(kernel):
    """The exported graph runs Matrix NMS on 0/1 float masks (bool masks take a blocked product in
    eager mode): the same decays, and N = 0 is an empty result."""
    g = torch.Generator().manual_seed(0)
    n = 40
    masks = torch.rand(n, 12, 12, generator=g) > 0.6
    masks[5] = masks[3]  # identical masks: the linear kernel's clamp
    labels = torch.randint(0, 3, (n,), generator=g)
    scores = torch.rand(n, generator=g).sort(descending=True).values
    areas = masks.flatten(1).sum(1).float()
    expected = matrix_nms(labels, masks, areas, scores, kernel=kernel, sigma=2.0)
    got = matrix_nms(labels, masks.flatten(1).float(), areas, scores, kernel=kernel, sigma=2.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for empty_masks in (masks[:0], masks[:0].float()):
        empty = matrix_nms(labels[:0], empty_masks, areas[:0], scores[:0], kernel=kernel)
        assert empty.shape == (0,)


def test_unsupported_settings_are_clear_errors(tmp_path):
    model = build_model(tiny_cfg()).eval()
    model.inference_args["nms_type"] = "mask"
    with pytest.raises(ValueError, match="NMS_TYPE='mask' cannot be exported"):
        SOLOExportable(model)
    model.inference_args["nms_type"] = "matrix"
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(SOLOExportable(model), torch.zeros(3, 64, 64), tmp_path / "m.onnx", opset=16)
    with pytest.raises(TypeError, match="not a SOLO-family model"):
        SOLOExportable(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ONNXModelError, match="not found"):
        ONNXRuntimeModel(tmp_path / "missing.onnx")
    # a valid ONNX file that is no SOLO export
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    foreign = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8
    )
    onnx.save(foreign, tmp_path / "relu.onnx")
    with pytest.raises(ONNXModelError, match="expected input 'image'"):
        ONNXRuntimeModel(tmp_path / "relu.onnx")


def test_export_tool_bad_arguments_are_one_line_errors(tmp_path, capsys):
    tool = load_tool("export_model")
    common = ["--format", "onnx", "--output", str(tmp_path)]
    assert tool.main(["--config-file", str(tmp_path / "nope.yaml")] + common) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    config = ["--config-file", str(QUICKSTART_CONFIG)]
    assert tool.main(config + common + ["--opts", "MODEL.WEIGHTS", str(tmp_path / "w.pth")]) == 2
    assert "w.pth: no such file" in capsys.readouterr().err
    dcn = ["--opts", "MODEL.SOLO.TOWER_DCN", "DCN"]
    assert tool.main(config + common + ["--opset", "18"] + dcn) == 2
    assert "DeformConv needs opset >= 19" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------- comparison of detections (hand cases)


def hand_detections():
    """Five detections on a 40 x 60 image: rectangles, two near-tied pairs of scores (one pair of
    the same class, one of two classes), as (Instances, scores, classes, masks) to modify."""
    rects = [(0, 0, 20, 20), (30, 0, 60, 20), (0, 20, 30, 40), (5, 5, 25, 35), (35, 22, 55, 38)]
    masks = torch.zeros(5, 40, 60, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, rects):
        m[y1:y2, x1:x2] = True
    scores = torch.tensor([0.9, 0.5004, 0.5, 0.5002, 0.3])
    classes = torch.tensor([0, 1, 2, 1, 0])
    ref = Instances((40, 60), scores=scores, pred_classes=classes, pred_masks=masks)
    return ref, scores.clone(), classes.clone(), masks.clone()


def test_compare_pairs_near_tied_detections_in_any_order():
    ref, scores, classes, masks = hand_detections()
    same = compare_detections(ref, scores, classes, masks)
    assert same.ok and same.num_paired == 5 and same.max_score_diff == 0, same
    # another runtime: scores moved by < 1e-3, so the near-tied ones come out in another order
    scores = scores + torch.tensor([2e-4, -6e-4, 4e-4, 3e-4, -1e-4])
    order = torch.argsort(scores, descending=True)
    assert order.tolist() == [0, 3, 2, 1, 4]  # both near-tied pairs swapped
    swapped = compare_detections(ref, scores[order], classes[order], masks[order].numpy())
    assert swapped.ok and swapped.num_paired == 5, swapped
    assert swapped.max_score_diff == pytest.approx(6e-4, abs=1e-7) and swapped.min_mask_iou == 1.0


def test_compare_fails_on_each_kind_of_discrepancy():
    ref, scores, classes, masks = hand_detections()

    def compare(s=scores, c=classes, m=masks, **tolerances):
        return compare_detections(ref, s, c, m, **tolerances)

    wrong_class = classes.clone()
    wrong_class[2] = 0
    assert not compare(c=wrong_class).ok and not compare(c=wrong_class).same_classes
    shifted = masks.clone()
    shifted[3] = masks[3].roll(2, dims=1)  # 2 px to the right: IoU 18/22
    assert not compare(m=shifted).ok
    assert compare(m=shifted).min_mask_iou == pytest.approx(18 / 22)
    moved = masks.clone()
    moved[3] = masks[1]  # elsewhere, where the other class-1 detection is: paired all the same
    assert not compare(m=moved).ok and compare(m=moved).num_paired == 5
    assert compare(m=moved).min_mask_iou == 0.0
    missing = compare(scores[:4], classes[:4], masks[:4])
    assert not missing.ok and (missing.num, missing.num_reference, missing.num_paired) == (4, 5, 4)
    index = [0, 1, 2, 3, 4, 0]
    extra = compare(scores[index], classes[index], masks[index])
    assert not extra.ok and (extra.num, extra.num_paired) == (6, 5)
    off = scores.clone()
    off[1] += 2e-3  # not within the tolerance, nor near-tied any more: still paired by its mask
    assert not compare(s=off).ok and compare(s=off).num_paired == 5
    assert compare(s=off).max_score_diff == pytest.approx(2e-3, abs=1e-7)
    assert "5 paired, max |dscore| 2.00e-03" in str(compare(s=off))
    # the tolerances are parameters
    assert compare(s=off, score_tol=3e-3).ok
    assert not compare(m=shifted, min_iou=0.85).ok and compare(m=shifted, min_iou=0.8).ok
    with pytest.raises(ValueError, match="mask sizes differ"):
        compare(m=masks[:, :30])
    nothing = compare(scores[:0], classes[:0], masks[:0])
    assert not nothing.ok and nothing.num_paired == 0
    assert compare_detections(ref[:0], scores[:0], classes[:0], masks[:0]).ok


# ------------------------------------------------------------- parity fixture checkpoint


@pytest.fixture(scope="module")
def fixture_exports(tmp_path_factory):
    """The fixture's model exported once for the module (skipped without the fixture)."""
    fixture = torch.load(require_parity_fixture(), weights_only=True)
    model, _ = load_fixture_model(fixture, "cpu")
    out = tmp_path_factory.mktemp("fixture_export")
    wrapper = SOLOExportable(model)
    sample = fixture["inference"][0]["image"].float()[:, :96, :128]  # any size traces the same
    traced = export_torchscript(wrapper, sample, out / "model.ts")
    export_onnx(wrapper, sample, out / "model.onnx")
    return model, fixture, traced, out / "model.onnx"


def test_fixture_onnx_graph_is_standard_with_dynamic_size(fixture_exports):
    _, _, _, path = fixture_exports
    ops = check_standard_onnx(path)
    assert {"NonZero", "TopK", "Trilu", "Resize", "MatMul"} <= set(ops)
    model = onnx.load(str(path))
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == [3, "height", "width"]
    assert [o.name for o in model.graph.output] == ["scores", "classes", "masks"]
    assert model.opset_import[0].version == MIN_OPSET


def test_fixture_checkpoint_parity_onnx_and_torchscript(fixture_exports):
    model, fixture, traced, path = fixture_exports
    session = ONNXRuntimeModel(path)
    sizes = set()
    for i, case in enumerate(fixture["inference"]):
        image = case["image"].float()
        assert_rounding_insensitive(model, image)
        ref = eager(model, image)
        assert len(ref) == 100
        out = session.run(image)
        assert out["masks"].dtype == np.bool_ and out["classes"].dtype == np.int64
        assert_parity(ref, out["scores"], out["classes"], out["masks"], f"ONNX case {i}")
        with torch.no_grad():
            assert_parity(ref, *traced(image), f"TorchScript case {i}")
        sizes.add(tuple(image.shape[-2:]))
    assert len(sizes) == 3


# ---------------------------------------------------------- quickstart model, a few steps


@pytest.fixture(scope="module")
def quick_export(tmp_path_factory):
    """The quickstart config's model after 4 AdamW steps (lr 2e-3, seed 0) on two images of
    rectangles, saved as a checkpoint, then exported by tools/export_model.py to ONNX."""
    cfg = solo_cfg(QUICKSTART_CONFIG)
    # these 4 steps need confident detections on synthetic rectangles, which the quickstart's
    # category loss weight of 3 (tuned for 1200 iterations) does not give after 4 steps;
    # inference, the part exported, does not read the loss weights
    cfg.MODEL.SOLO.LOSS.FOCAL_WEIGHT = 1.0
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = [
        make_input(96, 128, [(8, 10, 56, 48), (64, 30, 120, 90), (16, 60, 48, 94)], [0, 1, 2]),
        make_input(96, 96, [(24, 24, 80, 80), (4, 4, 24, 32)], [3, 1], seed=1),
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        with EventStorage():
            sum(model(inputs).values()).backward()
        optimizer.step()
    model.eval()
    out = tmp_path_factory.mktemp("quick_export")
    DetectionCheckpointer(model, save_dir=str(out)).save("trained")
    weights = out / "trained.pth"
    rc = load_tool("export_model").main(
        ["--config-file", str(QUICKSTART_CONFIG), "--format", "onnx", "--output", str(out)]
        + ["--opts", "MODEL.WEIGHTS", str(weights)]
    )
    assert rc == 0  # the tool's own check against PyTorch at two sizes passed
    return model, out


@pytest.mark.parametrize("hw", [(224, 299), (192, 256), (201, 333), (64, 480)])
def test_quickstart_model_onnx_parity_at_several_sizes(quick_export, hw):
    model, out = quick_export
    image = make_input(*hw, seed=hw[0])["image"].float()
    assert_rounding_insensitive(model, image)
    ref = eager(model, image)
    assert len(ref) > 0  # a real comparison: the trained model detects
    result = ONNXRuntimeModel(out / "model.onnx").run(image)
    assert result["masks"].shape[1:] == hw
    assert_parity(ref, result["scores"], result["classes"], result["masks"], f"ONNX {hw}")


def test_export_tool_writes_interface_description(quick_export):
    _, out = quick_export
    info = json.loads((out / "export.json").read_text())
    assert info["input"]["shape"] == [3, "H", "W"] and info["input"]["format"] == "BGR"
    assert info["outputs"] == ["scores", "classes", "masks", "soft_masks"]
    assert info["opset"] == MIN_OPSET
    assert info["num_classes"] == 4


def test_quickstart_model_torchscript_parity(quick_export, tmp_path):
    model, _ = quick_export
    export_torchscript(SOLOExportable(model), torch.zeros(3, 64, 64), tmp_path / "model.ts")
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    for hw in [(224, 299), (97, 131)]:
        image = make_input(*hw, seed=7)["image"].float()
        ref = eager(model, image)
        assert len(ref) > 0
        with torch.no_grad():
            assert_parity(ref, *loaded(image), f"TorchScript {hw}")


def test_batched_onnx_gives_each_image_its_own_result(quick_export, tmp_path):
    model, _ = quick_export
    export_onnx(SOLOExportable(model, batch_size=2), torch.zeros(2, 3, 64, 64), tmp_path / "b.onnx")
    session = ONNXRuntimeModel(tmp_path / "b.onnx")
    assert session.batched
    images = torch.stack([make_input(160, 224, seed=s)["image"].float() for s in (1, 2)])
    out = session.run(images)
    assert set(out) == {"scores", "classes", "masks", "image_index"}
    assert list(out["image_index"]) == sorted(out["image_index"])
    for i in range(2):
        sel = out["image_index"] == i
        ref = eager(model, images[i])
        assert sel.sum() == len(ref) > 0
        assert_parity(ref, out["scores"][sel], out["classes"][sel], out["masks"][sel], f"image {i}")
    with pytest.raises(ValueError, match="exported with a batch dimension"):
        session([{"image": images[0]}])


def test_runtime_model_returns_the_pytorch_structure(quick_export, tmp_path):
    model, out = quick_export
    image = make_input(150, 200, seed=3)["image"].float()
    inputs = [{"image": image, "height": 300, "width": 400}, {"image": image}]
    with torch.no_grad():
        refs = [r["instances"] for r in model(inputs)]
    results = [r["instances"] for r in ONNXRuntimeModel(out / "model.onnx")(inputs)]
    for ref, got in zip(refs, results):
        assert got.image_size == ref.image_size
        assert set(got.get_fields()) == set(ref.get_fields())
        assert got.pred_masks.dtype == torch.bool and got.pred_classes.dtype == torch.int64
    # the tool's export returns the soft masks too: resized to 300 x 400 by the runtime as the
    # PyTorch model resizes them, the masks and the boxes around them are the model's
    for ref, got in zip(refs, results):
        agreement = compare_detections(ref, got.scores, got.pred_classes, got.pred_masks)
        assert agreement.ok, agreement
        for r, o, _ in agreement.pairs:
            torch.testing.assert_close(
                got.pred_boxes.tensor[o], ref.pred_boxes.tensor[r], rtol=0, atol=1.0
            )
    # an export without them (SOLOExportable's default) has its binary masks resized: close
    export_onnx(SOLOExportable(model), torch.zeros(3, 64, 64), tmp_path / "binary.onnx")
    binary = ONNXRuntimeModel(tmp_path / "binary.onnx")
    assert not binary.resizes_soft_masks
    got = binary(inputs[:1])[0]["instances"]
    resized = compare_detections(refs[0], got.scores, got.pred_classes, got.pred_masks, min_iou=0.8)
    assert resized.ok, resized


def test_demo_onnx_flag(quick_export, tmp_path, capsys):
    _, out = quick_export
    demo = load_script(REPO / "demo" / "demo.py", "solo_demo")
    image = make_input(120, 160, seed=4)["image"].permute(1, 2, 0).numpy()
    cv2.imwrite(str(tmp_path / "img.png"), image)
    common = ["--config-file", str(QUICKSTART_CONFIG), "--input", str(tmp_path / "img.png")]
    rc = demo.main(
        common
        + ["--onnx", str(out / "model.onnx"), "--output", str(tmp_path / "out"), "--json"]
        + ["--confidence-threshold", "0.05"]
    )
    assert rc == 0
    record = json.loads((tmp_path / "out" / "img.json").read_text())
    assert (record["height"], record["width"]) == (120, 160)
    assert len(record["instances"]) > 0
    assert "randomly initialised" not in capsys.readouterr().err  # MODEL.WEIGHTS is unused
    assert demo.main(common + ["--onnx", str(tmp_path / "missing.onnx")]) == 2
    assert "error: ONNX model not found" in capsys.readouterr().err


# ------------------------------------------------------- other variants, DCN, empty output


@pytest.mark.parametrize(
    "head", ["SOLOInstanceHead", "DecoupledSOLOInstanceHead", "DecoupledSOLOLightInstanceHead"]
)
def test_other_variants_export_with_parity(head, tmp_path):
    model = confident_tiny_model(head)
    export_onnx(SOLOExportable(model), torch.zeros(3, 64, 64), tmp_path / "m.onnx")
    check_standard_onnx(tmp_path / "m.onnx")
    session = ONNXRuntimeModel(tmp_path / "m.onnx")
    for hw in [(96, 128), (77, 101)]:
        image = make_input(*hw, seed=1)["image"].float()
        assert_rounding_insensitive(model, image)
        ref = eager(model, image)
        assert len(ref) == 100
        out = session.run(image)
        assert_parity(ref, out["scores"], out["classes"], out["masks"], f"{head} {hw}")
    # a real discrepancy is caught: class 0's classifier bias 0.01 higher in the PyTorch model
    # moves its scores by ~2e-3
    with torch.no_grad():
        model.ins_head.cate_pred.bias[0] += 0.01
    changed = compare_detections(eager(model, image), out["scores"], out["classes"], out["masks"])
    assert not changed.ok and changed.max_score_diff > SCORE_TOL, changed


def test_deformable_convs_export_as_onnx_deform_conv(tmp_path):
    model = confident_tiny_model(
        "SOLOv2InstanceHead", **{"MODEL.SOLO.TOWER_DCN": "DCNv2", "MODEL.SOLO.MASK_DCN": "DCN"}
    )
    wrapper = SOLOExportable(model)
    assert min_opset_for(wrapper) == DEFORM_CONV_OPSET
    with pytest.raises(ValueError, match="DeformConv needs opset >= 19"):
        export_onnx(wrapper, torch.zeros(3, 64, 64), tmp_path / "m.onnx", opset=MIN_OPSET)
    export_onnx(wrapper, torch.zeros(3, 64, 64), tmp_path / "m.onnx", opset=DEFORM_CONV_OPSET)
    assert "DeformConv" in check_standard_onnx(tmp_path / "m.onnx", DEFORM_CONV_OPSET)
    image = make_input(96, 128, seed=2)["image"].float()
    assert_rounding_insensitive(model, image)
    ref = eager(model, image)
    assert len(ref) == 100
    out = ONNXRuntimeModel(tmp_path / "m.onnx").run(image)
    assert_parity(ref, out["scores"], out["classes"], out["masks"], "DCN")
    # a real discrepancy is caught: the same model with its deformable offsets ignored
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "offset" in name:
                p.zero_()
    plain = compare_detections(eager(model, image), out["scores"], out["classes"], out["masks"])
    assert not plain.ok, plain


def test_nothing_detected_gives_empty_outputs(tmp_path):
    model = confident_tiny_model("SOLOv2InstanceHead")
    model.inference_args["score_threshold"] = 1.5  # no candidate at all
    wrapper = SOLOExportable(model)
    traced = export_torchscript(wrapper, torch.zeros(3, 64, 64), tmp_path / "m.ts")
    export_onnx(wrapper, torch.zeros(3, 64, 64), tmp_path / "m.onnx")
    image = make_input(70, 90)["image"].float()
    assert len(eager(model, image)) == 0
    session = ONNXRuntimeModel(tmp_path / "m.onnx")
    out = session.run(image)
    assert [out[k].shape for k in ("scores", "classes", "masks")] == [(0,), (0,), (0, 70, 90)]
    with torch.no_grad():
        assert [tuple(t.shape) for t in traced(image)] == [(0,), (0,), (0, 70, 90)]
    (result,) = session([{"image": image, "height": 140, "width": 180}])
    assert len(result["instances"]) == 0 and result["instances"].image_size == (140, 180)
