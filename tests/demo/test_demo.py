"""Tests of ``demo/demo.py``, run as a subprocess on a tiny random-weight SOLOv2 (CPU, offline)."""

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, solo_cfg, write_image_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Instances
from pycocotools import mask as mask_util

from solo_d2.data.shapes import SHAPES_CLASSES
from solo_d2.export.compare import compare_detections

# every test reads the outputs of 12 demo processes run together (~25 s on 2 cores): end to end
pytestmark = pytest.mark.e2e
DEMO = "demo/demo.py"
MAX_DETECTIONS = 5
# The quickstart model, narrower and on smaller inputs so that a demo run takes seconds.
TINY_CONFIG = f"""\
_BASE_: "{REPO / 'configs' / 'SOLOv2_R18_quickstart_shapes.yaml'}"
MODEL:
  DEVICE: "cpu"
  FPN:
    OUT_CHANNELS: 32
  SOLO:
    INSTANCE_IN_CHANNELS: 32
    INSTANCE_CHANNELS: 32
    NUM_KERNELS: 32
    MASK_IN_CHANNELS: 32
    MASK_CHANNELS: 32
    NUM_GRIDS: [12, 10, 8, 6, 4]
INPUT:
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 128
TEST:
  DETECTIONS_PER_IMAGE: {MAX_DETECTIONS}
"""
# (height, width) of the test images; the two 120 x 160 ones share a batch at --batch-size 2.
IMAGE_SIZES = {"a.png": (120, 160), "b.png": (120, 160), "c.jpg": (64, 96), "d.png": (200, 150)}
VIDEO_FRAMES = 3
INSTANCE_KEYS = {"class_id", "class_name", "score", "bbox", "segmentation"}
LARGE_HW = (6000, 8000)
# Peak memory an 8000 x 6000 photo may add to a demo run on a small image (its RGB array alone is
# 144 MB; the masks 48 MB each). Before drawing was downscaled and the mask resizing chunked by
# size, it added 6 GB.
LARGE_IMAGE_EXTRA_RSS = 1.5e9


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Tiny config, its random-init checkpoint, a folder of images with one corrupt file, a video.

    The checkpoint's classifier biases are +5, +4, +3, +2 (the 4 classes score ~0.993, 0.982,
    0.953, 0.881 in every cell: no two classes near-tied) and its kernel bias +1 (the mask
    features are non-negative after their ReLU, so masks cover the image): the model predicts
    instances whatever the image, and Matrix NMS decays each class's duplicates to ~0.13.
    """
    root = tmp_path_factory.mktemp("demo")
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    cfg = solo_cfg(config)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.ins_head.cate_pred.bias.copy_(torch.tensor([5.0, 4.0, 3.0, 2.0]))
        model.ins_head.kernel_pred.bias.fill_(1.0)
    DetectionCheckpointer(model, save_dir=str(root)).save("model")

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in IMAGE_SIZES.items():
        cv2.imwrite(str(images / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (images / "notes.txt").write_text("not an image")
    video = root / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for _ in range(VIDEO_FRAMES):
        writer.write(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    writer.release()

    # reliability inputs: odd image files, an 8000 x 6000 photo, weights that do not fit
    zoo_cases = write_image_zoo(root / "zoo")
    large = np.zeros((*LARGE_HW, 3), np.uint8)
    large[1000:5000, 2000:6000] = (30, 200, 90)
    cv2.imwrite(str(root / "large.jpg"), large)
    cfg.MODEL.SOLO.NUM_CLASSES = 3
    DetectionCheckpointer(build_model(cfg), save_dir=str(root)).save("three_classes")
    data = (root / "model.pth").read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 3])
    return {
        "root": root,
        "config": config,
        "weights": root / "model.pth",
        "images": images,
        "video": video,
        "zoo_cases": zoo_cases,
    }


def run_demo(args: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run the demo from the repository root; return the finished process (text output), with
    ``peak_rss`` (bytes) set to the peak resident memory of the demo process.

    Runs go concurrently, so each gets one intra-op thread (no oversubscribed spinning threads).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, DEMO, *args],
            cwd=REPO,
            env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=err,
            text=True,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    result.peak_rss = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


def tiny_args(files: Dict[str, Path], *args: str) -> List[str]:
    """``args`` plus the tiny config and its checkpoint on the CPU."""
    return [
        "--config-file",
        str(files["config"]),
        *args,
        "--opts",
        "MODEL.WEIGHTS",
        str(files["weights"]),
        "MODEL.DEVICE",
        "cpu",
    ]


def offline_env(cache: Path) -> Dict[str, str]:
    """This environment with every HTTP(S) request sent to a refusing proxy and an empty cache."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    unreachable = "http://127.0.0.1:9"  # the discard port: the connection is refused at once
    for key in ("https_proxy", "http_proxy"):
        env[key] = env[key.upper()] = unreachable
    env["HF_HUB_OFFLINE"] = "1"
    env["FVCORE_CACHE"] = str(cache)  # no previously downloaded copy
    return env


