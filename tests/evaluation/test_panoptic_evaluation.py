"""SOLOPanopticEvaluator: PQ / SQ / RQ of tiny hand-checkable cases, dataset subsets, result files;
SOLOCOCOEvaluator on a panoptic dataset: the things' instance AP (at the end).

Every image is 10 x 10 pixels, painted by rows, so that each row is 10 pixels. Ground-truth
categories (dataset ids): person 1 and car 3 (things; contiguous 0 and 1), sky 10 and grass 12
(stuff; contiguous 1 and 2). Per category, over all images, panopticapi counts
SQ = sum(IoU of matches) / TP, RQ = TP / (TP + FP/2 + FN/2), PQ = SQ * RQ; the groups average
the categories that have any segment. The evaluator reports percent.
"""

import gc
import json
import math
import os
import sys
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from PIL import Image
from pycocotools import mask as mask_util

from solo_d2.data.faults import DatasetError
from solo_d2.data.images import BadImageError
from solo_d2.data.panoptic import panoptic_things_coco
from solo_d2.evaluation import SOLOCOCOEvaluator, SOLOPanopticEvaluator
from solo_d2.evaluation import panoptic_evaluation as pe

id2rgb = pytest.importorskip("panopticapi.utils").id2rgb

SIZE = 10
PERSON, CAR, SKY, GRASS = 1, 3, 10, 12  # dataset ids
CATEGORIES = [
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": CAR, "name": "car", "isthing": 1},
    {"id": SKY, "name": "sky", "isthing": 0},
    {"id": GRASS, "name": "grass", "isthing": 0},
]
# dataset id -> (isthing, contiguous id in the model's thing / stuff space)
MODEL_CATEGORY = {PERSON: (True, 0), CAR: (True, 1), SKY: (False, 1), GRASS: (False, 2)}
KEYS = ["PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"]


def paint(rows, pixels=()):
    """A 10 x 10 id map: ``rows`` [(first row, last row, id)], then ``pixels`` [(y, x, id)];
    the rest is 0 (void)."""
    ids = np.zeros((SIZE, SIZE), np.int64)
    for first, last, segment_id in rows:
        ids[first : last + 1] = segment_id
    for y, x, segment_id in pixels:
        ids[y, x] = segment_id
    return ids


def expected(th, st, all_=None):
    """The result dict (percent) from (PQ, SQ, RQ) of things, stuff and all (fractions)."""
    all_ = all_ if all_ is not None else tuple((a + b) / 2 for a, b in zip(th, st))
    return dict(zip(KEYS, [100 * v for v in (*all_, *th, *st)]))


@pytest.fixture
def register(tmp_path):
    """register(images, categories=CATEGORIES, dataset_ids=None) -> name of a new dataset.

    images: [(image_id, ground-truth id map, {segment id: (dataset category id, iscrowd)})],
    all written to the panoptic JSON and PNG folder; the registered dataset holds the images of
    ``dataset_ids`` (default: all)."""
    names = []

    def _register(images, categories=CATEGORIES, dataset_ids=None):
        name = f"test_panoptic_{uuid.uuid4().hex[:8]}"
        folder = tmp_path / name
        (folder / "panoptic").mkdir(parents=True)
        json_images, annotations, dicts = [], [], []
        for image_id, ids, segments in images:
            png = f"{image_id:012d}.png"
            Image.fromarray(id2rgb(ids)).save(folder / "panoptic" / png)
            segments_info = []
            for segment_id, (category_id, iscrowd) in segments.items():
                ys, xs = np.nonzero(ids == segment_id)
                bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
                segments_info.append(
                    {"id": segment_id, "category_id": category_id, "iscrowd": iscrowd,
                     "bbox": bbox, "area": int(len(ys))}
                )  # fmt: skip
            json_images.append(
                {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": SIZE, "width": SIZE}
            )
            annotations.append(
                {"image_id": image_id, "file_name": png, "segments_info": segments_info}
            )
            if dataset_ids is None or image_id in dataset_ids:
                dicts.append(
                    {"file_name": str(folder / "images" / f"{image_id:012d}.jpg"),
                     "image_id": image_id, "height": SIZE, "width": SIZE,
                     "pan_seg_file_name": str(folder / "panoptic" / png), "segments_info": []}
                )  # fmt: skip
        json_path = folder / "panoptic.json"
        json_path.write_text(
            json.dumps(
                {"images": json_images, "annotations": annotations, "categories": categories}
            )
        )
        things = [c for c in categories if c["isthing"]]
        stuff = [c for c in categories if not c["isthing"]]
        DatasetCatalog.register(name, lambda: dicts)
        MetadataCatalog.get(name).set(
            evaluator_type="coco_panoptic_seg",
            panoptic_json=str(json_path),
            panoptic_root=str(folder / "panoptic"),
            image_root=str(folder / "images"),
            thing_classes=[c["name"] for c in things],
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(things)},
            stuff_classes=["things"] + [c["name"] for c in stuff],
            stuff_dataset_id_to_contiguous_id={c["id"]: i + 1 for i, c in enumerate(stuff)},
        )
        names.append(name)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def model_output(ids, segments):
    """The model's output for a predicted id map; segments: {segment id: dataset category id}."""
    info = []
    for segment_id, category_id in segments.items():
        isthing, contiguous = MODEL_CATEGORY[category_id]
        segment = {"id": segment_id, "isthing": isthing, "category_id": contiguous}
        segment["area"] = int((ids == segment_id).sum())
        if isthing:
            segment["score"] = 0.9
        info.append(segment)
    return {"panoptic_seg": (torch.as_tensor(ids, dtype=torch.int32), info)}


