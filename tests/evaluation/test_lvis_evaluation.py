"""LVIS federated evaluation (SOLOLVISEvaluator) on hand-made cases, the lvis/numpy shim, and an
end-to-end train_net.py run on a small long-tail LVIS-format dataset."""

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_OPTS
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import register_lvis_instances
from detectron2.structures import Boxes, Instances
from PIL import Image
from pycocotools import mask as mask_util

from solo_d2.data.lvis import register_lvis_dataset
from solo_d2.evaluation import SOLOLVISEvaluator
from solo_d2.evaluation.lvis_evaluation import LVIS_METRICS, lvis_numpy_compat

SIZE = 32  # images are SIZE x SIZE
R1 = (2, 2, 12, 12)  # rectangles (x0, y0, x1, y1): pixels [y0:y1, x0:x1], 10 x 10 ("small")
R2 = (18, 18, 28, 28)  # disjoint from R1: IoU 0


@pytest.fixture
def name() -> Iterator[str]:
    name = f"test_lvis_eval_{uuid.uuid4().hex[:12]}"
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _mask(rect) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    x0, y0, x1, y1 = rect
    m[y0:y1, x0:x1] = True
    return m


def _rle(rect) -> dict:
    rle = mask_util.encode(np.asfortranarray(_mask(rect).astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_eval_dataset(root: Path, images: Dict[int, dict], gts: Sequence[Tuple], cats) -> str:
    """An LVIS file of SIZE x SIZE images; ``images``: id -> extra image fields; ``gts``:
    (image id, category id, rect); ``cats``: (id, frequency). The spec body."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for img_id, extra in images.items():
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "images" / f"{img_id}.png")
        entries.append(
            {"id": img_id, "file_name": f"{img_id}.png", "height": SIZE, "width": SIZE, **extra}
        )
    anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "segmentation": _rle(r),
         "bbox": [r[0], r[1], r[2] - r[0], r[3] - r[1]], "area": (r[2] - r[0]) * (r[3] - r[1])}
        for k, (i, c, r) in enumerate(gts)
    ]  # fmt: skip
    categories = [{"id": c, "name": f"cat{c}", "frequency": f} for c, f in cats]
    data = {"images": entries, "annotations": anns, "categories": categories}
    (root / "lvis.json").write_text(json.dumps(data))
    return f"lvis:{root / 'lvis.json'}:{root / 'images'}"


def detections(dets: List[Tuple[int, float, tuple]]) -> Instances:
    """Instances of (contiguous class, score, rect), masks and boxes exactly the rects."""
    inst = Instances((SIZE, SIZE))
    inst.pred_masks = torch.from_numpy(np.stack([_mask(r) for _, _, r in dets]))
    inst.pred_boxes = Boxes(torch.tensor([list(r) for _, _, r in dets], dtype=torch.float32))
    inst.scores = torch.tensor([s for _, s, _ in dets])
    inst.pred_classes = torch.tensor([c for c, _, _ in dets], dtype=torch.int64)
    return inst


def evaluate(name: str, per_image: Dict[int, list], output_dir: Path, **kwargs) -> dict:
    evaluator = SOLOLVISEvaluator(name, output_dir=str(output_dir), distributed=False, **kwargs)
    evaluator.reset()
    for img_id, dets in per_image.items():
        inst = detections(dets) if dets else Instances((SIZE, SIZE))
        if not dets:
            inst = detections([(0, 0.5, R1)])[[]]  # no detection
        evaluator.process([{"image_id": img_id}], [{"instances": inst}])
    return evaluator.evaluate()


# Categories: id 1 frequent ("f", contiguous 0), id 4 rare ("r", contiguous 1); no common one.
CATS = [(1, "f"), (4, "r")]


@pytest.mark.parametrize("not_exhaustive, expected_ap", [([], 50.0), ([1], 100.0)])
def test_false_positive_of_a_not_exhaustive_category(tmp_path, name, not_exhaustive, expected_ap):
    """Image 1 has one category-1 object (R1). Detections of category 1: a miss on R2 (score
    0.9) above the hit on R1 (0.6). Precision is 0 at the miss, 1/2 at the hit (recall 1): AP
    50 at every IoU threshold. When image 1 lists category 1 as not exhaustively annotated, the
    unmatched detection is ignored: AP 100."""
    spec = write_eval_dataset(
        tmp_path, {1: {"not_exhaustive_category_ids": not_exhaustive}}, [(1, 1, R1)], CATS
    )
    register_lvis_dataset(f"{name}={spec}")
    res = evaluate(name, {1: [(0, 0.9, R2), (0, 0.6, R1)]}, tmp_path / "out")
    for task in ("segm", "bbox"):
        assert res[task]["AP"] == pytest.approx(expected_ap, abs=1e-6)
        assert res[task]["AP50"] == pytest.approx(expected_ap, abs=1e-6)
        assert res[task]["APs"] == pytest.approx(expected_ap, abs=1e-6)
        assert res[task]["APf"] == pytest.approx(expected_ap, abs=1e-6)
        for metric in ("APr", "APc", "APm", "APl"):  # no annotated object there
            assert math.isnan(res[task][metric])
    written = json.loads((tmp_path / "out" / "evaluation_results.json").read_text())
    assert written["segm"]["APc"] is None and written["segm"]["AP"] == pytest.approx(expected_ap)
    results = json.loads((tmp_path / "out" / "lvis_instances_results.json").read_text())
    assert {r["category_id"] for r in results} == {1}  # contiguous 0 -> the file's id 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("negative, expected", [([1], (75.0, 50.0)), ([], (100.0, 100.0))])
def test_negative_and_unevaluated_categories(tmp_path, name, negative, expected):
    """Image 1: a category-1 object (R1), hit at score 0.6. Image 2: a category-4 (rare) object
    (R2), hit at 0.8, and no category-1 object, but a category-1 detection on R1 at 0.9.

    With category 1 in image 2's neg_category_ids, that detection is a false positive: AP(1) =
    50 (precision 0 then 1/2), AP(4) = 100, AP = 75, APf = 50, APr = 100. Without it, category 1
    is neither annotated nor negative in image 2, so it is not evaluated there: AP(1) = 100."""
    spec = write_eval_dataset(
        tmp_path,
        {1: {}, 2: {"neg_category_ids": negative}},
        [(1, 1, R1), (2, 4, R2)],
        CATS,
    )
    register_lvis_dataset(f"{name}={spec}")
    res = evaluate(name, {1: [(0, 0.6, R1)], 2: [(0, 0.9, R1), (1, 0.8, R2)]}, tmp_path / "o")
    ap, apf = expected
    for task in ("segm", "bbox"):
        assert res[task]["AP"] == pytest.approx(ap, abs=1e-6)
        assert res[task]["APf"] == pytest.approx(apf, abs=1e-6)
        assert res[task]["APr"] == pytest.approx(100.0, abs=1e-6)
        assert math.isnan(res[task]["APc"])
        assert set(res[task]) == set(LVIS_METRICS)


def test_detections_per_image_limit(tmp_path, name):
    """Only the best max_dets_per_image detections of an image count: with 1, the miss at 0.9
    is kept and the hit at 0.6 dropped: AP 0."""
    spec = write_eval_dataset(tmp_path, {1: {}}, [(1, 1, R1)], CATS)
    register_lvis_dataset(f"{name}={spec}")
    per_image = {1: [(0, 0.9, R2), (0, 0.6, R1)]}
    res = evaluate(name, per_image, tmp_path / "o", max_dets_per_image=1)
    assert res["segm"]["AP"] == pytest.approx(0.0, abs=1e-6)
    assert evaluate(name, per_image, tmp_path / "o")["segm"]["AP"] == pytest.approx(50.0)


def test_no_prediction_gives_zero_ap(tmp_path, name):
    spec = write_eval_dataset(tmp_path, {1: {}}, [(1, 1, R1)], CATS)
    register_lvis_dataset(f"{name}={spec}")
    res = evaluate(name, {1: []}, tmp_path / "o")
    assert res["segm"] == {m: 0.0 for m in LVIS_METRICS} and res["bbox"]["APr"] == 0.0
    assert json.loads((tmp_path / "o" / "lvis_instances_results.json").read_text()) == []


def test_faulty_ground_truth_is_left_out(tmp_path, name):
    """A faulty annotation (empty segmentation) is not ground truth: its category-1 object does
    not exist for evaluation, so the hit on R1 is the only detection and AP(1) = 100."""
    spec = write_eval_dataset(tmp_path, {1: {}}, [(1, 1, R1), (1, 1, R2)], CATS)
    data = json.loads((tmp_path / "lvis.json").read_text())
    data["annotations"][1]["segmentation"] = []
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    register_lvis_dataset(f"{name}={spec}")
    res = evaluate(name, {1: [(0, 0.6, R1)]}, tmp_path / "o")
    assert res["segm"]["AP"] == pytest.approx(100.0, abs=1e-6)
    faults = json.loads((tmp_path / "o" / "data_faults.json").read_text())
    assert [f["kind"] for f in faults] == ["empty_segmentation"]


def test_detectron2_registered_lvis_data(tmp_path, name):
    """A dataset registered as detectron2 registers its builtin LVIS ones (no data checks, ids
    1..C, contiguous id + 1 in the results) is evaluated from its file as it is."""
    write_eval_dataset(
        tmp_path, {1: {"neg_category_ids": [], "not_exhaustive_category_ids": []}},
        [(1, 1, R1)], [(1, "f"), (2, "r")],
    )  # fmt: skip
    meta = {"thing_classes": ["cat1", "cat2"]}
    register_lvis_instances(name, meta, str(tmp_path / "lvis.json"), str(tmp_path / "images"))
    res = evaluate(name, {1: [(0, 0.9, R2), (0, 0.6, R1)]}, tmp_path / "o")
    assert res["bbox"]["AP"] == pytest.approx(50.0, abs=1e-6)


def test_lvis_numpy_compat_shim():
    """lvis 0.5.3's eval.py uses np.float, gone since numpy 1.24: within the scope, the shim
    gives lvis.eval (and only it) a numpy namespace that has it; afterwards lvis.eval is as it
    was, also after an error in the block."""
    import lvis.eval

    before = lvis.eval.np
    assert before is np
    with lvis_numpy_compat():
        assert lvis.eval.np.float is float
        assert lvis.eval.np.cumsum is np.cumsum
        assert np.__name__ == "numpy"
        if not hasattr(np, "float"):  # numpy >= 1.24: the shim is what makes it work
            assert lvis.eval.np is not np
            with pytest.raises(AttributeError, match="float"):
                np.float  # noqa: B018
    assert lvis.eval.np is before
    with pytest.raises(RuntimeError, match="inside"):
        with lvis_numpy_compat():
            raise RuntimeError("inside")
    assert lvis.eval.np is before


# ---- end to end: train_net.py on a small long-tail LVIS-format dataset

# (file id, frequency, train images holding it): a long tail over 6 categories
LONG_TAIL = [(2, "f", 12), (5, "f", 10), (9, "c", 5), (14, "c", 3), (21, "r", 1), (30, "r", 1)]
COLORS = [
    (230, 40, 40),
    (40, 200, 40),
    (40, 80, 230),
    (220, 200, 30),
    (200, 40, 200),
    (30, 200, 200),
]


def write_long_tail(root: Path, split: str, n_images: int, seed: int) -> str:
    """Images of 96 x 96 px with one to three filled rectangles, one colour per category; the
    train split follows LONG_TAIL's image counts, val holds every category. Half the images are
    named by coco_url only (LVIS v1 style). Returns the spec body ``lvis:JSON:IMAGE_DIR``."""
    rng = np.random.default_rng(seed)
    folder = root / split
    folder.mkdir(parents=True)
    k = len(LONG_TAIL)
    if split == "train":
        holders = [rng.choice(n_images, size=count, replace=False) for _, _, count in LONG_TAIL]
    else:
        holders = [np.array([i % n_images, (i + 1) % n_images]) for i in range(k)]
    images, anns = [], []
    for i in range(n_images):
        pixels = np.full((96, 96, 3), 128, np.uint8)
        cats = [c for c in range(k) if i in holders[c]][:3] or [0]
        for slot, c in enumerate(cats):
            x0, y0 = 4 + 30 * slot + int(rng.integers(0, 6)), int(rng.integers(4, 40))
            w, h = int(rng.integers(18, 26)), int(rng.integers(20, 50))
            pixels[y0 : y0 + h, x0 : x0 + w] = COLORS[c]
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            anns.append({"id": len(anns) + 1, "image_id": i + 1,
                         "category_id": LONG_TAIL[c][0], "bbox": [x0, y0, w, h],
                         "area": w * h, "segmentation": [poly]})  # fmt: skip
        Image.fromarray(pixels).save(folder / f"{i + 1:06d}.png")
        image = {"id": i + 1, "height": 96, "width": 96, "neg_category_ids": [],
                 "not_exhaustive_category_ids": []}  # fmt: skip
        if i % 2:
            image["coco_url"] = f"http://images.example.org/{split}/{i + 1:06d}.png"
        else:
            image["file_name"] = f"{i + 1:06d}.png"
        absent = [LONG_TAIL[c][0] for c in range(k) if c not in cats]
        image["neg_category_ids"] = absent[:2]
        images.append(image)
    cats = [{"id": cid, "name": f"class_{cid}", "frequency": f, "image_count": n}
            for cid, f, n in LONG_TAIL]  # fmt: skip
    path = root / f"lvis_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return f"lvis:{path}:{folder}"


@pytest.mark.e2e
def test_train_net_on_long_tail_lvis_data(tmp_path):
    train = write_long_tail(tmp_path, "train", 16, seed=1)
    val = write_long_tail(tmp_path, "val", 6, seed=2)
    out = tmp_path / "out"
    config = REPO / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config),
           "--dataset", f"lt_train={train}", "--dataset", f"lt_val={val}",
           *TINY_OPTS, "MODEL.SOLO.NUM_CLASSES", "6",
           "DATASETS.TRAIN", "('lt_train',)", "DATASETS.TEST", "('lt_val',)",
           "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
           "DATALOADER.REPEAT_THRESHOLD", "0.3", "TEST.DETECTIONS_PER_IMAGE", "300",
           "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)]  # fmt: skip
    # one thread: on a busy 2-core machine, two make a tiny model slower (see conftest.one_thread)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert "Using training sampler RepeatFactorTrainingSampler" in log
    for task in ("segm", "bbox"):
        assert f"copypaste: Task: {task}" in log
    assert log.count("copypaste: AP,AP50,AP75,APs,APm,APl,APr,APc,APf") == 2
    written = json.loads((out / "inference" / "lt_val" / "evaluation_results.json").read_text())
    assert set(written["segm"]) == set(LVIS_METRICS)
    assert (out / "inference" / "lt_val" / "lvis_instances_results.json").exists()
