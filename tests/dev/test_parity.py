"""AdelaiDet parity (dev/parity.py, ``python -m dev.parity``) on the public fixture, and direct
loading of AdelaiDet's checkpoint layout."""

import subprocess
import sys

import torch
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from dev.parity import build_cfg, check_fixture


def test_parity_command_passes(parity_fixture_path):
    res = subprocess.run(
        [sys.executable, "-m", "dev.parity", str(parity_fixture_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    print(res.stdout, res.stderr)
    assert res.returncode == 0
    lines = [line for line in res.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 5 and all(line.startswith("PASS") for line in lines)
    assert res.stdout.rstrip().endswith("OK: 5/5 checks passed")


def test_parity_check_fails_on_a_wrong_reference(parity_fixture_path):
    """The check must notice a difference: perturb one reference score and one loss."""
    fixture = torch.load(parity_fixture_path, weights_only=True)
    fixture["inference"][0]["scores"][3] += 0.01
    fixture["train"]["losses"]["loss_ins"] *= 1.01
    checks = check_fixture(fixture)
    failed = [c for c in checks if not c.ok]
    assert [c.line.split(" (")[0] for c in failed] == ["inference case 0", "training batch"]
    assert "max score error" in failed[0].problems[0]
    assert failed[1].problems == [f"loss_mask relative error {1 - 1 / 1.01:.2e} > 0.001"]
    assert str(failed[0]).startswith("FAIL inference case 0")


def test_adelaidet_checkpoint_loads_through_detectron2_checkpointer(parity_fixture_path, tmp_path):
    fixture = torch.load(parity_fixture_path, weights_only=True)
    cfg = build_cfg(fixture)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    path = tmp_path / "adelaidet.pth"
    torch.save(fixture["checkpoint"], path)  # float16 tensors, AdelaiDet key names
    DetectionCheckpointer(model).load(str(path))
    sd = model.state_dict()
    for key, value in fixture["checkpoint"]["model"].items():
        assert torch.equal(sd[key], value.to(sd[key].dtype)), key
    assert set(sd) == set(fixture["checkpoint"]["model"])
