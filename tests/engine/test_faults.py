"""Faults that must lose nothing: SIGKILL while writing, SIGKILL during training + --resume, NaN.

Processes are really killed (``SIGKILL``, uncatchable) in subprocesses; a test then checks what is
on disk. The plain detectron2 checkpointer is killed the same way as a control: it does corrupt
the file, so the atomic writers are what keeps it intact.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_OPTS, tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine.hooks import PeriodicCheckpointer
from detectron2.solver import build_lr_scheduler
from detectron2.structures import Boxes, Instances

from solo_d2.atomic_io import atomic_open, atomic_write_text, remove_stale_temporaries
from solo_d2.checkpoint import AtomicCheckpointer
from solo_d2.config import load_config
from solo_d2.data.coco import register_coco_dataset
from solo_d2.data.shapes import generate_shapes
from solo_d2.engine.trainer import Trainer, _trim_metrics
from solo_d2.evaluation import SOLOCOCOEvaluator
from solo_d2.modeling import SOLO

TESTS = Path(__file__).resolve().parent

# Run in a child process: make the next write of a checkpoint (argv[2] ".pth": torch.save) or of a
# json file opened through detectron2's PathManager (".json") write half of its bytes, flush them
# to disk and SIGKILL the process; then run argv[1] (an action of this module) on argv[3:].
DYING_WRITER = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from detectron2.utils.file_io import PathManager

    def die_after_half(f, data):
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    real_save, suffix = torch.save, sys.argv[2]
    def dying_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        die_after_half(f, buf.getvalue())
    if suffix == ".pth":
        torch.save = dying_save

    real_open = PathManager.open
    class DyingFile:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
        def write(self, data):
            die_after_half(self.f, data)
        def __getattr__(self, name):
            return getattr(self.f, name)
    def dying_open(path, mode="r", **kwargs):
        f = real_open(path, mode, **kwargs)
        return DyingFile(f) if "w" in mode and str(path).endswith(suffix) else f
    if suffix == ".json":
        PathManager.open = dying_open

    sys.path[:0] = [{tests!r}, {root!r}]  # this module, and tests/ for its conftest helpers
    import test_faults
    getattr(test_faults, sys.argv[1])(*sys.argv[3:])
    """).format(tests=str(TESTS), root=str(TESTS.parent))


