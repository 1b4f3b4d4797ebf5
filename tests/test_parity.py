"""AdelaiDet parity: tools/check_parity.py on the public fixture, and direct checkpoint loading."""

import subprocess
import sys

import torch
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model


def test_check_parity_tool_passes(parity_fixture_path):
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_parity.py"), str(parity_fixture_path)],
        capture_output=True,
        text=True,
    )
    print(res.stdout, res.stderr)
    assert res.returncode == 0
    lines = [line for line in res.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 5 and all(line.startswith("PASS") for line in lines)


def test_check_parity_tool_fails_on_a_wrong_reference(parity_fixture_path, tmp_path):
    """The tool must notice a difference: perturb one reference score and one loss."""
    fixture = torch.load(parity_fixture_path, weights_only=True)
    fixture["inference"][0]["scores"][3] += 0.01
    fixture["train"]["losses"]["loss_ins"] *= 1.01
    bad = tmp_path / "bad.pt"
    torch.save(fixture, bad)
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_parity.py"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert res.stdout.count("FAIL ") == 2


def test_adelaidet_checkpoint_loads_through_detectron2_checkpointer(parity_fixture_path, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from check_parity import build_cfg

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
