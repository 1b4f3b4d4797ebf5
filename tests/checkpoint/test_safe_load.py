"""Loading weights runs no code from the file: hostile ``.pkl`` and ``.pth`` files are refused
(directly, by ``demo/demo.py`` and by ``train_net.py``); numpy ``.pkl`` files in detectron2 and
Caffe2 format, and our own training checkpoints (``--resume``), still load."""

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, tiny_cfg
from detectron2.modeling import build_model

from solo_d2.checkpoint import (
    AtomicCheckpointer,
    SafeCheckpointer,
    UnsafeCheckpointError,
    load_checkpoint_file,
)
from solo_d2.checkpoint.safe_load import load_torch_file

QUICKSTART = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system: posix.system on Linux


class Touch:
    """Pickles as ``os.system("touch <marker>")``: what a hostile weights file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Calls:
    """Pickles as ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def write_hostile(folder: Path, suffix: str) -> Path:
    """A detectron2-looking weights file whose ``__author__`` runs ``touch folder/MARKER``."""
    path = folder / f"evil{suffix}"
    data = {"model": {"w": np.zeros(2, np.float32)}, "__author__": Touch(folder / "MARKER")}
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(data))
    else:
        torch.save({**data, "model": {"w": torch.zeros(2)}}, path)
    return path


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_hostile_file_is_refused_naming_file_and_global(tmp_path, suffix):
    path = write_hostile(tmp_path, suffix)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint_file(path)
    message = str(e.value)
    assert f"weights file {path} was refused" in message and SYSTEM in message
    assert f"tools/convert_trusted_weights.py {path} OUT.pth" in message and "\n" not in message
    assert e.value.refused == SYSTEM
    model = build_model(tiny_cfg())
    with pytest.raises(UnsafeCheckpointError, match=SYSTEM):
        AtomicCheckpointer(model).resume_or_load(str(path), resume=False)
    assert not (tmp_path / "MARKER").exists()
    # the payload is real: the explicit trusted path runs it
    load_checkpoint_file(path, trust_pickle=True)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    "payload, refused",
    [
        (Calls(eval, "1"), "builtins.eval"),
        (Calls(getattr, Calls(__import__, "os"), "system"), "builtins.getattr"),
        (Calls(np.load, "x.npy", None, True), "numpy.load"),
        (Calls(torch.load, "x.pth"), "torch.serialization.load"),
    ],
)
def test_pkl_globals_outside_the_allow_list_are_refused(tmp_path, payload, refused):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"x": payload}}))
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint_file(path)
    assert e.value.refused == refused


def test_official_converter_refuses_hostile_file_unless_trusted(tmp_path):
    from solo_d2.model_zoo.official import ConversionError, load_official

    path = write_hostile(tmp_path, ".pth")
    with pytest.raises(ConversionError, match=f"global {SYSTEM}. Only if .* --trust-pickle"):
        load_official(path)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_refusal_without_a_global_is_one_line(tmp_path):
    path = tmp_path / "plain_pickle.pth"  # a plain pickle (FRAME opcodes) named .pth
    path.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="no checkpoint PyTorch's weights-only loader"):
        load_torch_file(path)


def test_torch_files_are_read_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    load_checkpoint_file(path)
    assert [(k["weights_only"], k["map_location"]) for k in calls] == [(True, "cpu")]


def _pickle(data, protocol: int, numpy1: bool) -> bytes:
    """``data`` pickled; ``numpy1``: as numpy 1.x names its modules (protocol 2 only)."""
    raw = pickle.dumps(data, protocol=protocol)
    return raw.replace(b"numpy._core.", b"numpy.core.") if numpy1 else raw


@pytest.mark.parametrize(
    "protocol, numpy1", [(2, False), (2, True), (4, False), (5, False)]
)  # fmt: skip
def test_detectron2_numpy_pkl_loads_with_matching_heuristics(tmp_path, protocol, numpy1):
    torch.manual_seed(1)
    source = build_model(tiny_cfg()).state_dict()
    weights = {k: v.numpy() + 0.5 for k, v in source.items() if v.is_floating_point()}
    path = tmp_path / "model.pkl"
    data = {"model": weights, "__author__": "x", "matching_heuristics": True}
    path.write_bytes(_pickle(data, protocol, numpy1))

    model = build_model(tiny_cfg())
    SafeCheckpointer(model).load(str(path))
    loaded = model.state_dict()
    for name, value in weights.items():
        if name not in ("pixel_mean", "pixel_std"):  # from the config
            assert torch.equal(loaded[name], torch.from_numpy(value)), name


def test_caffe2_blobs_pkl_loads(tmp_path):
    stem = np.random.default_rng(0).standard_normal((64, 3, 7, 7)).astype(np.float32)
    blobs = {
        "conv1_w": stem,
        "conv1_w_momentum": np.zeros_like(stem),
        "res_conv1_bn_s": np.full(64, 2.0, np.float32),
        "res_conv1_bn_b": np.full(64, 0.5, np.float32),
    }
    path = tmp_path / "R-18.pkl"
    path.write_bytes(_pickle({"blobs": blobs, "tag": np.int64(3), "ids": {1, 2}}, 2, True))
    loaded = load_checkpoint_file(path)
    assert loaded["__author__"] == "Caffe2" and loaded["matching_heuristics"]
    assert sorted(loaded["model"]) == ["conv1_w", "res_conv1_bn_b", "res_conv1_bn_s"]

    model = build_model(tiny_cfg())
    SafeCheckpointer(model).load(str(path))
    stem_conv = model.backbone.bottom_up.stem.conv1
    assert torch.equal(stem_conv.weight, torch.from_numpy(stem))
    assert torch.equal(stem_conv.norm.weight, torch.full((64,), 2.0))


