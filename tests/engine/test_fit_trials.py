"""The fit's trial stage (solo_d2.engine.fit_trials, tools/analyze_dataset.py --trials): the
deterministic held-out split, the candidates (the start always first), the choice following the
metric, failed candidates reported and skipped, and tiny trainings end to end (COCO, panoptic)."""

import json
import math
import random

import pytest
from conftest import REPO, TINY_OPTS, load_script, solo_cfg, write_tiny_panoptic
from detectron2.data import DatasetCatalog, MetadataCatalog

from solo_d2.data.shapes import generate_shapes
from solo_d2.engine.cli import register_dataset
from solo_d2.engine.fit_trials import (
    THRESH_KEY,
    Candidate,
    TrialResult,
    candidate_values,
    choose,
    evaluation_results,
    format_trials,
    holdout_split,
    run_trials,
    split_dataset,
    start_noise,
    trial_candidates,
    trial_config,
    trial_metric,
    trials_record,
)
from solo_d2.kinds import get_kind
from solo_d2.visualization.dataset_fit import ConfigFit, fit_config

QUICKSTART = "SOLOv2_R18_quickstart_shapes.yaml"
analyze_dataset = load_script(REPO / "tools" / "analyze_dataset.py", "analyze_dataset_trials")


def test_holdout_split_is_deterministic_and_order_free():
    keys = [f"img{i:03d}.jpg#{i}" for i in range(50)]
    train, val = holdout_split(keys, 0.2)
    assert len(val) == 10 and len(train) == 40 and sorted(train + val) == list(range(50))
    assert holdout_split(keys, 0.2) == (train, val)  # same call, same split
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    _, val2 = holdout_split(shuffled, 0.2)
    assert {shuffled[i] for i in val2} == {keys[i] for i in val}  # the same images held out
    # at least one image on each side
    assert holdout_split(["a", "b"], 0.01)[1] != [] and holdout_split(["a", "b"], 0.99)[0] != []
    with pytest.raises(ValueError, match="at least 2 images"):
        holdout_split(["only"], 0.2)


def result(name, metric, error=None):
    return TrialResult(name, name, {}, "mask AP", metric, 1.0, error)


def test_choice_follows_the_metric_and_keeps_the_start_within_the_noise():
    start, fit, other = result("start", 20.0), result("fit", 25.0), result("fit_x", 22.0)
    assert choose([start, fit, other], margin=0.5) is fit
    assert choose([start, result("fit", 20.4)], margin=0.5) is start  # within the margin
    assert choose([start, result("fit", 20.4)], margin=0.0).candidate == "fit"
    assert choose([start, result("fit", 12.0)]) is start  # a worse fit is never written
    # the start trained with another seed: the noise is their difference (4), its level the mean
    noisy = [start, result("start_reseeded", 16.0), result("fit", 21.9)]
    assert start_noise(noisy) == (18.0, 4.0)
    assert choose(noisy, margin=0.5) is start  # 21.9 <= 18 + 4
    assert choose(noisy[:2] + [result("fit", 22.1)], margin=0.5).candidate == "fit"
    # the reseeded start is never chosen, even when it scores best
    assert choose([start, result("start_reseeded", 30.0), result("fit", 21.0)]) is start
    # a failed candidate is never chosen, whatever its number
    failed = result("fit", None, error="ConfigError: bad")
    assert choose([start, failed]) is start
    # without a start that trained, the best of the others
    assert choose([result("start", None, "RuntimeError: x"), fit, other]) is fit
    with pytest.raises(ValueError, match="every trial failed.*start: RuntimeError: x"):
        choose([result("start", None, "RuntimeError: x")])


def test_trial_metric_follows_the_dataset_kind():
    res = {"segm": {"AP": 31.5}, "bbox": {"AP": 20.0}, "panoptic_seg": {"PQ": 44.0}}
    assert trial_metric(res, get_kind("coco")) == ("mask AP", 31.5)
    assert trial_metric(res, get_kind("lvis")) == ("LVIS mask AP", 31.5)
    assert trial_metric(res, get_kind("panoptic")) == ("PQ", 44.0)
    assert trial_metric({"segm": {"AP": math.nan}}, get_kind("coco")) == (
        "mask AP",
        0.0,
    )  # no detection
    assert trial_metric({}, get_kind("coco")) == ("mask AP", 0.0)