def run_killed(action: str, suffix: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``action(*args)`` of this module in a child that dies writing a ``suffix`` file."""
    res = subprocess.run(
        [sys.executable, "-c", DYING_WRITER, action, suffix, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def _linear(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def save_checkpoint(save_dir: str, value: str, atomic: str = "1") -> None:
    """Child action: save a Linear filled with ``value`` as model_final.pth."""
    from detectron2.checkpoint import DetectionCheckpointer

    cls = AtomicCheckpointer if atomic == "1" else DetectionCheckpointer
    cls(_linear(float(value)), save_dir=save_dir).save("model_final")


def test_atomic_open_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(str(target), "old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(target), "w") as f:
            f.write("new, half written")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_checkpoint_killed_while_written_leaves_the_previous_one(tmp_path):
    AtomicCheckpointer(_linear(1.0), save_dir=str(tmp_path)).save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    run_killed("save_checkpoint", ".pth", str(tmp_path), "2.0")
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    state = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert torch.equal(state["weight"], torch.ones(2, 3))
    [stray] = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert 0 < stray.stat().st_size  # the half-written new checkpoint, never renamed
    assert remove_stale_temporaries(str(tmp_path)) == [str(stray)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]

    # control: detectron2's own checkpointer, killed the same way, truncates the file in place
    run_killed("save_checkpoint", ".pth", str(tmp_path), "2.0", "0")
    assert (tmp_path / "model_final.pth").stat().st_size < len(before)
    with pytest.raises(RuntimeError):  # "PytorchStreamReader failed reading zip archive"
        torch.load(tmp_path / "model_final.pth", weights_only=False)


@pytest.fixture(scope="module")
def small_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    ann = generate_shapes(str(root), "val", 4, seed=11, min_size=64, max_size=96)
    name = f"faults_val_{uuid.uuid4().hex[:8]}"
    register_coco_dataset(f"{name}={ann}:{root / 'val'}")
    yield f"{name}={ann}:{root / 'val'}"
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def evaluate_fixed_predictions(spec: str, output_dir: str, score: str = "0.9") -> dict:
    """Child (and test) action: evaluate one centred-box prediction per image of ``spec``."""
    name = register_coco_dataset(spec)
    evaluator = SOLOCOCOEvaluator(name, tasks=("segm", "bbox"), output_dir=output_dir)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        h, w = d["height"], d["width"]
        inst = Instances((h, w))
        masks = torch.zeros((1, h, w), dtype=torch.bool)
        masks[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
        inst.pred_masks = masks
        inst.pred_boxes = Boxes(torch.tensor([[w // 4, h // 4, 3 * w // 4, 3 * h // 4]]).float())
        inst.scores = torch.tensor([float(score)])
        inst.pred_classes = torch.tensor([0])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    return evaluator.evaluate()


def test_evaluation_killed_while_writing_results_leaves_the_previous_files(small_val, tmp_path):
    results = evaluate_fixed_predictions(small_val, str(tmp_path), "0.9")
    names = ["coco_instances_results.json", "evaluation_results.json", "instances_predictions.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    before = {n: (tmp_path / n).read_bytes() for n in names}
    assert json.loads(before["evaluation_results.json"]) == {
        task: {k: None if math.isnan(v) else v for k, v in metrics.items()}
        for task, metrics in results.items()
    }
    assert json.loads(before["coco_instances_results.json"])[0]["score"] == pytest.approx(0.9)

    # a second evaluation (other scores) killed half-way through writing its results json
    run_killed("evaluate_fixed_predictions", ".json", small_val, str(tmp_path), "0.5")
    assert {n: (tmp_path / n).read_bytes() for n in names} == before
    [staging] = [p for p in tmp_path.iterdir() if p.name not in names]
    assert staging.is_dir() and ".tmp-" in staging.name

    # the next evaluation replaces every file and clears what the killed one left
    evaluate_fixed_predictions(small_val, str(tmp_path), "0.5")
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert json.loads((tmp_path / names[0]).read_text())[0]["score"] == pytest.approx(0.5)


def test_metrics_are_trimmed_in_place_for_an_open_appending_writer(tmp_path):
    path = tmp_path / "metrics.json"
    records = [json.dumps({"iteration": i, "lr": 0.1}) + "\n" for i in (19, 39, 59)]
    path.write_text("".join(records) + '{"iteration": 79, "lr"')  # killed mid-write
    writer = open(path, "a")  # as detectron2's JSONWriter, opened before resume_or_load
    assert _trim_metrics(str(path), 40) == len(records[2]) + len('{"iteration": 79, "lr"')
    writer.write(json.dumps({"iteration": 59, "lr": 0.01}) + "\n")
    writer.close()
    iterations = [json.loads(line)["iteration"] for line in path.read_text().splitlines()]
    assert iterations == [19, 39, 59]


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ann = generate_shapes(str(root), "train", 8, seed=12, min_size=96, max_size=128)
    return f"faults_train={ann}:{root / 'train'}"


def test_nan_loss_stops_training_after_the_last_checkpoint_is_safe(
    small_train, tmp_path, monkeypatch
):
    name = register_coco_dataset(small_train)
    cfg = tiny_cfg()
    cfg.merge_from_list(
        ["MODEL.SOLO.NUM_CLASSES", 4, "DATASETS.TRAIN", (name,), "DATASETS.TEST", (),
         "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96, "SOLVER.IMS_PER_BATCH", 2,
         "SOLVER.MAX_ITER", 10, "SOLVER.CHECKPOINT_PERIOD", 2, "SOLVER.BASE_LR", 0.001,
         "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path)]
    )  # fmt: skip
    real_losses = SOLO.losses

    def losses_nan_at_iteration_3(self, *args, **kwargs):
        from detectron2.utils.events import get_event_storage

        losses = real_losses(self, *args, **kwargs)
        if get_event_storage().iter == 3:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    monkeypatch.setattr(SOLO, "losses", losses_nan_at_iteration_3)
    trainer = Trainer(cfg)
    # DefaultTrainer's checkpointer was replaced by an atomic one before the hooks took it
    assert isinstance(trainer.checkpointer, AtomicCheckpointer)
    assert set(trainer.checkpointer.checkpointables) == {"trainer"}
    periodic = [h for h in trainer._hooks if isinstance(h, PeriodicCheckpointer)]
    assert len(periodic) == 1 and periodic[0].checkpointer is trainer.checkpointer
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    message = str(e.value) + "".join(getattr(e.value, "__notes__", []))
    assert "iteration=3" in message and "loss_mask" in message and "loss_cls" in message
    last = tmp_path / "model_0000001.pth"
    assert (tmp_path / "last_checkpoint").read_text() == last.name
    if sys.version_info >= (3, 11):
        assert f"The last checkpoint on disk is {last}" in message
    assert not (tmp_path / "model_final.pth").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    fresh = Trainer.build_model(cfg)
    AtomicCheckpointer(fresh).load(str(last))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key


def _expected_lrs(config_file, opts, max_iter):
    """The learning rate of each iteration of an uninterrupted run with these solver options."""
    cfg = load_config(config_file, opts)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(max_iter):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.e2e
def test_sigkill_during_training_then_resume(small_train, tmp_path):
    """kill -9 a training run after a checkpoint, --resume: same iterations, same LR schedule."""
    out = tmp_path / "out"
    solver = [
        "SOLVER.MAX_ITER",
        "12",
        "SOLVER.CHECKPOINT_PERIOD",
        "4",
        "SOLVER.BASE_LR",
        "0.001",
        "SOLVER.WARMUP_ITERS",
        "4",
        "SOLVER.IMS_PER_BATCH",
        "2",
    ]
    data = ["DATASETS.TRAIN", "('faults_train',)", "DATASETS.TEST", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "OUTPUT_DIR", str(out)]  # fmt: skip
    opts = TINY_OPTS + solver + data
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file",
               str(REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"),
               "--dataset", small_train]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no oversubscribed threads on a busy machine
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        command + opts, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    last = out / "last_checkpoint"
    deadline = time.monotonic() + 300
    while not (last.exists() and last.read_text() == "model_0000007.pth"):  # 2nd checkpoint
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    log.close()
    assert last.read_text() == "model_0000007.pth"
    assert not (out / "model_final.pth").exists()
    killed = torch.load(out / "model_0000007.pth", map_location="cpu", weights_only=False)
    assert killed["iteration"] == 7
    metrics = out / "metrics.json"
    with open(metrics, "a") as f:  # as if killed while writing a metrics record
        f.write('{"iteration": 8, "lr": 0.00')

    res = subprocess.run(
        command + ["--resume"] + opts,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Starting training from iteration 8" in res.stdout + res.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [11]  # the partial record was trimmed
    lrs = _expected_lrs(command[3], solver, 12)
    assert lrs[11] != lrs[11 - 8]  # what a schedule restarted at the resume would give
    assert records[0]["lr"] == pytest.approx(lrs[11], rel=1e-6)
    assert np.isfinite(records[0]["total_loss"])
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 11
    [scheduler] = [h for h in final["trainer"]["hooks"].values() if "last_epoch" in h]
    assert scheduler["last_epoch"] == 12  # 12 steps in all: 8 before the kill, 4 after resume