def test_trusted_file_converts_to_a_safe_pth(tmp_path):
    src = tmp_path / "legacy.pkl"
    state = {"w": np.arange(4, dtype=np.float32)}
    src.write_bytes(pickle.dumps({"model": state, "__author__": "me", "args": Calls(dict)}))
    with pytest.raises(UnsafeCheckpointError, match="builtins.dict"):
        load_checkpoint_file(src)
    dst = tmp_path / "legacy.pth"
    tool = REPO / "tools" / "convert_trusted_weights.py"
    res = subprocess.run([sys.executable, str(tool), str(src), str(dst)], capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    loaded = load_checkpoint_file(dst)
    assert loaded["__author__"] == "me" and set(loaded) == {"model", "__author__"}
    assert torch.equal(loaded["model"]["w"], torch.arange(4, dtype=torch.float32))


def test_own_training_checkpoint_resumes_weights_only(tmp_path, monkeypatch):
    from solo_d2.data.coco import register_coco_dataset
    from solo_d2.data.shapes import generate_shapes
    from solo_d2.engine import Trainer

    ann = generate_shapes(str(tmp_path), "train", 2, seed=5, min_size=64, max_size=80)
    name = register_coco_dataset(f"safe_load_train={ann}:{tmp_path / 'train'}")
    cfg = tiny_cfg()
    cfg.merge_from_list(
        ["MODEL.SOLO.NUM_CLASSES", 4, "DATASETS.TRAIN", (name,), "DATASETS.TEST", (),
         "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 80, "SOLVER.IMS_PER_BATCH", 2,
         "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1, "DATALOADER.NUM_WORKERS", 0,
         "SOLVER.OPTIMIZER", "ADAMW", "OUTPUT_DIR", str(tmp_path / "out")]
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    weights_only = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: weights_only.append(k["weights_only"]) or real_load(*a, **k)
    )
    cfg.SOLVER.MAX_ITER = 4
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert weights_only == [True]
    assert resumed.start_iter == 2
    assert resumed.optimizer.state_dict()["state"]  # AdamW moments restored
    assert resumed.scheduler.last_epoch == 2


# ---- the entry points, as users run them -----------------------------------------------------
def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.e2e
def test_demo_and_train_net_refuse_hostile_weights(tmp_path):
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.zeros((48, 64, 3), np.uint8))
    commands = {}
    for suffix in (".pkl", ".pth"):
        folder = tmp_path / suffix[1:]
        folder.mkdir()
        evil = write_hostile(folder, suffix)
        commands[f"demo{suffix}"] = (folder, [
            str(REPO / "demo" / "demo.py"), "--config-file", str(QUICKSTART), "--input",
            str(image), "--opts", "MODEL.WEIGHTS", str(evil), "MODEL.DEVICE", "cpu",
        ])  # fmt: skip
        commands[f"train_net{suffix}"] = (folder, [
            str(REPO / "train_net.py"), "--config-file", str(QUICKSTART), "--eval-only",
            "MODEL.WEIGHTS", str(evil), "OUTPUT_DIR", str(folder / "out"),
        ])  # fmt: skip
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {k: pool.submit(_run, args, REPO) for k, (_, args) in commands.items()}
    for key, (folder, _) in commands.items():
        res = futures[key].result()
        assert res.returncode == 2, (key, res.stderr[-3000:])
        assert "Traceback" not in res.stderr, key
        last = res.stderr.strip().splitlines()[-1]
        prefix = "error: " if key.startswith("demo") else "train_net.py: error: "
        assert last.startswith(f"{prefix}weights file {folder}/evil"), (key, last)
        assert f"references the Python global {SYSTEM}" in last, (key, last)
        assert not (folder / "MARKER").exists(), key


def test_matching_heuristics_query_still_applies(tmp_path):
    """detectron2's ``?matching_heuristics=True`` suffix is read by SafeCheckpointer.load: the
    file (safely loaded) is marked for name matching; any other query is refused."""
    model = torch.nn.Linear(2, 1)
    path = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    checkpointer = SafeCheckpointer(torch.nn.Linear(2, 1))
    assert "matching_heuristics" not in checkpointer.load(str(path))
    assert checkpointer.load(f"{path}?matching_heuristics=True")["matching_heuristics"] is True
    assert not checkpointer.query_matching_heuristics  # reset after the load
    with pytest.raises(ValueError, match="Unsupported query"):
        checkpointer.load(f"{path}?other=1")
    write_hostile(tmp_path, ".pth")
    with pytest.raises(UnsafeCheckpointError):
        checkpointer.load(f"{tmp_path / 'evil.pth'}?matching_heuristics=True")