def model_input(image_id):
    return {"file_name": f"/images/{image_id:012d}.jpg", "image_id": image_id}


def evaluate(name, predictions, output_dir=None):
    """PQ results of predictions {image_id: model output}, one image per process() call."""
    evaluator = SOLOPanopticEvaluator(name, output_dir=output_dir)
    evaluator.reset()
    for image_id, output in predictions.items():
        evaluator.process([model_input(image_id)], [output])
    results = evaluator.evaluate()
    assert list(results) == ["panoptic_seg"] and list(results["panoptic_seg"]) == KEYS
    return results["panoptic_seg"]


# Ground truth used by several tests: person rows 0-4 (50 px), sky rows 5-9 (50 px).
PERSON_SKY = (paint([(0, 4, 1), (5, 9, 2)]), {1: (PERSON, 0), 2: (SKY, 0)})


def test_thing_and_stuff_sq(register):
    name = register([(1, *PERSON_SKY)])
    # person predicted on rows 0-3 (40 px): intersection 40, union 40 + 50 - 40 = 50, IoU 0.8.
    # sky predicted on rows 4-9 (60 px): intersection 50, union 60 + 50 - 50 = 60, IoU 5/6.
    pred = paint([(0, 3, 7), (4, 9, 8)])
    res = evaluate(name, {1: model_output(pred, {7: PERSON, 8: SKY})})
    # person: TP 1 -> SQ 0.8, RQ 1, PQ 0.8 (car has no segment: not averaged). sky: 5/6, 1, 5/6.
    assert res == pytest.approx(expected((0.8, 0.8, 1.0), (5 / 6, 5 / 6, 1.0)), abs=1e-6)


def test_false_positive_and_false_negative(register):
    # person A rows 0-1 (20 px), person B rows 5-6 (20 px), sky rows 2-4 and 7-9 (60 px).
    gt = paint([(0, 1, 1), (2, 4, 3), (5, 6, 2), (7, 9, 3)])
    name = register([(1, gt, {1: (PERSON, 0), 2: (PERSON, 0), 3: (SKY, 0)})])
    # person exactly on A (IoU 1); person B missed (rows 5-6 void); a person on rows 8-9, on
    # ground-truth sky (FP); sky on rows 2-4 and 7 (40 px): union 40 + 60 - 40 = 60, IoU 2/3.
    pred = paint([(0, 1, 1), (2, 4, 5), (7, 7, 5), (8, 9, 2)])
    res = evaluate(name, {1: model_output(pred, {1: PERSON, 2: PERSON, 5: SKY})})
    # person: TP 1, FP 1, FN 1 -> RQ = 1 / (1 + 1/2 + 1/2) = 0.5, SQ 1, PQ 0.5.
    # sky: TP 1 -> SQ 2/3, RQ 1, PQ 2/3. All: PQ 7/12, SQ 5/6, RQ 3/4.
    assert res == pytest.approx(expected((0.5, 1.0, 0.5), (2 / 3, 2 / 3, 1.0)), abs=1e-6)
    assert res["RQ"] == pytest.approx(75.0, abs=1e-6)


