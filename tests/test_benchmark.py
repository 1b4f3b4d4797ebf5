"""tools/benchmark.py at tiny sizes (structure and sanity of its report, no timed assertions),
the exactness of the fast post-processing paths, and batched inference and evaluation."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_cfg
from detectron2.modeling import build_model

sys.path.insert(0, str(REPO / "tools"))
import benchmark  # noqa: E402

from solo_d2.modeling.postprocessing import (  # noqa: E402
    _intersections,
    masks_to_boxes,
    matrix_nms,
    point_nms,
)

R18 = str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml")
TINY_ARGS = [
    "--config-file", R18,
    "--threads", "1",
    "--size", "96x128",
    "--batch-sizes", "1", "2",
    "--candidates", "30",
    "--many-candidates", "400",
    "--nms-masks", "24",
    "--nms-size", "20x28",
    "--train-size", "96x128",
    "--train-instances", "3",
    "--workers", "0",
    "--loader-images", "2",
    "--loader-batches", "2",
    "--repeats", "2",
    "--warmup", "0",
    "--nms-repeats", "2",
    "--throughput-repeats", "1",
    "--train-repeats", "1",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and two are many times slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    benchmark.main([*TINY_ARGS, "--no-isolate", "--json", str(out)])
    with open(out) as f:
        return json.load(f)


def _timing_ok(r, repeats=None):
    assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    assert len(r["times_s"]) == r["repeats"]
    if repeats is not None:
        assert r["repeats"] == repeats
    assert r.get("cpu_median_s", 0) >= 0


def test_report_machine_settings_and_every_stage(report):
    m = report["machine"]
    assert m["cpu_cores"] >= 1 and m["torch_threads"] == 1 and m["device"] == "cpu"
    assert m["torch"] == torch.__version__ and len(m["load_average"]) == 3
    assert report["settings"]["size"] == [96, 128]
    assert set(report["results"]) == set(benchmark.STAGES) == set(report["load_average"])


def test_report_inference_stages(report):
    r = report["results"]["inference"]
    for stage in ("preprocess", "backbone_fpn", "instance_branch", "mask_feature_branch"):
        _timing_ok(r[stage], repeats=2)
    for stage in ("postprocess", "postprocess_reference_candidates", "total"):
        _timing_ok(r[stage], repeats=2)
        assert r[stage]["peak_mem_mb"] >= 0 and r[stage]["mem_method"]
    # the classifier bias makes one class pass in every cell: points NMS leaves some of them
    num_cells = sum(s * s for s in (16, 12, 8, 6, 4))
    assert 5 <= r["postprocess"]["candidates"] <= num_cells
    assert r["postprocess_reference_candidates"]["candidates"] == 30
    assert 0 < r["postprocess_reference_candidates"]["detections"] <= 30
    assert r["input"]["padded"] == [96, 128]


def test_report_throughput_nms_memory_train_loader(report):
    res = report["results"]
    for b in (1, 2):
        r = res["throughput"][f"batch{b}"]
        _timing_ok(r, repeats=1)
        assert r["images_per_s"] == pytest.approx(b / r["median_s"])
    nms = res["matrix_nms"]["matrix_nms"]
    _timing_ok(nms, repeats=2)
    assert (nms["masks"], nms["height"], nms["width"], nms["dtype"]) == (24, 20, 28, "torch.bool")
    mem = res["postprocess_memory"]
    assert mem["few"]["candidates"] == 30 and mem["many"]["candidates"] == 400
    assert mem["unchunked_soft_masks_mb"] == round(400 * 24 * 32 * 4 / 2**20, 1)
    train = res["train"]
    _timing_ok(train["forward_backward"], repeats=1)
    assert all(v > 0 for v in train["forward_backward"]["losses"].values())
    assert train["grid_assignment"]["positive_samples"] > 0
    assert train["grid_assignment_in_step"]["repeats"] >= 1
    loader = res["loader"]
    _timing_ok(loader["batch"], repeats=2)
    assert loader["images_per_s"] > 0 and loader["input"]["workers"] == 0
    assert len(loader["input"]["example_batch_shapes"]) == 2


def test_text_report_lists_measurements(report):
    text = benchmark.format_report(report)
    assert "AMD" in text or "machine:" in text
    for name in ("inference/backbone_fpn", "matrix_nms", "train/grid_assignment", "loader/batch"):
        assert name in text
    assert "AdelaiDet" not in text  # tiny sizes: no comparison with the reference figures
    settings = dict(report["settings"], config_file="configs/SOLOv2_R50_3x.yaml", size=[800, 1344])
    assert benchmark.at_reference_conditions("inference/total", settings)
    assert not benchmark.at_reference_conditions(
        "inference/postprocess_reference_candidates", settings
    )


def test_cli_isolated_stage_writes_json(tmp_path):
    """The default mode: each stage in a subprocess, the parent writes --json."""
    out = tmp_path / "nms.json"
    args = ["--stages", "matrix_nms", "--nms-masks", "6", "--nms-size", "12x16", "--threads", "1"]
    args += ["--nms-repeats", "2", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "benchmark.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "matrix_nms" in proc.stdout and f"wrote {out}" in proc.stdout
    data = json.loads(out.read_text())
    assert data["results"]["matrix_nms"]["matrix_nms"]["masks"] == 6
    assert list(data["load_average"]) == ["matrix_nms"]


def test_channels_last_inference_stage():
    report = benchmark.main(
        [*TINY_ARGS, "--stages", "inference", "--channels-last", "--no-isolate"]
    )
    assert report["settings"]["channels_last"]
    r = report["results"]["inference"]
    assert r["postprocess_reference_candidates"]["candidates"] == 30
    _timing_ok(r["total"], repeats=2)


def test_cli_rejects_bad_size():
    with pytest.raises(SystemExit):
        benchmark.get_parser().parse_args(["--size", "800by1344"])


@pytest.mark.parametrize("n", [5, 30, 405, 3000])
def test_candidate_logits_exact_count(n):
    grids = [40, 36, 24, 16, 12]
    logits = benchmark.candidate_logits(grids, 80, n)
    assert benchmark.count_candidates(logits, 0.1) == [n]
    # every cell of the used classes passes the threshold before points NMS
    probs = torch.cat([c.sigmoid().flatten(2) for c in logits], dim=2)[0]
    assert bool((probs[: -(-n // 3872)] > 0.1).all())
    assert bool((point_nms(logits[0].sigmoid()) > 0.1).sum() <= n)
    with pytest.raises(ValueError, match="num_candidates"):
        benchmark.candidate_logits(grids, 2, 2 * 3872 + 1)


def test_peak_memory_sees_an_allocation():
    with benchmark.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, written so its pages are resident
        del x
    assert mem.method in ("VmHWM", "ru_maxrss")
    if mem.method == "VmHWM":  # exact high-water mark: the 64 MB are seen
        assert mem.peak_bytes >= 56 * 2**20
    assert mem.as_dict()["peak_mem_mb"] >= 0


# ---- exactness of the fast paths ---------------------------------------------------------------
def test_int8_intersections_equal_float_products():
    g = torch.Generator().manual_seed(0)
    for n, h, w in [(1, 3, 5), (7, 9, 13), (40, 30, 44)]:
        masks = torch.rand(n, h, w, generator=g) > 0.4
        f = masks.flatten(1).float()
        assert torch.equal(_intersections(masks), f @ f.T)


def test_matrix_nms_bool_and_float_masks_agree():
    labels, masks, areas, scores = benchmark.matrix_nms_inputs(60, 40, 56, seed=3)
    a = matrix_nms(labels, masks, areas, scores)
    b = matrix_nms(labels, masks.float(), areas, scores)
    assert torch.equal(a, b) and bool((a <= scores).all())


def test_masks_to_boxes_byte_max_path_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(12, 23, 31, generator=g) > 0.97
    masks[0] = False  # an empty mask gives a zero box
    expected = torch.zeros(12, 4)
    for i, m in enumerate(masks):
        ys, xs = m.nonzero(as_tuple=True)
        if len(xs):
            expected[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert torch.equal(masks_to_boxes(masks), expected)


# ---- batched inference and evaluation ----------------------------------------------------------
@pytest.fixture(scope="module")
def confident_model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.INFERENCE_CHUNK_SIZE = 16  # several chunks: the kept-soft-mask path
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.ins_head.cate_pred.weight, std=0.2)
    torch.nn.init.constant_(model.ins_head.cate_pred.bias, 1.0)
    return model


@pytest.mark.parametrize("nms_pre", [500, 12])  # candidates kept / recomputed after scoring
def test_batched_inference_is_batched_and_equals_single(confident_model, nms_pre):
    model = copy.deepcopy(confident_model)
    model.inference_args["nms_pre"] = nms_pre
    inputs = benchmark.inference_inputs(2, 96, 128, seed=5)
    inputs.insert(
        1, {"image": benchmark.synthetic_image(64, 80, seed=9), "height": 50, "width": 70}
    )
    batch_sizes = []
    predict = model.predict
    model.predict = lambda x: batch_sizes.append(len(x)) or predict(x)
    with torch.no_grad():
        batched = [r["instances"] for r in model(inputs)]
        assert sorted(batch_sizes) == [1, 2]  # one network pass per padded size
        singles = [model([x])[0]["instances"] for x in inputs]
    for b, s in zip(batched, singles):  # a batched conv may round differently in the last bit
        assert len(b) > 0 and len(b) == len(s)
        assert torch.equal(b.pred_classes, s.pred_classes)
        torch.testing.assert_close(b.scores, s.scores, rtol=1e-4, atol=1e-5)
        assert (b.pred_masks == s.pred_masks).float().mean() > 0.999
    assert batched[1].image_size == (50, 70)


def test_fixed_head_outputs_give_the_models_own_result(confident_model):
    """The benchmark times post-processing through model.inference with the network's outputs
    fixed: the result must be the model's."""
    model = confident_model
    inputs = benchmark.inference_inputs(1, 96, 128, seed=2)
    with torch.no_grad():
        expected = model(inputs)[0]["instances"]
        images = model.preprocess_image(inputs)
        outputs = model.predict(images.tensor)
        with benchmark.fixed_head_outputs(model, images, outputs):
            got = model(inputs)[0]["instances"]
    assert "predict" not in vars(model)  # restored
    assert torch.equal(got.pred_masks, expected.pred_masks)
    assert torch.equal(got.scores, expected.scores)


def test_evaluation_loader_batches_test_ims_per_batch(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    from solo_d2.data.shapes import SHAPES_CLASSES, generate_shapes
    from solo_d2.engine import Trainer

    json_file = generate_shapes(str(tmp_path), "val", 5, seed=0, min_size=64, max_size=96)
    name = "bench_test_batched_eval"
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, str(tmp_path / "val"), name))
    MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES))
    try:
        cfg = tiny_cfg()
        cfg.TEST.IMS_PER_BATCH = 2
        cfg.DATALOADER.NUM_WORKERS = 0
        batches = list(Trainer.build_test_loader(cfg, name))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all("image" in x and "height" in x for b in batches for x in b)
