#!/usr/bin/env python3
"""Quickstart: train SOLOv2 on the synthetic shapes dataset on CPU, evaluate, run the demo.

    make quickstart            # sets up .venv/, then runs this
    .venv/bin/python tools/quickstart.py [--output-dir DIR] [--fresh] [KEY VALUE ...]

Writes to ``output/quickstart/`` (or --output-dir): the model (``model_final.pth``), detectron2's
``metrics.json`` (losses per iteration), ``quickstart_results.json`` (COCO mask and box AP on
``shapes_val``), ``loss_curve.png`` and ``per_class_ap_shapes_val.png`` (docs/visualization.md)
and ``demo/`` (visualisations + per-image instance JSON).
A second run resumes from the last checkpoint instead of training again; ``--fresh`` retrains.
"""

import argparse
import json
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "SOLOv2_R18_quickstart_shapes.yaml"
DEMO_CONFIDENCE = 0.3  # demo/demo.py --confidence-threshold for the validation visualisations


def loss_curve(metrics_file: Path, out_png: Path):
    """Write the loss curve (solo_d2.visualization.training_plots, as training does with
    TEST.SAVE_PLOTS) and return [(iter, total_loss)] for the log."""
    from solo_d2.visualization.training_plots import plot_loss_curve

    return plot_loss_curve(str(metrics_file), str(out_png)).get("total_loss", [])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(ROOT / "output" / "quickstart"))
    parser.add_argument("--fresh", action="store_true", help="delete earlier results and retrain")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)

    subprocess.run([sys.executable, "-m", "solo_d2.env"], check=True)
    start = time.perf_counter()
    from detectron2.data import MetadataCatalog

    # train_net.py is a script, not a module: its functions, without running its command line
    train_net = runpy.run_path(str(ROOT / "train_net.py"), run_name="solo_train_net")
    train_args = train_net["get_parser"]().parse_args(
        ["--config-file", str(CONFIG), "--resume", "OUTPUT_DIR", str(out), *args.opts]
    )
    results = train_net["main"](train_args)
    if not results:  # already trained to MAX_ITER by an earlier run: evaluate only
        train_args.eval_only = True
        train_args.opts += ["MODEL.WEIGHTS", str(out / "model_final.pth")]
        results = train_net["main"](train_args)
    train_s = time.perf_counter() - start

    demo_dir = out / "demo"
    # registered by train_net: ./datasets/shapes/val, or under $SOLO_D2_DATASETS
    val_images = MetadataCatalog.get("shapes_val").image_root
    demo_cmd = [
        sys.executable, str(ROOT / "demo" / "demo.py"), "--config-file", str(CONFIG),
        "--input", str(val_images), "--output", str(demo_dir), "--json",
        # SOLO scores are category x maskness: the quickstart model's true detections score
        # ~0.3-0.9, so the demo's default 0.5 would hide a third of them
        "--confidence-threshold", str(DEMO_CONFIDENCE),
        "--opts", "MODEL.WEIGHTS", str(out / "model_final.pth"), *args.opts,
    ]  # fmt: skip
    print("demo:", shlex.join(demo_cmd), flush=True)
    subprocess.run(demo_cmd, check=True)

    curve = loss_curve(out / "metrics.json", out / "loss_curve.png")
    summary = {
        "segm_AP": results["segm"]["AP"],
        "bbox_AP": results["bbox"]["AP"],
        "results": results,
        "train_and_eval_seconds": round(train_s, 1),
        "loss_curve": curve,
    }
    (out / "quickstart_results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nshapes_val mask AP {summary['segm_AP']:.1f}, box AP {summary['bbox_AP']:.1f}")
    if curve:
        print(
            "total loss: "
            + ", ".join(f"it {i}: {v:.2f}" for i, v in curve[:: max(1, len(curve) // 6)])
        )
    print(f"train + eval {train_s:.0f} s; results, loss_curve.png and demo/ in {out}")


if __name__ == "__main__":
    main()
