"""dev.benchmark.startup on tiny COCO- and LVIS-shaped files: its rows, table and JSON (no timed
assertions; the full-size numbers are in docs/benchmarks.md)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from detectron2.data import DatasetCatalog, MetadataCatalog

from dev.benchmark import machine_info
from dev.benchmark.startup import (
    DATASET,
    READY_LINE,
    STEPS,
    StartupSettings,
    _process_tree,
    dataset_files,
    dataset_spec,
    format_startup_table,
    median_run,
    run_child,
    run_startup_benchmark,
    train_net_command,
)

SCALE = 0.002  # COCO: 237 images, 1,720 annotations; LVIS: 200 images, 2,540 annotations
CHEAP_ROWS = ["d2_load_json", "json_load", "register_cold", "loader_cold", "evaluator"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("startup_data")
    for kind in ("coco", "lvis"):
        dataset_files(kind, SCALE, str(out))
    return str(out)


@pytest.fixture
def clean_catalog():
    """Leave no benchmark dataset registered in this process."""
    yield
    for name in (DATASET, "coco_benchmark", "lvis_v1_benchmark"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def _rss_ok(peaks, roles=("main",)):
    for role in roles:
        assert peaks[role] and all(kb > 10_000 for kb in peaks[role])  # > 10 MB: a real reading


def test_dataset_files_reuses_what_is_there(data_dir):
    files = dataset_files("coco", SCALE, data_dir)
    assert files["json_file"].endswith(os.path.join("coco_scale0.002", "coco_train_like.json"))
    before = os.stat(files["json_file"]).st_mtime_ns
    assert dataset_files("coco", SCALE, data_dir) == files
    assert os.stat(files["json_file"]).st_mtime_ns == before
    assert dataset_spec("lvis", files) == f"big=lvis:{files['json_file']}:{files['image_root']}"


@pytest.mark.parametrize("kind", ["coco", "lvis"])
def test_each_row_measures_in_process(kind, data_dir, tmp_path, monkeypatch, clean_catalog):
    """The rows a child process runs, run here (the import time is then near 0)."""
    monkeypatch.setenv("SOLO_D2_CACHE", str(tmp_path / "cache"))
    files = dataset_files(kind, SCALE, data_dir)
    params = json.dumps({"kind": kind, "spec": dataset_spec(kind, files), **files})
    num_images = {"coco": 237, "lvis": 200}[kind]
    for row in CHEAP_ROWS:
        run_child(row, params, str(tmp_path / f"{row}.json"))
        res = json.loads((tmp_path / f"{row}.json").read_text())
        assert res["wall_s"] > 0 and res["import_s"] >= 0, row
        assert res["peak_rss_kb"]["main"][0] >= res["rss_after_import_kb"] > 0, row
        if "images" in res:
            assert res["images"] == num_images, row
    assert len(DatasetCatalog.get(DATASET)) == num_images


def test_command_line_registers_cold_and_warm_for_both_kinds(data_dir, tmp_path):
    """Each row in a fresh interpreter (the other rows are run in-process above): the table
    names every row, the JSON has sane numbers."""
    out = tmp_path / "startup.json"
    cmd = [
        sys.executable, "-m", "dev.benchmark.startup", "--kind", "coco", "lvis", "--scale",
        str(SCALE), "--data-dir", data_dir, "--steps", "register", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "| step | wall s | x load_coco_json | peak RSS GB |" in table
    assert "| step | wall s | x load_lvis_json | peak RSS GB |" in table
    assert table.count("| solo_d2 register_dataset, cold cache |") == 2
    assert table.count("| solo_d2 register_dataset, warm cache |") == 2
    assert "machine: " in table
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_cores"] >= 1
    assert [r["kind"] for r in report["reports"]] == ["coco", "lvis"]
    for r in report["reports"]:
        assert list(r["rows"]) == ["register_cold", "register_warm"]
        assert r["annotations"] == {"coco": 1720, "lvis": 2540}[r["kind"]]
        for res in r["rows"].values():
            assert res["wall_s"] > 0 and res["import_s"] > 0
            _rss_ok(res["peak_rss_kb"])


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown step"):
        run_startup_benchmark(StartupSettings(steps=["d2", "warp"], data_dir=str(tmp_path)))
    for flag, message in (("--scale", "--scale must be positive"), ("--repeat", "at least 1")):
        proc = subprocess.run(
            [sys.executable, "-m", "dev.benchmark.startup", flag, "0"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and message in proc.stderr


def test_table_of_a_report():
    rss = {"main": [2 * 2**20]}
    report = {
        "kind": "lvis",
        "scale": 1.0,
        "json_mb": 878.0,
        "images": 100_170,
        "annotations": 1_270_141,
        "rows": {
            "d2_load_json": {"wall_s": 40.0, "import_s": 5.0, "peak_rss_kb": rss},
            "register_cold": {"wall_s": 20.0, "import_s": 6.0, "peak_rss_kb": rss},
            "train_net_warm": {
                "wall_s": 100.0,
                "peak_rss_kb": {"main": [2**20], "worker": [3 * 2**20, 3 * 2**20], "tracker": [9]},
            },
        },
    }
    table = format_startup_table(report, machine_info(torch.device("cpu")))
    assert "878 MB, 100,170 images, 1,270,141 annotations" in table
    assert "| detectron2 load_lvis_json | 40.00 | 1.00 | 2.00 |" in table
    assert "| solo_d2 register_dataset, cold cache | 20.00 | 0.50 | 2.00 |" in table
    assert "| 100.00 | 2.50 | main 1.00; worker 3.00, 3.00 |" in table
    assert "(5.0-6.0 s, not counted" in table
    report["rows"]["d2_load_json"] = {"skipped": "the lvis package is not installed"}
    table = format_startup_table(report, machine_info(torch.device("cpu")))
    assert "skipped: the lvis package is not installed" in table
    assert "| solo_d2 register_dataset, cold cache | 20.00 | - | 2.00 |" in table
    runs = [{"wall_s": w, "import_s": 5.0, "peak_rss_kb": {"main": [w]}} for w in (30, 10, 20)]
    report["rows"] = {"d2_load_json": median_run(runs[:2]), "register_cold": median_run(runs)}
    assert report["rows"]["register_cold"]["peak_rss_kb"] == {"main": [20]}  # the median run's
    table = format_startup_table(report, machine_info(torch.device("cpu")))
    assert "medians of 3 runs (range)" in table
    assert "| detectron2 load_lvis_json | 10.00 (10.00-30.00) | 1.00 |" in table
    assert "| solo_d2 register_dataset, cold cache | 20.00 (10.00-30.00) | 2.00 |" in table


def test_process_tree_and_train_net_command():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = _process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
    finally:
        child.kill()
        child.wait()
    cmd = train_net_command("lvis", "big=lvis:a.json:imgs", "/tmp/out")
    assert cmd[cmd.index("--num-gpus") + 1] == "2"
    assert cmd[cmd.index("MODEL.SOLO.NUM_CLASSES") + 1] == "1203"
    assert cmd[cmd.index("DATASETS.TRAIN") + 1] == "('big',)"
    assert cmd[cmd.index("MODEL.DEVICE") + 1] == "cpu"


@pytest.mark.e2e
def test_every_step_with_train_net(data_dir, tmp_path):
    """Every step for COCO, train_net.py on 2 CPU processes to its first iteration included."""
    settings = StartupSettings("coco", SCALE, data_dir, list(STEPS), timeout=600)
    report = run_startup_benchmark(settings)
    assert list(report["rows"]) == [row for step in STEPS for row in STEPS[step]]
    for row in ("train_net_cold", "train_net_warm"):
        res = report["rows"][row]
        assert res["wall_s"] > 0
        _rss_ok(res["peak_rss_kb"], roles=("main", "worker"))
        assert len(res["peak_rss_kb"]["worker"]) == 2
    table = format_startup_table(report, machine_info(torch.device("cpu")))
    assert table.count("train_net 2 CPU procs to 1st iter") == 2
    assert READY_LINE in table
