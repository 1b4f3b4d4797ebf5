"""tools/quickstart.py (the README's main command) end to end, shortened to a few iterations."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_script

quickstart = load_script(REPO / "tools" / "quickstart.py", "quickstart")

SHORT = [
    "SOLVER.MAX_ITER", "4",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "100",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MIN_SIZE_TEST", "128",
    # after 4 iterations few scores or masks pass the default thresholds (none, in some runs):
    # keep every candidate with a whole-image mask, so the evaluation always has detections for
    # the demo's threshold to filter
    "MODEL.SOLO.SCORE_THRESH_TEST", "0.0",
    "MODEL.SOLO.MASK_THRESH_TEST", "0.0",
    "MODEL.SOLO.UPDATE_THRESH_TEST", "0.0",
]  # fmt: skip


@pytest.mark.e2e
def test_quickstart_writes_model_metrics_curve_and_demo(tmp_path):
    out = tmp_path / "quickstart"
    env = dict(os.environ, SOLO_D2_DATASETS=str(tmp_path / "data"), OMP_NUM_THREADS="2")
    cmd = [sys.executable, str(REPO / "tools" / "quickstart.py"), "--output-dir", str(out)]
    res = subprocess.run(cmd + SHORT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "shapes_val mask AP" in res.stdout

    # the dataset went where $SOLO_D2_DATASETS says, and the demo read it from there
    val_images = sorted((tmp_path / "data" / "shapes" / "val").glob("*.png"))
    assert len(val_images) == 50
    summary = json.loads((out / "quickstart_results.json").read_text())
    assert set(summary["results"]) == {"segm", "bbox"}
    assert summary["segm_AP"] == summary["results"]["segm"]["AP"]
    assert summary["loss_curve"][-1][0] == 3  # the last of the 4 iterations was logged
    assert (out / "model_final.pth").is_file() and (out / "loss_curve.png").stat().st_size > 0
    drawn = sorted((out / "demo").glob("*.png"))
    assert [p.name for p in drawn] == [p.name for p in val_images]
    assert f"--confidence-threshold {quickstart.DEMO_CONFIDENCE} " in res.stdout
    # the demo keeps exactly the evaluated detections that reach the quickstart's threshold (the
    # two runs compute the scores with other float32 kernels: a score within 1e-4 of the
    # threshold may fall on either side)
    evaluated = json.loads(
        (out / "inference" / "shapes_val" / "coco_instances_results.json").read_text()
    )
    assert evaluated
    val_json = json.loads((tmp_path / "data" / "shapes" / "val.json").read_text())
    image_ids = {im["file_name"]: im["id"] for im in val_json["images"]}
    num_kept = 0
    for png in drawn:
        record = json.loads(png.with_suffix(".json").read_text())
        scores = [r["score"] for r in evaluated if r["image_id"] == image_ids[png.name]]
        surely_kept = sum(s >= quickstart.DEMO_CONFIDENCE + 1e-4 for s in scores)
        maybe_kept = sum(s >= quickstart.DEMO_CONFIDENCE - 1e-4 for s in scores)
        assert surely_kept <= len(record["instances"]) <= maybe_kept, png.name
        num_kept += len(record["instances"])
    assert num_kept < len(evaluated)  # the threshold did filter

    # a second run resumes (nothing to train) and evaluates the saved model again
    res = subprocess.run(cmd + SHORT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    again = json.loads((out / "quickstart_results.json").read_text())
    assert again["segm_AP"] == summary["segm_AP"]
