"""Scores of a trained model's matched and unmatched detections, and the panoptic paste threshold
they call for (docs/your_data.md, "Panoptic paste threshold").

    python -m dev.score_distribution \
        --run vga_crowd=GT.json:OUTPUT_DIR/inference/NAME/coco_instances_results.json [--run ...]

A detection is matched when COCO's evaluation matches it to a ground-truth instance of its class
at mask IoU >= 0.5 (pycocotools, segm, up to 100 detections per image). Panoptic quality of the
things is SQ x RQ, and RQ = TP / (TP + FP / 2 + FN / 2) is the F1 score of the instances kept: the
paste threshold ``MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH`` t keeps the detections scoring
>= t, so RQ(t) from the matched (TP) and unmatched (FP) scores and the ground truth left over (FN)
tells which t serves PQ (the panoptic merge also drops instances covered by higher-scored ones,
which only lowers FP further). Prints, per run, the score quantiles of both groups and RQ at each
threshold of ``THRESHOLDS``.
"""

import argparse
import contextlib
import io
import json
from typing import Dict, List, Tuple

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05)


def matched_scores(gt_json: str, results_json: str) -> Tuple[np.ndarray, np.ndarray, int]:
    """(scores of matched detections, scores of unmatched ones, number of ground-truth objects)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        results = json.load(open(results_json))
        dt = gt.loadRes(results) if results else COCO()
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
    matched, unmatched, num_gt = [], [], 0
    all_area = ev.params.areaRng[0]
    for e in ev.evalImgs:
        if e is None or e["aRng"] != all_area:
            continue
        ignore = np.asarray(e["dtIgnore"][0], dtype=bool)
        hit = np.asarray(e["dtMatches"][0]) > 0  # IoU 0.5
        scores = np.asarray(e["dtScores"])
        matched += list(scores[hit & ~ignore])
        unmatched += list(scores[~hit & ~ignore])
        num_gt += int((~np.asarray(e["gtIgnore"], dtype=bool)).sum())
    return np.array(matched), np.array(unmatched), num_gt


def recognition_quality(matched: np.ndarray, unmatched: np.ndarray, num_gt: int) -> Dict:
    """RQ (F1) at each threshold of THRESHOLDS."""
    out = {}
    for t in THRESHOLDS:
        tp, fp = int((matched >= t).sum()), int((unmatched >= t).sum())
        fn = num_gt - tp
        out[t] = tp / max(tp + fp / 2 + fn / 2, 1e-9)
    return out


def _q(x: np.ndarray) -> str:
    if len(x) == 0:
        return "none"
    return "/".join(f"{v:.2f}" for v in np.percentile(x, [10, 50, 90]))


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=GT:RESULTS")
    args = parser.parse_args(argv)
    head = " | ".join(f"RQ@{t:g}" for t in THRESHOLDS)
    print(f"| run | matched p10/p50/p90 | unmatched p10/p50/p90 | matched < 0.5 | {head} | best |")
    print("|---" * (len(THRESHOLDS) + 5) + "|")
    for run in args.run:
        name, files = run.split("=", 1)
        gt_json, results_json = files.split(":", 1)
        matched, unmatched, num_gt = matched_scores(gt_json, results_json)
        rq = recognition_quality(matched, unmatched, num_gt)
        best = max(rq, key=rq.get)
        below = f"{100 * (matched < 0.5).mean():.0f}%" if len(matched) else "-"
        cells = " | ".join(f"{100 * v:.1f}" for v in rq.values())
        print(f"| {name} | {_q(matched)} | {_q(unmatched)} | {below} | {cells} | {best:g} |")


if __name__ == "__main__":
    main()
