"""solo_d2.engine.load_model and SOLOPredictor: config files or configs, weights that must fit,
one-line errors, and a download timeout that does not outlive the download."""

import os
import pickle
import socket

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_cfg
from detectron2.utils.file_io import PathManager

from solo_d2.engine import (
    BadWeightsError,
    SOLOPredictor,
    WeightsUnavailableError,
    load_model,
    resolve_weights,
)
from solo_d2.engine import predictor as predictor_module

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSIFIER = "ins_head.cate_pred.weight"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model's config and its weights saved as a checkpoint (seeded random values)."""
    torch.manual_seed(3)
    model, cfg = load_model(tiny_cfg())
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    return cfg, path, model.state_dict()


def test_config_node_weights_and_device(trained):
    cfg, path, state = trained
    original = cfg.clone()
    model, loaded_cfg = load_model(cfg, ["MODEL.SOLO.SCORE_THRESH_TEST", "0.2"], str(path))
    assert not model.training and loaded_cfg.is_frozen()
    assert loaded_cfg.MODEL.WEIGHTS == str(path) and loaded_cfg.MODEL.SOLO.SCORE_THRESH_TEST == 0.2
    assert cfg == original  # the given config is not changed
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.pixel_mean.device.type == "cpu" and loaded_cfg.MODEL.DEVICE == "cpu"


def test_config_file_and_random_init():
    config = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
    model, cfg = load_model(config, ["MODEL.SOLO.NUM_CLASSES", "2"], "", device="cpu")
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.SOLO.NUM_CLASSES == 2
    assert model.ins_head.cate_pred.weight.shape[0] == 2


def test_weights_of_another_shape_are_refused(trained, tmp_path):
    cfg, path, state = trained
    with pytest.raises(BadWeightsError) as e:
        load_model(cfg, ["MODEL.SOLO.NUM_CLASSES", "5"], str(path))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"weights file {path} does not fit the model of the config: ")
    assert f"{CLASSIFIER} has shape (3, 32, 3, 3) in the file but (5, 32, 3, 3) in the model" in (
        message
    )
    assert "MODEL.SOLO.NUM_CLASSES (5)" in message
    # a DistributedDataParallel save ("module." on every key) is compared the same way
    wrapped = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    with pytest.raises(BadWeightsError, match=CLASSIFIER):
        load_model(cfg, ["MODEL.SOLO.NUM_CLASSES", "5"], str(wrapped))
    model, _ = load_model(cfg, (), str(wrapped))
    assert torch.equal(model.state_dict()[CLASSIFIER], state[CLASSIFIER])


def test_unreadable_and_unsafe_files(trained, tmp_path):
    cfg, path, _ = trained
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BadWeightsError, match=f"weights file {truncated} cannot be loaded: "):
        load_model(cfg, (), str(truncated))
    unsafe = tmp_path / "unsafe.pkl"
    unsafe.write_bytes(pickle.dumps({"model": {"x": np.zeros(2)}, "run": os.getcwd}))
    with pytest.raises(BadWeightsError, match="refused without running it"):
        load_model(cfg, (), str(unsafe))


def test_missing_file_is_named_before_the_model_is_built(tmp_path, monkeypatch):
    def no_build(cfg):
        raise AssertionError("the model was built")

    monkeypatch.setattr(predictor_module, "build_model", no_build)
    missing = str(tmp_path / "none.pth")
    with pytest.raises(WeightsUnavailableError, match=f"MODEL.WEIGHTS {missing}: no such file"):
        load_model(tiny_cfg(), (), missing)


def test_download_timeout_is_scoped(monkeypatch):
    """The socket default timeout bounds the download only, and a failure is one line."""
    seen = []

    def failing_download(path):
        seen.append(socket.getdefaulttimeout())
        raise OSError("<urlopen error [Errno 101] Network is unreachable>")

    monkeypatch.setattr(PathManager, "get_local_path", failing_download)
    assert socket.getdefaulttimeout() is None
    with pytest.raises(WeightsUnavailableError) as e:
        resolve_weights("https://example.invalid/model.pth")
    assert seen == [predictor_module.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() is None  # restored
    assert e.value.remote and "Network is unreachable" in e.value.reason
    # a timeout the process chose itself is kept
    socket.setdefaulttimeout(5.0)
    try:
        with pytest.raises(WeightsUnavailableError):
            resolve_weights("https://example.invalid/model.pth")
        assert seen[-1] == 5.0 and socket.getdefaulttimeout() == 5.0
    finally:
        socket.setdefaulttimeout(None)


def test_predictor_runs_the_loaded_model(trained):
    cfg, path, _ = trained
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(path)
    predictor = SOLOPredictor(cfg)
    assert predictor.cfg.is_frozen() and not predictor.model.training
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    [instances] = predictor([image])
    assert instances.image_size == (70, 90)
    assert instances.pred_masks.shape[1:] == (70, 90)
    cfg.INPUT.FORMAT = "L"
    with pytest.raises(ValueError, match="INPUT.FORMAT must be 'RGB' or 'BGR'"):
        SOLOPredictor(cfg)