@pytest.mark.parametrize("extra_pixel", [False, True])
def test_iou_threshold_is_strict(register, extra_pixel):
    # person rows 0-3 (40 px), sky rows 4-9 (60 px).
    name = register([(1, paint([(0, 3, 1), (4, 9, 2)]), {1: (PERSON, 0), 2: (SKY, 0)})])
    # person predicted on rows 0-1 (20 px), plus pixel (2, 0) or not; the rest of rows 2-3 void.
    pred = paint([(0, 1, 1), (4, 9, 2)], [(2, 0, 1)] if extra_pixel else [])
    res = evaluate(name, {1: model_output(pred, {1: PERSON, 2: SKY})})
    if extra_pixel:
        # intersection 21, union 21 + 40 - 21 = 40: IoU 0.525 > 0.5, a match. sky IoU 1.
        assert res == pytest.approx(expected((0.525, 0.525, 1.0), (1.0, 1.0, 1.0)), abs=1e-6)
    else:
        # intersection 20, union 40: IoU exactly 0.5 is no match -> person FP 1 + FN 1: 0, 0, 0.
        assert res == pytest.approx(expected((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), abs=1e-6)


def test_void_pixels_are_left_out_of_the_union(register):
    # person rows 0-3 (40 px), void rows 4-5, sky rows 6-9 (40 px).
    name = register([(1, paint([(0, 3, 1), (6, 9, 2)]), {1: (PERSON, 0), 2: (SKY, 0)})])
    # person predicted on rows 0-5 (60 px, 20 on void): union 60 + 40 - 40 - 20 = 40, IoU 1.
    pred = paint([(0, 5, 1), (6, 9, 2)])
    res = evaluate(name, {1: model_output(pred, {1: PERSON, 2: SKY})})
    assert res == pytest.approx(expected((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), abs=1e-6)


def test_crowd_and_void_do_not_make_false_positives(register):
    # crowd person rows 0-2 (30 px), void rows 3-4, person rows 5-6 (20 px), sky rows 7-9 (30 px).
    gt = paint([(0, 2, 1), (5, 6, 2), (7, 9, 3)])
    name = register([(1, gt, {1: (PERSON, 1), 2: (PERSON, 0), 3: (SKY, 0)})])
    # person 1: rows 0-1, all on the person crowd region: ignored.
    # person 2: rows 2-3, 10 px crowd + 10 px void: 20/20 > 1/2, ignored.
    # car 3: row 4 (10 px void) + row 9 (10 px sky): exactly half on void, not more: FP.
    # person 4: rows 5-6, IoU 1. sky 5: rows 7-8 (20 px), union 20 + 30 - 20 = 30, IoU 2/3.
    pred = paint([(0, 1, 1), (2, 3, 2), (4, 4, 3), (5, 6, 4), (7, 8, 5), (9, 9, 3)])
    segments = {1: PERSON, 2: PERSON, 3: CAR, 4: PERSON, 5: SKY}
    res = evaluate(name, {1: model_output(pred, segments)})
    # person: TP 1, no FP, and the unmatched crowd region is no FN -> 1, 1, 1.
    # car: FP 1 -> 0, 0, 0. Things (2 categories): PQ 0.5, SQ 0.5, RQ 0.5.
    # sky: 2/3, 2/3, 1. All (3 categories): PQ 5/9, SQ 5/9, RQ 2/3.
    all_ = (5 / 9, 5 / 9, 2 / 3)
    assert res == pytest.approx(expected((0.5, 0.5, 0.5), (2 / 3, 2 / 3, 1.0), all_), abs=1e-6)


def test_stuff_matching(register):
    # sky rows 0-4 (50 px), grass rows 5-9 (50 px); no thing at all.
    gt = paint([(0, 4, 1), (5, 9, 2)])
    name = register([(1, gt, {1: (SKY, 0), 2: (GRASS, 0)})])
    # sky on rows 0-5 (60 px): union 60 + 50 - 50 = 60, IoU 5/6. grass on rows 6-7 (20 px):
    # union 20 + 50 - 20 = 50, IoU 0.4: no match -> grass FP 1 + FN 1. Rows 8-9 void.
    pred = paint([(0, 5, 1), (6, 7, 2)])
    res = evaluate(name, {1: model_output(pred, {1: SKY, 2: GRASS})})
    # sky: 5/6, 5/6, 1; grass: 0, 0, 0 -> Stuff = All: PQ 5/12, SQ 5/12, RQ 1/2.
    # Things: no thing segment in ground truth or prediction -> reported 0 (panopticapi's own
    # pq_compute would divide by zero here).
    stuff = (5 / 12, 5 / 12, 0.5)
    assert res == pytest.approx(expected((0.0, 0.0, 0.0), stuff, stuff), abs=1e-6)


def test_no_predicted_segment_gives_zero(register, tmp_path):
    name = register([(1, *PERSON_SKY), (2, *PERSON_SKY)])
    empty = {"panoptic_seg": (torch.zeros(SIZE, SIZE, dtype=torch.int32), [])}
    out = tmp_path / "out"
    res = evaluate(name, {1: empty, 2: empty}, str(out))
    # every ground-truth segment is a FN: PQ = SQ = RQ = 0 for person and sky, no NaN.
    assert res == pytest.approx(dict.fromkeys(KEYS, 0.0), abs=1e-6)
    written = json.loads((out / "evaluation_results.json").read_text())
    assert written == {"panoptic_seg": dict.fromkeys(KEYS, 0.0)}


def test_dataset_without_stuff_category_has_null_stuff_metrics(register, tmp_path):
    things_only = [c for c in CATEGORIES if c["isthing"]]
    name = register([(1, paint([(0, 4, 1)]), {1: (PERSON, 0)})], categories=things_only)
    out = tmp_path / "out"
    res = evaluate(name, {1: model_output(paint([(0, 4, 1)]), {1: PERSON})}, str(out))
    assert res["PQ"] == res["PQ_th"] == pytest.approx(100.0, abs=1e-6)
    assert all(math.isnan(res[k]) for k in ("PQ_st", "SQ_st", "RQ_st"))
    written = json.loads((out / "evaluation_results.json").read_text())["panoptic_seg"]
    assert written["PQ_st"] is None and written["PQ"] == pytest.approx(100.0, abs=1e-6)


def test_subset_dataset_evaluates_only_its_images(register, tmp_path):
    # images 1 and 3 registered (image 2 left out, e.g. a data fault); image 2's prediction is
    # all wrong (a car everywhere) and must not count.
    images = [(1, *PERSON_SKY), (2, *PERSON_SKY), (3, *PERSON_SKY)]
    name = register(images, dataset_ids={1, 3})
    perfect = model_output(PERSON_SKY[0], {1: PERSON, 2: SKY})
    # image 3: person on rows 0-3 (IoU 0.8 as in test_thing_and_stuff_sq), row 4 void, sky on
    # rows 5-9 (IoU 1).
    image3 = model_output(paint([(0, 3, 1), (5, 9, 2)]), {1: PERSON, 2: SKY})
    wrong = model_output(paint([(0, 9, 1)]), {1: CAR})
    out = tmp_path / "out"
    res = evaluate(name, {1: perfect, 2: wrong, 3: image3}, str(out))
    # person: TP 2, IoU 1 + 0.8 -> SQ 0.9, RQ 1, PQ 0.9. sky: TP 2, IoU 2 -> 1, 1, 1.
    assert res == pytest.approx(expected((0.9, 0.9, 1.0), (1.0, 1.0, 1.0)), abs=1e-6)
    predictions = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in predictions["annotations"]] == [1, 3]
    assert [im["id"] for im in predictions["images"]] == [1, 3]


def test_missing_prediction_is_an_error(register):
    name = register([(1, *PERSON_SKY), (2, *PERSON_SKY)])
    with pytest.raises(ValueError, match=r"no prediction for 1 of the dataset's 2 images.*\[2\]"):
        evaluate(name, {1: model_output(PERSON_SKY[0], {1: PERSON, 2: SKY})})


def test_missing_panopticapi_message(register, monkeypatch):
    name = register([(1, *PERSON_SKY)])
    for module in ("panopticapi", "panopticapi.evaluation", "panopticapi.utils"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ImportError) as info:
        SOLOPanopticEvaluator(name)
    message = str(info.value)
    assert "\n" not in message
    assert "panopticapi-lite" in message and "make test" in message
    assert "tools/setup_env.py" in message


def test_result_files_are_replaced_atomically(register, tmp_path, monkeypatch):
    name = register([(1, *PERSON_SKY)])
    out = tmp_path / "out"
    output = model_output(PERSON_SKY[0], {1: PERSON, 2: SKY})
    # the model's scalars may be tensors / numpy numbers: the JSON file still gets written.
    output["panoptic_seg"][1][0].update(score=torch.tensor(0.75), area=np.int64(50))
    evaluate(name, {1: output}, str(out))
    assert sorted(os.listdir(out)) == ["evaluation_results.json", "predictions.json"]
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert json.loads(before["evaluation_results.json"])["panoptic_seg"]["PQ"] == 100.0
    person = json.loads(before["predictions.json"])["annotations"][0]["segments_info"][0]
    assert person == {"id": 1, "category_id": PERSON, "area": 50, "score": 0.75}
    # the model's own segments_info is left as it was (detectron2's process() pops "isthing").
    assert output["panoptic_seg"][1][0]["isthing"] is True

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during evaluation")

    monkeypatch.setattr(pe, "_accumulate_pq_stats", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate(name, {1: model_output(paint([]), {})}, str(out))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # no partial files


def test_distributed_evaluation_gathers_to_the_main_process(register, tmp_path, monkeypatch):
    name = register([(1, *PERSON_SKY), (2, *PERSON_SKY)])
    workers = [SOLOPanopticEvaluator(name, str(tmp_path / "out")) for _ in range(2)]
    outputs = {
        1: model_output(PERSON_SKY[0], {1: PERSON, 2: SKY}),  # worker 0: all IoU 1
        2: model_output(paint([(0, 3, 1), (5, 9, 2)]), {1: PERSON, 2: SKY}),  # worker 1: 0.8, 1
    }
    for worker, (image_id, output) in zip(workers, outputs.items()):
        worker.reset()
        worker.process([model_input(image_id)], [output])
    monkeypatch.setattr(pe.comm, "synchronize", lambda: None)
    monkeypatch.setattr(pe.comm, "gather", lambda data, dst=0: [])
    monkeypatch.setattr(pe.comm, "is_main_process", lambda: False)
    assert workers[1].evaluate() is None
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    monkeypatch.setattr(pe.comm, "gather", lambda data, dst=0: [w._predictions for w in workers])
    monkeypatch.setattr(pe.comm, "is_main_process", lambda: True)
    res = workers[0].evaluate()["panoptic_seg"]
    # person: IoU 1 + 0.8 over 2 TP -> SQ 0.9, PQ 0.9; sky: 1.
    assert res == pytest.approx(expected((0.9, 0.9, 1.0), (1.0, 1.0, 1.0)), abs=1e-6)


# panopticapi's pq_compute leaves its multiprocessing pool open (collected below, in this test).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_same_numbers_as_panopticapi_pq_compute(register, tmp_path):
    """The evaluator counts with panopticapi's per-image matching: its numbers are those of
    panopticapi's own pq_compute on the same files (a case where pq_compute does not fail)."""
    pq_compute = pytest.importorskip("panopticapi.evaluation").pq_compute
    gt = paint([(0, 2, 1), (5, 6, 2), (7, 9, 3)])  # the crowd / void case
    name = register([(1, gt, {1: (PERSON, 1), 2: (PERSON, 0), 3: (SKY, 0)})])
    pred = paint([(0, 1, 1), (2, 3, 2), (4, 4, 3), (5, 6, 4), (7, 8, 5), (9, 9, 3)])
    segments = {1: PERSON, 2: PERSON, 3: CAR, 4: PERSON, 5: SKY}
    out = tmp_path / "out"
    res = evaluate(name, {1: model_output(pred, segments)}, str(out))
    pred_folder = tmp_path / "pred_png"
    pred_folder.mkdir()
    Image.fromarray(id2rgb(pred)).save(pred_folder / f"{1:012d}.png")
    metadata = MetadataCatalog.get(name)
    reference = pq_compute(
        metadata.panoptic_json,
        str(out / "predictions.json"),
        gt_folder=metadata.panoptic_root,
        pred_folder=str(pred_folder),
    )
    gc.collect()
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
            assert res[metric.upper() + suffix] == pytest.approx(
                100 * reference[group][metric], abs=1e-9
            )


# The things' instance AP beside PQ: SOLOCOCOEvaluator on a panoptic dataset, whose ground truth
# is the thing segments of the panoptic PNGs (panoptic_things_coco).


def instances_output(masks, classes, scores):
    """A model's "instances" output: masks [(H, W) bool], contiguous thing classes, scores."""
    masks = torch.as_tensor(np.stack(masks))
    ys, xs = masks.any(2), masks.any(1)
    boxes = [
        [x.nonzero().min(), y.nonzero().min(), x.nonzero().max() + 1, y.nonzero().max() + 1]
        for x, y in zip(xs, ys)
    ]
    instances = Instances((SIZE, SIZE))
    instances.pred_masks = masks
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.pred_classes = torch.tensor(classes)
    instances.scores = torch.tensor(scores)
    return {"instances": instances}


def test_things_of_the_panoptic_ground_truth_as_coco_instances(register):
    # person rows 0-4 (segment 1), a crowd of cars rows 5-6 (segment 3), sky rows 7-9 (segment 2)
    ids = paint([(0, 4, 1), (5, 6, 3), (7, 9, 2)])
    name = register([(7, ids, {1: (PERSON, 0), 2: (SKY, 0), 3: (CAR, 1)})])
    coco = panoptic_things_coco(name)
    assert [c["id"] for c in coco["categories"]] == [PERSON, CAR]  # no stuff category
    assert [im["id"] for im in coco["images"]] == [7]
    person, cars = coco["annotations"]  # sky is no instance
    assert (person["category_id"], person["iscrowd"], person["area"]) == (PERSON, 0, 50)
    assert person["bbox"] == [0, 0, 10, 5]  # x, y, w, h
    assert (cars["category_id"], cars["iscrowd"], cars["area"], cars["bbox"]) == (
        CAR, 1, 20, [0, 5, 10, 2]
    )  # fmt: skip
    assert np.array_equal(mask_util.decode(person["segmentation"]).astype(bool), ids == 1)
    assert len({a["id"] for a in coco["annotations"]}) == 2


def test_panoptic_dataset_things_mask_and_box_ap(register, tmp_path):
    """One person (rows 0-4, 50 px); predicted rows 0-3 x columns 0-8 (36 px, inside it): mask
    IoU 36 / 50 = 0.72 and box IoU (9 x 4) / (10 x 5) = 0.72, a match at the IoU thresholds
    0.5-0.7 (5 of COCO's 10): AP 50, AP50 100, AP75 0."""
    name = register([(1, *PERSON_SKY)])
    evaluator = SOLOCOCOEvaluator(
        name,
        ("segm", "bbox"),
        output_dir=str(tmp_path / "things"),
        ground_truth=panoptic_things_coco,
    )  # as the panoptic dataset kind builds it
    mask = paint([(0, 3, 1)]) == 1
    mask[:, 9] = False
    evaluator.reset()
    evaluator.process([model_input(1)], [instances_output([mask], [0], [0.9])])
    results = evaluator.evaluate()
    for task in ("segm", "bbox"):
        assert results[task]["AP"] == pytest.approx(50.0, abs=1e-6)
        assert results[task]["AP50"] == pytest.approx(100.0, abs=1e-6)
        assert results[task]["AP75"] == pytest.approx(0.0, abs=1e-6)
    written = json.loads((tmp_path / "things" / "evaluation_results.json").read_text())
    assert written["segm"]["AP50"] == pytest.approx(100.0, abs=1e-6)
    gt = json.loads((tmp_path / "things" / f"{name}_coco_format.json").read_text())
    assert [a["category_id"] for a in gt["annotations"]] == [PERSON]


def test_things_ground_truth_errors_name_the_file(register, tmp_path):
    name = register([(1, *PERSON_SKY)])
    png = os.path.join(MetadataCatalog.get(name).panoptic_root, f"{1:012d}.png")
    os.remove(png)
    with pytest.raises(BadImageError, match=f"image {png}: panoptic PNG does not exist"):
        panoptic_things_coco(name)
    other = register([(1, *PERSON_SKY)])
    extra = {"file_name": "x.jpg", "image_id": 5, "height": SIZE, "width": SIZE}
    dicts = DatasetCatalog.get(other) + [extra]
    DatasetCatalog.remove(other)
    DatasetCatalog.register(other, lambda: dicts)
    with pytest.raises(
        DatasetError, match=r"no image entry or annotation for 1 of the 2 images.*\[5\]"
    ):
        panoptic_things_coco(other)
