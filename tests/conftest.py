"""Shared test helpers: configs, synthetic inputs, tiny models that detect, a training step."""

import atexit
import copy
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.events import EventStorage
from PIL import Image

from solo_d2.config import add_solo_config, load_config, merge_config_opts
from solo_d2.export.compare import MIN_IOU, SCORE_TOL, compare_detections
from solo_d2.modeling.targets import instance_targets

REPO = Path(__file__).resolve().parent.parent
# The dataset check cache of this test run, never the user's ~/.cache/solo_d2. The processes the
# tests start share it (a spawned worker that imports this file keeps its parent's); the pytest
# process that made it removes it when the run ends (dataset packs make it hundreds of MB).
if "SOLO_D2_TEST_CACHE" not in os.environ:
    os.environ["SOLO_D2_TEST_CACHE"] = tempfile.mkdtemp(prefix="solo_d2_test_cache_")

    def _remove_test_cache(folder: str, owner: int) -> None:
        if os.getpid() == owner:  # not in a forked child that exits through atexit
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(_remove_test_cache, os.environ["SOLO_D2_TEST_CACHE"], os.getpid())
os.environ["SOLO_D2_CACHE"] = os.environ["SOLO_D2_TEST_CACHE"]
PARITY_FIXTURE = REPO.parent / "shared" / "parity" / "solov2_adelaidet_r18_public.pt"


def load_script(path: Union[str, Path], name: Optional[str] = None):
    """A script of the repository (``train_net.py``, ``demo/demo.py``, ``tools/*.py``) loaded as a
    module, without putting its folder on ``sys.path``."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def solo_cfg(config_file: Optional[Union[str, Path]] = None, opts: Sequence = ()) -> CfgNode:
    """detectron2's config with the SOLO keys, ``config_file`` and KEY VALUE ``opts`` merged.

    Args:
        config_file: a YAML file; a relative path is taken in configs/ ("SOLO_R50_1x.yaml").
            None: detectron2's and the SOLO defaults only.
        opts: overrides, as on the command line (strings) or as Python values.
    """
    if config_file is None:
        cfg = get_cfg()
        add_solo_config(cfg)
        merge_config_opts(cfg, opts)
        return cfg
    path = Path(config_file)
    return load_config(str(path if path.is_absolute() else REPO / "configs" / path), opts)


# Command-line overrides that make the quickstart config's model tiny, for train_net.py runs.
TINY_OPTS = [
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.SOLO.INSTANCE_IN_CHANNELS", "32",
    "MODEL.SOLO.INSTANCE_CHANNELS", "32",
    "MODEL.SOLO.NUM_KERNELS", "32",
    "MODEL.SOLO.MASK_IN_CHANNELS", "32",
    "MODEL.SOLO.MASK_CHANNELS", "32",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MIN_SIZE_TEST", "128",
]  # fmt: skip


def tiny_cfg() -> CfgNode:
    """A SOLOv2 with an R18-FPN of 32 channels and small heads: fast on CPU."""
    return solo_cfg(
        "Base-SOLOv2.yaml",
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "",
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.SOLO.NUM_CLASSES", 3,
            "MODEL.SOLO.INSTANCE_IN_CHANNELS", 32,
            "MODEL.SOLO.INSTANCE_CHANNELS", 32,
            "MODEL.SOLO.NUM_INSTANCE_CONVS", 2,
            "MODEL.SOLO.NUM_KERNELS", 32,
            "MODEL.SOLO.MASK_IN_CHANNELS", 32,
            "MODEL.SOLO.MASK_CHANNELS", 32,
            "MODEL.SOLO.FPN_SCALE_RANGES", [[1, 32], [16, 64], [32, 128], [64, 256], [128, 2048]],
            "MODEL.SOLO.NUM_GRIDS", [12, 10, 8, 6, 4],
        ],
    )  # fmt: skip


def make_input(h, w, boxes=(), classes=(), seed=0):
    """A training input dict with rectangle instances (masks = boxes), as the mapper makes it."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    masks = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        m[y1:y2, x1:x2] = True
    valid, centers, small = instance_targets(masks, 4)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    inst.gt_centers = centers
    inst.gt_masks_small = small
    return {"image": image, "instances": inst[valid], "height": h, "width": w}


def train_step(model, inputs):
    """One forward and backward pass in training mode (gradients zeroed first); the losses."""
    model.train()
    model.zero_grad()
    with EventStorage():
        losses = model(inputs)
    sum(losses.values()).backward()
    return losses


def eager(model, image) -> Instances:
    """The model's detections on one (3, H, W) image, at the image's size, in eval mode."""
    model.eval()
    with torch.no_grad():
        return model([{"image": image}])[0]["instances"]


