"""MODEL.SOLO.COMPILE: the heads run through torch.compile at inference without
autograd only; the compiled code is dropped when the weights may change; a failed compile warns
once and runs eagerly; a real compile gives the eager detections."""

import logging
import shutil

import pytest
import torch
from conftest import confident_tiny_model, eager

from solo_d2.export.compare import compare_detections


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 96, 128, generator=g) * 255


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a wrapper that counts compiles and calls."""
    calls = {"compiled": [], "run": 0}

    def compile(function, options=None):
        calls["compiled"].append(options)

        def run(*args):
            calls["run"] += 1
            return function(*args)

        return run

    monkeypatch.setattr(torch, "compile", compile)
    return calls


def test_only_inference_without_autograd_is_compiled(fake_compile):
    model = confident_tiny_model(**{"MODEL.SOLO.COMPILE": True})
    assert model.compile_network
    image = _image()
    expected = eager(confident_tiny_model(), image)
    got = eager(model, image)  # eval + no_grad: the heads compiled
    assert fake_compile["compiled"] == [{"freezing": True}] and fake_compile["run"] == 1
    assert torch.equal(got.scores, expected.scores)
    with torch.no_grad():
        model([{"image": image}])
    assert len(fake_compile["compiled"]) == 1 and fake_compile["run"] == 2  # reused
    model([{"image": image}])  # autograd on: eager
    assert fake_compile["run"] == 2
    # the weights may change (a load, a train/eval switch): compiled again at the next call
    model.load_state_dict(model.state_dict())
    with torch.no_grad():
        model([{"image": image}])
    assert len(fake_compile["compiled"]) == 2
    eager(model, image)  # model.eval() first
    assert len(fake_compile["compiled"]) == 3


def test_off_by_default(fake_compile):
    eager(confident_tiny_model(), _image())
    assert fake_compile["compiled"] == []


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch, caplog):
    def broken(function, options=None):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = confident_tiny_model(**{"MODEL.SOLO.COMPILE": True})
    image = _image()
    with caplog.at_level(logging.WARNING, logger="solo_d2"):
        got = eager(model, image)
        again = eager(model, image)
    assert torch.equal(got.scores, eager(confident_tiny_model(), image).scores)
    assert torch.equal(again.scores, got.scores)
    assert caplog.text.count("torch.compile of the heads failed") == 1
    assert "InvalidCxxCompiler" in caplog.text and "the model runs eagerly" in caplog.text


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs g++")
def test_compiled_detections_equal_eager_ones():
    image = _image()
    reference = eager(confident_tiny_model(), image)
    model = confident_tiny_model(**{"MODEL.SOLO.COMPILE": True})
    got = eager(model, image)
    assert len(reference) == len(got) == 100
    agreement = compare_detections(
        reference, got.scores, got.pred_classes, got.pred_masks, score_tol=1e-3, min_iou=0.99
    )
    assert agreement.ok, agreement