@pytest.fixture(scope="module")
def runs(files: Dict[str, Path]) -> Dict[str, subprocess.CompletedProcess]:
    """Every demo run of these tests, by name, run concurrently (each is mostly start-up)."""
    root, images = files["root"], files["images"]
    json_args = ["--json", "--confidence-threshold", "0.0"]
    commands = {
        # the folder (with a corrupt file and a text file) into a folder, one image at a time
        "folder": (
            tiny_args(files, "--input", str(images), "--output", str(root / "folder"), *json_args),
            None,
        ),
        # the same images from a glob and a file, two at a time
        "batched": (
            tiny_args(
                files,
                "--input",
                str(images / "*.png"),
                str(images / "c.jpg"),
                "--output",
                str(root / "batched"),
                "--batch-size",
                "2",
                *json_args,
            ),
            None,
        ),
        # one image into one file, nothing kept
        "single": (
            tiny_args(
                files,
                "--input",
                str(images / "d.png"),
                "--output",
                str(root / "single" / "drawn.jpg"),
                "--json",
                "--confidence-threshold",
                "1.01",
            ),
            None,
        ),
        "print_only": (tiny_args(files, "--input", str(images / "a.png")), None),
        "video": (
            tiny_args(files, "--video-input", str(files["video"]), "--output", str(root / "video")),
            None,
        ),
        "missing_weights": (
            ["--config-file", str(files["config"]), "--input", str(images / "a.png")]
            + ["--opts", "MODEL.WEIGHTS", str(root / "no_such_model.pth")],
            None,
        ),
        # the default config, whose COCO weights must be downloaded
        "offline": (["--input", str(images / "a.png")], offline_env(root / "cache")),
        "zoo": (tiny_args(files, "--input", str(root / "zoo"), "--output", str(root / "zoo_out"),
                          *json_args), None),
        "large": (tiny_args(files, "--input", str(root / "large.jpg"), "--output",
                            str(root / "large_out"), "--json"), None),
        "unknown_key": (tiny_args(files, "--input", str(images / "a.png"))
                        + ["MODEL.SOLO.NUM_CLASES", "4"], None),
        "three_class_weights": (tiny_args(files, "--input", str(images / "a.png"))
                                + ["MODEL.WEIGHTS", str(root / "three_classes.pth")], None),
        "truncated_weights": (tiny_args(files, "--input", str(images / "a.png"))
                              + ["MODEL.WEIGHTS", str(root / "truncated.pth")], None),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_demo, *command) for name, command in commands.items()}
    return {name: future.result() for name, future in futures.items()}