# confident_tiny_model's mask outputs: weights of std GAIN / sqrt(fan-in) and biases that give
# mask logits of mean ~2 and std ~4 on random images (features of RMS ~0.6). The random init
# (logits of std ~0.01) leaves every soft-mask value near the 0.5 threshold, where float32
# rounding flips pixels and so changes maskness-rescored scores; these masks are sharp, seldom
# tiny, and seldom saturated (values of exactly 0 or 1 in float32, interpolated, give exact ties
# at the threshold). SOLO and Decoupled SOLO: one conv of the features; SOLOv2: dynamic kernels
# times 32 mask features (of sum ~15).
MASK_GAIN, MASK_BIAS = 6.7, 2.0
KERNEL_GAIN, KERNEL_BIAS = 1.6, 0.13
# Scale of the classifier's random-init weights: spreads the category scores (0.2 to 0.7 rather
# than 0.14 to 0.23) so that neighbouring cells (points NMS) and the top-k cuts are not near-tied.
CATE_SPREAD = 4.0


def confident_tiny_model(head: str = "SOLOv2InstanceHead", **cfg_changes) -> torch.nn.Module:
    """A tiny random-init model (seed 0) that detects, far from its inference thresholds.

    Classifier prior 0.2 with its weights scaled by ``CATE_SPREAD``; mask outputs (SOLO and
    Decoupled SOLO mask maps, SOLOv2's dynamic kernels) drawn as ``MASK_GAIN``/``KERNEL_GAIN``
    say: sharp masks. Deformable offsets of a few pixels, not all zero. Every variant gives 100
    detections on a random 96 x 128 image, and float32 rounding changes none of them
    (:func:`assert_rounding_insensitive`).

    Args:
        head: MODEL.SOLO.HEAD.
        cfg_changes: other config keys and values, merged into :func:`tiny_cfg`.
    """
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.HEAD = head
    cfg.MODEL.SOLO.PRIOR_PROB = 0.2
    for key, value in cfg_changes.items():
        cfg.merge_from_list([key, value])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mask_pred" in name or "kernel_pred" in name:
                mask = "mask_pred" in name
                gain, bias = (MASK_GAIN, MASK_BIAS) if mask else (KERNEL_GAIN, KERNEL_BIAS)
                if name.endswith("weight"):
                    p.normal_(0, gain / p[0].numel() ** 0.5)
                else:
                    p.fill_(bias)
            if "offset" in name:  # deformable offsets of a few pixels, not all zero
                p.normal_(0, 1.0) if name.endswith("bias") else p.normal_(0, 1e-4)
        model.ins_head.cate_pred.weight.mul_(CATE_SPREAD)
    return model


def assert_rounding_insensitive(model, image) -> None:
    """Assert that float32 rounding moves the model's detections on ``image`` by less than half
    the tolerances of :func:`~solo_d2.export.compare.compare_detections`.

    A float64 copy of the model is the reference: the float32 model's detections must pair with
    its detections with scores within ``SCORE_TOL / 2`` and mask IoUs >= ``(1 + MIN_IOU) / 2``.
    Score differences and IoU distances (1 - IoU) obey the triangle inequality, so any two
    float32 implementations (PyTorch, ONNX Runtime, on any CPU) that each keep that close to
    float64 agree within the full tolerances: nothing on this input sits so near a threshold or
    a tie (points NMS, top-k, the 0.5 mask threshold) that their rounding decides the result.
    """
    ref = eager(copy.deepcopy(model).double(), image.double())
    got = eager(model, image.float())
    agreement = compare_detections(
        ref,
        got.scores,
        got.pred_classes,
        got.pred_masks,
        score_tol=SCORE_TOL / 2,
        min_iou=(1 + MIN_IOU) / 2,
    )
    assert agreement.ok, f"float32 vs float64: {agreement}"


# ---- the image zoo: every image format and fault the readers must handle

IMAGE_ZOO_RGB = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
IMAGE_ZOO_GRAY16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 85).astype(np.uint16)
EXIF_ORIENTATION = 0x0112