def test_the_metric_is_the_last_evaluation_in_the_trainers_storage():
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        storage.put_scalars(total_loss=2.0, lr=0.1)
        storage.put_scalars(**{"segm/AP": 16.2, "bbox/AP": 11.8, "panoptic_seg/PQ": 40.0},
                            smoothing_hint=False)  # fmt: skip
        results = evaluation_results(storage)
    assert results == {"segm": {"AP": 16.2}, "bbox": {"AP": 11.8}, "panoptic_seg": {"PQ": 40.0}}
    assert trial_metric(results, get_kind("coco")) == ("mask AP", 16.2)


def square_dicts(n_images=4):
    return [
        {"height": 320, "width": 384, "annotations": [
            {"bbox": [40 + 30 * k, 40, 60, 60], "bbox_mode": 1, "category_id": k % 2,
             "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]} for k in range(3)]}  # fmt: skip
        for _ in range(n_images)
    ]


def test_candidates_start_first_without_repeats_and_trial_configs():
    cfg = solo_cfg(QUICKSTART, ["SOLVER.IMS_PER_BATCH", 2])
    fit = fit_config(cfg, square_dicts(), ["a", "b"], base_config="base.yaml", dataset_name="sq")
    fit.set("SOLVER.IMS_PER_BATCH", 2, "from --opts")
    candidates = trial_candidates(cfg, fit, opts_keys=["SOLVER.IMS_PER_BATCH"])
    names = [c.name for c in candidates]
    assert names[:2] == ["start", "start_reseeded"] and "fit" in names
    # the reseeded start: the start's values, the next seed
    assert candidates[1].fit.changes["SEED"][0] == 1 and "SEED" not in candidates[0].fit.changes
    assert candidate_values(cfg, candidates[1].fit) == candidate_values(cfg, candidates[0].fit)
    candidates = [candidates[0]] + candidates[2:]
    # the start: the base config with only the dataset's keys and the user's --opts
    assert set(candidates[0].fit.changes) == {
        "DATASETS.TRAIN", "DATASETS.TEST", "MODEL.SOLO.NUM_CLASSES", "SOLVER.IMS_PER_BATCH"
    }  # fmt: skip
    assert candidate_values(cfg, candidates[0].fit)["MODEL.SOLO.NUM_GRIDS"] == [16, 12, 8, 6, 4]
    values = [json.dumps(candidate_values(cfg, c.fit)) for c in candidates]
    assert len(set(values)) == len(values)  # no candidate trained twice
    full = next(c for c in candidates if c.name == "fit")
    assert full.fit.changes.keys() == fit.changes.keys()

    out = trial_config(cfg, full, "tr", "va", 7, "/tmp/trials")
    assert out.DATASETS.TRAIN == ("tr",) and out.DATASETS.TEST == ("va",)
    assert out.SOLVER.MAX_ITER == 7 and out.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR"
    assert out.SOLVER.WARMUP_ITERS == 1 and out.TEST.EVAL_PERIOD == 0 and out.SEED == 0
    assert out.OUTPUT_DIR == "/tmp/trials/fit" and out.SOLVER.IMS_PER_BATCH == 2
    assert list(out.MODEL.SOLO.NUM_GRIDS) == fit.changes["MODEL.SOLO.NUM_GRIDS"][0]


def shapes_spec(tmp_path, n=10):
    json_file = generate_shapes(str(tmp_path / "shapes"), "train", n, seed=5, max_size=192)
    return f"{json_file}:{tmp_path / 'shapes' / 'train'}"


@pytest.mark.e2e
def test_trials_end_to_end_write_the_chosen_config_and_the_table(tmp_path, capsys):
    spec = "trial_shapes=" + shapes_spec(tmp_path)
    out = tmp_path / "fit.yaml"
    argv = ["--config-file", str(REPO / "configs" / QUICKSTART), "--dataset", spec, "--fit",
            str(out), "--trials", "2", "--output", str(tmp_path / "report"), "--opts",
            *TINY_OPTS]  # fmt: skip
    assert analyze_dataset.main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "the held-out validation split has 2 images" in captured.err  # noisy: said so
    record = json.loads((tmp_path / "fit.trials.json").read_text())
    trials = record["trials"]
    assert [t["candidate"] for t in trials[:3]] == ["start", "start_reseeded", "fit"]
    assert record["noise"] == pytest.approx(abs(trials[0]["metric"] - trials[1]["metric"]))
    assert record["held_out"] and record["iterations"] == 2
    assert all(t["error"] is None and t["metric_name"] == "mask AP" for t in trials)
    top = max(trials[2:], key=lambda t: t["metric"])
    bar = record["start_metric"] + max(record["margin"], record["noise"])
    assert record["chosen"] == ("start" if top["metric"] <= bar else top["candidate"])
    # the YAML: its comments hold the table, its values are the chosen candidate's
    text = out.read_text()
    assert "# trials: 2 iterations each" in text and f"chosen: {record['chosen']!r}" in text
    for t in trials:
        assert f"{t['candidate']}: mask AP" in text
    chosen_yaml = (tmp_path / "fit_trials" / f"{record['chosen']}.yaml").read_text()
    after_base = lambda t: t.split("_BASE_")[1].split("\n", 1)[1]  # noqa: E731 (paths differ)
    assert after_base(text) == after_base(chosen_yaml)
    assert "checked by" in printed and "without a grid cell of their own" in printed
    # the held-out split: 2 of the 10 images, the same ones when split again
    val = json.loads((tmp_path / "fit_trials" / "split" / "trial_shapes_val.json").read_text())
    assert len(val["images"]) == 2
    again = split_dataset("trial_shapes", str(tmp_path / "again"))
    assert len(DatasetCatalog.get(again[1])) == 2
    val2 = json.loads((tmp_path / "again" / "trial_shapes_val.json").read_text())
    assert val2["images"] == val["images"]


@pytest.mark.e2e
def test_a_candidate_that_fails_to_train_is_reported_and_skipped(tmp_path):
    name = register_dataset("trial_fail=" + shapes_spec(tmp_path, n=6))
    train, val = split_dataset(name, str(tmp_path / "split"))
    cfg = solo_cfg(QUICKSTART, TINY_OPTS)
    start = ConfigFit("base.yaml", name)
    start.set("MODEL.SOLO.NUM_CLASSES", 4, "classes")
    bad = ConfigFit("base.yaml", name)
    bad.set("MODEL.SOLO.NUM_GRIDS", [12, 10], "a grid list of the wrong length")
    lines = []
    candidates = [Candidate("start", "start", start), Candidate("broken", "broken", bad)]
    results = run_trials(cfg, candidates, train, val, 1, str(tmp_path / "trials"), lines.append)
    assert results[0].error is None and results[0].metric is not None
    # the metric is the evaluation's own number (its results file)
    evaluated = tmp_path / "trials" / "start" / "inference" / val / "evaluation_results.json"
    assert json.loads(evaluated.read_text())["segm"]["AP"] == pytest.approx(results[0].metric)
    assert results[1].metric is None and "NUM_GRIDS" in results[1].error
    assert any("'broken' failed" in line and "skipped" in line for line in lines)
    assert choose(results).candidate == "start"
    # trials are seeded (SEED): the same candidate trains the same; another seed differently
    again = Candidate("again", "start again", start)
    reseeded = ConfigFit("base.yaml", name)
    reseeded.set("MODEL.SOLO.NUM_CLASSES", 4, "classes")
    reseeded.set("SEED", 1, "another seed")
    other = Candidate("other", "another seed", reseeded)
    run_trials(cfg, [again, other], train, val, 1, str(tmp_path / "trials"), lines.append)
    losses = {}
    for c in ("start", "again", "other"):
        records = (tmp_path / "trials" / c / "metrics.json").read_text().splitlines()
        losses[c] = [json.loads(r)["total_loss"] for r in records if "total_loss" in r]
    assert losses["start"] == losses["again"] and losses["start"]
    assert losses["start"] != losses["other"]
    table = "\n".join(format_trials(results, results[0], 1))
    assert "broken: FAILED (" in table
    json.dumps(trials_record(results, results[0], dataset=name))  # the JSON beside the YAML
    assert not list((tmp_path / "trials").rglob("model_*.pth"))  # trials leave no weights behind


@pytest.mark.e2e
def test_panoptic_trials_choose_the_paste_threshold_by_pq(tmp_path):
    spec = "trial_pan=panoptic:" + ":".join(write_tiny_panoptic(tmp_path, num_images=5))
    name = register_dataset(spec)
    train, val = split_dataset(name, str(tmp_path / "split"))
    assert len(DatasetCatalog.get(val)) == 1 and len(DatasetCatalog.get(train)) == 4
    opts = TINY_OPTS + ["MODEL.SOLO.PANOPTIC.CHANNELS", "32", "MODEL.SOLO.NUM_CLASSES", "2",
                        "MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES", "2", "INPUT.MIN_SIZE_TEST", "64",
                        "INPUT.MIN_SIZE_TRAIN", "(64,)"]  # fmt: skip
    cfg = solo_cfg("SOLOv2_R18_quickstart_panoptic_shapes.yaml", opts)
    start = Candidate("start", "start", ConfigFit("base.yaml", name))
    (res,) = run_trials(cfg, [start], train, val, 1, str(tmp_path / "trials"), lambda _: None)
    assert res.error is None and res.metric_name == "PQ"
    assert list(res.thresholds) == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    assert res.metric == max(res.thresholds.values())
    best = max(res.thresholds, key=res.thresholds.get)
    assert start.fit.changes[THRESH_KEY][0] == float(best)


def test_lvis_and_panoptic_files_are_split_by_image(tmp_path):
    """The held-out split rewrites the dataset's own file, whatever its kind, and registers both
    parts as specs of that kind (LVIS keeps its per-image category lists; panoptic its PNGs)."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "lvis_images"
    images.mkdir()
    data = {"images": [], "annotations": [], "categories": [
        {"id": 3, "name": "thing", "frequency": "f", "synonyms": ["thing"]}]}  # fmt: skip
    for i in range(1, 6):
        Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(images / f"{i}.png")
        data["images"].append(
            {
                "id": i,
                "file_name": f"{i}.png",
                "height": 40,
                "width": 48,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [3],
            }
        )
        data["annotations"].append({"id": i, "image_id": i, "category_id": 3, "area": 100,
                                    "bbox": [2, 2, 10, 10],
                                    "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})  # fmt: skip
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    name = register_dataset(f"trial_lvis=lvis:{tmp_path / 'lvis.json'}:{images}")
    train, val = split_dataset(name, str(tmp_path / "split"))
    assert MetadataCatalog.get(val).evaluator_type == "lvis"
    parts = [json.loads((tmp_path / "split" / f"trial_lvis_{s}.json").read_text())
             for s in ("train", "val")]  # fmt: skip
    assert [len(p["images"]) for p in parts] == [4, 1]
    assert sorted(a["image_id"] for p in parts for a in p["annotations"]) == [1, 2, 3, 4, 5]
    assert parts[1]["images"][0]["not_exhaustive_category_ids"] == [3]
    # a trial on it is evaluated with LVIS's AP
    cfg = solo_cfg(QUICKSTART, TINY_OPTS + ["MODEL.SOLO.NUM_CLASSES", "1"])
    start = Candidate("start", "start", ConfigFit("base.yaml", name))
    (res,) = run_trials(cfg, [start], train, val, 1, str(tmp_path / "trials"), lambda _: None)
    assert res.error is None and res.metric_name == "LVIS mask AP" and res.metric >= 0

    spec = "trial_pan2=panoptic:" + ":".join(write_tiny_panoptic(tmp_path / "pan", num_images=5))
    train, val = split_dataset(register_dataset(spec), str(tmp_path / "split2"))
    assert MetadataCatalog.get(val).evaluator_type == "coco_panoptic_seg"
    assert len(DatasetCatalog.get(train)) == 4 and len(DatasetCatalog.get(val)) == 1

    with pytest.raises(ValueError, match="no annotation file on record.*--val-dataset"):
        DatasetCatalog.register("trial_nofile", lambda: [])
        split_dataset("trial_nofile", str(tmp_path / "split3"))


def test_with_fit_model_the_candidates_keep_the_fitted_levels():
    """--fit-model drops levels: the base's per-level ranges no longer fit them, so no
    fit_base_levels candidate; the finer grids follow the kept levels."""
    cfg = solo_cfg(QUICKSTART)
    fit = fit_config(
        cfg, square_dicts(), ["a", "b"], base_config="b.yaml", dataset_name="sq", fit_model=True
    )
    kept = fit.changes["MODEL.SOLO.INSTANCE_IN_FEATURES"][0]
    candidates = trial_candidates(cfg, fit)
    assert [c.name for c in candidates] == ["start", "start_reseeded", "fit", "fit_finer_grids"]
    for c in candidates[2:]:
        out = trial_config(cfg, c, "tr", "va", 5, "/tmp/trials")
        assert len(out.MODEL.SOLO.NUM_GRIDS) == len(kept) == len(out.MODEL.SOLO.FPN_SCALE_RANGES)