def load_jsons(folder: Path) -> Dict[str, dict]:
    """The ``<stem>.json`` files of ``folder`` by stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def record_instances(record: dict) -> Instances:
    """The detections of a demo JSON record: scores, classes and decoded masks."""
    h, w = record["height"], record["width"]
    masks = np.zeros((len(record["instances"]), h, w), dtype=bool)
    for m, inst in zip(masks, record["instances"]):
        m[:] = mask_util.decode(
            {"size": inst["segmentation"]["size"], "counts": inst["segmentation"]["counts"]}
        )
    return Instances(
        (h, w),
        scores=torch.tensor([inst["score"] for inst in record["instances"]]),
        pred_classes=torch.tensor([inst["class_id"] for inst in record["instances"]]),
        pred_masks=torch.from_numpy(masks),
    )


def test_folder_input_writes_visualisations_and_json(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
) -> None:
    out = files["root"] / "folder"
    assert sorted(p.name for p in out.glob("*.*") if p.suffix != ".json") == sorted(IMAGE_SIZES)
    for name, (h, w) in IMAGE_SIZES.items():
        drawn = cv2.imread(str(out / name))
        assert drawn is not None and drawn.shape == (h, w, 3)
    records = load_jsons(out)
    assert sorted(records) == sorted(Path(n).stem for n in IMAGE_SIZES)
    for stem, record in records.items():
        name = next(n for n in IMAGE_SIZES if Path(n).stem == stem)
        h, w = IMAGE_SIZES[name]
        assert record["file_name"] == str(files["images"] / name)
        assert (record["height"], record["width"]) == (h, w)
        assert len(record["instances"]) == MAX_DETECTIONS, "threshold 0 keeps every prediction"
        for inst in record["instances"]:
            assert set(inst) == INSTANCE_KEYS
            assert inst["class_name"] == SHAPES_CLASSES[inst["class_id"]]
            assert 0.0 <= inst["score"] <= 1.0
            assert isinstance(inst["segmentation"]["counts"], str)
            mask = mask_util.decode(
                {"size": inst["segmentation"]["size"], "counts": inst["segmentation"]["counts"]}
            )
            assert mask.shape == (h, w) and mask.any()
            x, y, bw, bh = inst["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x, y) == pytest.approx((xs.min(), ys.min()), abs=1)
            assert (x + bw, y + bh) == pytest.approx((xs.max() + 1, ys.max() + 1), abs=1)
        scores = [inst["score"] for inst in record["instances"]]
        assert scores == sorted(scores, reverse=True)


def test_corrupt_image_is_reported_and_others_processed(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
) -> None:
    result = runs["folder"]
    assert result.returncode == 1, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "corrupt.jpg" in line]
    assert warnings and "warning" in warnings[0]
    assert "notes.txt" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(IMAGE_SIZES)
    for name, line in zip(sorted(IMAGE_SIZES), lines):
        assert line.startswith(f"{files['images'] / name}: {MAX_DETECTIONS} instances in ")
        assert line.endswith(" s")


def test_glob_input_and_batching_give_the_same_json(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
) -> None:
    assert runs["batched"].returncode == 0, runs["batched"].stderr
    single, batched = load_jsons(files["root"] / "folder"), load_jsons(files["root"] / "batched")
    assert sorted(batched) == sorted(single) == ["a", "b", "c", "d"]

    def agreement(reference: dict, other: dict):
        # scores within 1e-5: float32 kernels for a batch of 2 or 1 differ by ~1e-7, two images by
        # ~1e-3 (every class scores about the same on every image)
        got = record_instances(other)
        return compare_detections(
            record_instances(reference),
            got.scores,
            got.pred_classes,
            got.pred_masks,
            score_tol=1e-5,
        )

    for stem in single:
        result = agreement(single[stem], batched[stem])
        assert result.ok, (stem, str(result))
    # a real discrepancy is caught: the results of the two 120 x 160 images swapped
    assert not agreement(single["a"], batched["b"]).ok


def test_single_output_file_and_threshold_above_one(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
) -> None:
    assert runs["single"].returncode == 0, runs["single"].stderr
    out = files["root"] / "single" / "drawn.jpg"
    assert cv2.imread(str(out)).shape == (*IMAGE_SIZES["d.png"], 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["instances"] == [] and (record["height"], record["width"]) == (200, 150)
    assert sorted(p.name for p in out.parent.iterdir()) == ["drawn.jpg", "drawn.json"]


def test_without_output_only_prints(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
) -> None:
    result = runs["print_only"]
    assert result.returncode == 0, result.stderr
    # default threshold 0.5: each class's best mask is kept, the duplicates Matrix NMS decayed
    # (to ~0.13) are dropped
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{files['images'] / 'a.png'}: {len(SHAPES_CLASSES)} instances in ")
    assert sorted(p.name for p in files["images"].iterdir()) == sorted(
        [*IMAGE_SIZES, "corrupt.jpg", "notes.txt"]
    )


def test_video_is_written_as_mp4(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
) -> None:
    result = runs["video"]
    assert result.returncode == 0, result.stderr
    # default threshold 0.5: each class's best mask on every frame
    assert f"{VIDEO_FRAMES} frames, {VIDEO_FRAMES * len(SHAPES_CLASSES)} instances" in result.stdout
    capture = cv2.VideoCapture(str(files["root"] / "video" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == VIDEO_FRAMES and frames[0].shape == (64, 96, 3)


def test_missing_weights_file_is_named(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
) -> None:
    result = runs["missing_weights"]
    assert result.returncode != 0
    assert str(files["root"] / "no_such_model.pth") in result.stderr
    assert "Traceback" not in result.stderr


def test_default_weights_download_failure_exits_2(
    runs: Dict[str, subprocess.CompletedProcess],
) -> None:
    result = runs["offline"]
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "could not be downloaded from https://huggingface.co/ZjuCv/AdelaiDet/" in message
    assert "--opts MODEL.WEIGHTS" in message


def test_odd_image_files(files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]):
    """Grayscale, 16-bit, CMYK, EXIF-rotated, 1x1 ... are processed; broken files are named."""
    good, bad = files["zoo_cases"]
    result = runs["zoo"]
    assert result.returncode == 1, result.stderr
    zoo, out = files["root"] / "zoo", files["root"] / "zoo_out"
    for name, reason in bad.items():
        if name == "missing.jpg":  # not in the folder
            continue
        [line] = [x for x in result.stderr.splitlines() if str(zoo / name) in x]
        assert "warning: could not read image" in line and reason in line, line
    assert f"{len(bad) - 1} of {len(good) + len(bad) - 1} images could not be read" in result.stderr
    records = load_jsons(out)
    assert sorted(records) == sorted(Path(n).stem for n in good)
    for name, (h, w) in good.items():
        drawn = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert drawn is not None and drawn.shape == (h, w, 3), name  # EXIF-rotated: as shown
        record = records[Path(name).stem]
        assert (record["height"], record["width"]) == (h, w)
        for inst in record["instances"]:
            assert inst["segmentation"]["size"] == [h, w]


def test_large_image_with_bounded_memory(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
):
    result = runs["large"]
    assert result.returncode == 0, result.stderr
    h, w = LARGE_HW
    record = json.loads((files["root"] / "large_out" / "large.json").read_text())
    assert (record["height"], record["width"]) == (h, w) and record["instances"]
    for inst in record["instances"]:
        rle = inst["segmentation"]
        assert mask_util.decode({"size": rle["size"], "counts": rle["counts"]}).shape == (h, w)
    drawn = cv2.imread(str(files["root"] / "large_out" / "large.jpg"))
    # drawn downscaled to at most 4 MP, aspect ratio kept
    assert drawn.shape[0] * drawn.shape[1] <= 2560 * 1600
    assert drawn.shape[1] / drawn.shape[0] == pytest.approx(w / h, rel=0.01)
    extra = result.peak_rss - runs["print_only"].peak_rss
    assert extra < LARGE_IMAGE_EXTRA_RSS, f"peak RSS {extra / 1e9:.2f} GB above a small image's"


def test_config_and_weights_mistakes_are_one_line_errors(
    files: Dict[str, Path], runs: Dict[str, subprocess.CompletedProcess]
):
    expected = {
        "unknown_key": "error: --opts: config key MODEL.SOLO.NUM_CLASES does not exist; did you "
        "mean MODEL.SOLO.NUM_CLASSES?",
        "three_class_weights": f"error: weights file {files['root'] / 'three_classes.pth'} does "
        "not fit the model of the config: ",
        "truncated_weights": f"error: weights file {files['root'] / 'truncated.pth'} cannot be "
        "loaded: ",
    }
    for name, start in expected.items():
        result = runs[name]
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(start), (name, last)
    assert (
        "check the config and its MODEL.SOLO.NUM_CLASSES (4)" in runs["three_class_weights"].stderr
    )
    assert "(4," in runs["three_class_weights"].stderr  # a classifier shape in the model: 4 classes