def _exif_jpeg(path: Path, orientation: int) -> None:
    """A 20 x 40 JPEG whose left quarter is white, stored with an EXIF orientation tag."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif, quality=95)


def write_image_zoo(folder: Path) -> Tuple[Dict[str, Tuple[int, int]], Dict[str, str]]:
    """Write the image zoo (tests/data/test_images.py, tests/demo/test_demo.py) into ``folder``.

    Returns:
        good: file name -> (height, width) as read (EXIF applied);
        bad: file name -> a phrase the error message must contain.
    """
    folder.mkdir(parents=True, exist_ok=True)
    gray = IMAGE_ZOO_RGB[:, :, 0]
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(gray).convert("1").save(folder / "bilevel.png")
    Image.fromarray(IMAGE_ZOO_RGB).convert("P").save(folder / "palette.png")
    Image.fromarray(gray).convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(np.dstack([IMAGE_ZOO_RGB, np.full((24, 32), 100, np.uint8)])).save(
        folder / "rgba.png"
    )
    Image.fromarray(IMAGE_ZOO_GRAY16).save(folder / "gray16.png")  # mode "I;16"
    rgb16 = np.stack(
        [IMAGE_ZOO_GRAY16, IMAGE_ZOO_GRAY16 // 2, IMAGE_ZOO_GRAY16 // 4], axis=2
    )  # red, green, blue
    cv2.imwrite(str(folder / "rgb16.png"), rgb16[:, :, ::-1])  # 16 bits per channel
    Image.fromarray(gray.astype(np.float32)).save(folder / "float.tif")  # mode "F"
    Image.fromarray(IMAGE_ZOO_RGB).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    _exif_jpeg(folder / "exif_rotated_90.jpg", 6)
    _exif_jpeg(folder / "exif_rotated_180.jpg", 3)
    Image.fromarray(IMAGE_ZOO_RGB[:1, :1]).save(folder / "one_pixel.png")
    Image.fromarray(IMAGE_ZOO_RGB[:16, :16]).save(folder / "sixteen.png")
    good = {
        "gray.png": (24, 32),
        "bilevel.png": (24, 32),
        "palette.png": (24, 32),
        "gray_alpha.png": (24, 32),
        "rgba.png": (24, 32),
        "gray16.png": (24, 32),
        "rgb16.png": (24, 32),
        "float.tif": (24, 32),
        "cmyk.jpg": (24, 32),
        "exif_rotated_90.jpg": (40, 20),
        "exif_rotated_180.jpg": (20, 40),
        "one_pixel.png": (1, 1),
        "sixteen.png": (16, 16),
    }
    Image.fromarray(IMAGE_ZOO_RGB).save(folder / "full.jpg")
    Image.fromarray(IMAGE_ZOO_RGB).save(folder / "full.png")
    for name in ("full.jpg", "full.png"):
        data = (folder / name).read_bytes()
        (folder / f"truncated_{name.split('.')[1]}.{name.split('.')[1]}").write_bytes(
            data[: len(data) // 2]
        )
        (folder / name).unlink()
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "folder.jpg").mkdir()
    bad = {
        "truncated_jpg.jpg": "truncated or corrupt",
        "truncated_png.png": "truncated or corrupt",
        "text.jpg": "not an image file",
        "empty.png": "empty file",
        "missing.jpg": "file not found",
        "folder.jpg": "is a directory",
    }
    return good, bad


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a busy 2-core machine two PyTorch threads made tiny models ~10x slower (threads waiting on
    each other), and results do not depend on it. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_parity_fixture() -> Path:
    """``PARITY_FIXTURE``, or skip the test when it is absent (it is not in the repository)."""
    if not PARITY_FIXTURE.exists():
        pytest.skip(
            f"parity fixture {PARITY_FIXTURE} not found (it lives in ../shared/, beside CI's clone)"
        )
    return PARITY_FIXTURE


@pytest.fixture
def parity_fixture_path() -> Path:
    """The parity fixture's path; the test is skipped without it."""
    return require_parity_fixture()


# A tiny COCO panoptic dataset (write_tiny_panoptic): non-contiguous category ids, arbitrary
# segment ids. Thing classes (contiguous) 0 "square", 1 "bar"; stuff 1 "sky", 2 "ground".
TINY_PANOPTIC_CATEGORIES = [
    {"id": 3, "name": "square", "isthing": 1, "color": [220, 20, 60]},
    {"id": 11, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 5, "name": "bar", "isthing": 1, "color": [0, 200, 0]},
    {"id": 20, "name": "ground", "isthing": 0, "color": [140, 100, 40]},
]


def tiny_panoptic_layout(h: int, w: int, i: int) -> Tuple[np.ndarray, list]:
    """Image ``i``'s (h, w) int64 segment-id map and segments_info (dataset category ids).

    Sky above row h/2, ground below; a 2-pixel void column on the left; a square of side h/3 and
    a horizontal bar, both things, moving with ``i``; image 1 also has a crowd square.
    """
    ids = np.zeros((h, w), dtype=np.int64)
    sky, ground, square, bar, crowd = 7001 + i, 90210 + i, 4242 + i, 123456 + i, 55 + i
    ids[: h // 2] = sky
    ids[h // 2 :] = ground
    s = h // 3
    x0 = 4 + 3 * i
    ids[8 : 8 + s, x0 : x0 + s] = square
    ids[h - 14 : h - 6, w // 2 : w - 6] = bar
    segments = [
        {"id": sky, "category_id": 11, "iscrowd": 0},
        {"id": ground, "category_id": 20, "iscrowd": 0},
        {"id": square, "category_id": 3, "iscrowd": 0},
        {"id": bar, "category_id": 5, "iscrowd": 0},
    ]
    if i == 1:
        ids[h // 2 + 2 : h // 2 + 10, x0 : x0 + 8] = crowd
        segments.append({"id": crowd, "category_id": 3, "iscrowd": 1})
    ids[:, :2] = 0
    for seg in segments:
        ys, xs = np.nonzero(ids == seg["id"])
        seg["area"] = int(len(ys))
        seg["bbox"] = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
    return ids, segments


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 RGB of a COCO panoptic PNG."""
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def write_tiny_panoptic(
    folder: Path, num_images: int = 4, size: Tuple[int, int] = (64, 96)
) -> Tuple[str, str, str]:
    """Write a tiny COCO panoptic dataset under ``folder``; return (json, png_dir, image_dir).

    Images are noise whose colour follows the layout (sky blue, ground brown, things red/green),
    so a tiny model can learn it.
    """
    h, w = size
    image_dir, png_dir = folder / "images", folder / "panoptic"
    image_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    colors = {c["id"]: c["color"] for c in TINY_PANOPTIC_CATEGORIES}
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(num_images):
        ids, segments = tiny_panoptic_layout(h, w, i)
        rgb = rng.integers(0, 40, (h, w, 3)).astype(np.int64)
        for seg in segments:
            rgb[ids == seg["id"]] += colors[seg["category_id"]]
        cv2.imwrite(str(image_dir / f"{i}.png"), rgb.clip(0, 255).astype(np.uint8)[..., ::-1])
        Image.fromarray(id_to_rgb(ids)).save(png_dir / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "height": h, "width": w})
        annotations.append(
            {"image_id": 100 + i, "file_name": f"{i}.png", "segments_info": segments}
        )
    data = {"images": images, "annotations": annotations, "categories": TINY_PANOPTIC_CATEGORIES}
    json_file = folder / "panoptic.json"
    json_file.write_text(json.dumps(data))
    return str(json_file), str(png_dir), str(image_dir)


# ---- a hand-built detection dataset (tests/visualization/test_dataset_report.py)

# Five levels with a gap between P4 and P5 (64 < scale < 80 is in no level).
HAND_RANGES = [[4, 24], [16, 48], [32, 64], [80, 100], [90, 110]]
HAND_GRIDS = [12, 10, 8, 6, 4]
HAND_CLASSES = ["a", "b", "c"]


def hand_ann(box, category, iscrowd=0, segmentation=True, mode=BoxMode.XYWH_ABS):
    """A detectron2 annotation of ``box`` with a rectangle polygon (or no segmentation)."""
    x, y, w, h = box
    polygon = [[x, y, x + w, y, x + w, y + h, x, y + h]] if segmentation else []
    return {"bbox": list(box), "bbox_mode": mode, "category_id": category, "iscrowd": iscrowd,
            "segmentation": polygon}  # fmt: skip


def hand_built_dicts():
    """A hand-built detection dataset (detectron2 dicts) for the dataset statistics, whose numbers
    tests/visualization/test_dataset_report.py works out by hand: four images; boxes XYWH but
    L's (XYXY), classes 0 "a", 1 "b", 2 "c" (letters: the objects of the test's docstring)."""
    image0 = [  # 128 x 128
        hand_ann([0, 0, 10, 10], 0),  # A
        hand_ann([2, 2, 8, 8], 0),  # B
        hand_ann([100, 100, 20, 20], 1),  # C
        hand_ann([96, 96, 28, 28], 1),  # D
        hand_ann([50, 50, 3, 3], 2),  # H
    ]
    image1 = [  # 128 x 128
        hand_ann([0, 0, 70, 70], 2),  # E
        hand_ann([0, 0, 95, 95], 2),  # G
        hand_ann([0, 0, 120, 120], 2),  # I
        hand_ann([60, 60, 30, 30], 0),  # J
        hand_ann([61, 61, 30, 30], 1),  # K
        hand_ann([0, 0, 50, 50], 0, iscrowd=1),  # crowd: left out
        hand_ann([0, 0, 40, 40], 0, segmentation=False),  # no segmentation: left out
        hand_ann([130, 10, 5, 5], 0),  # outside the image: an empty box once clipped, left out
    ]
    image2 = [hand_ann([0, 0, 10, 10], 0, mode=BoxMode.XYXY_ABS)]  # L, 64 x 128 (h x w)
    return [
        {"height": 128, "width": 128, "annotations": image0},
        {"height": 128, "width": 128, "annotations": image1},
        {"height": 64, "width": 128, "annotations": image2},
        {"height": 128, "width": 128, "annotations": []},
    ]
