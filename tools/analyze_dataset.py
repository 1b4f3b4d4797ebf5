#!/usr/bin/env python3
"""Check how a dataset's objects fit a config's FPN levels, scale ranges and grids.

    python tools/analyze_dataset.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --dataset shapes_train
    python tools/analyze_dataset.py --config-file configs/SOLOv2_R50_3x.yaml \
        --dataset mydata=annotations.json:images/ --output output/mydata_report

--dataset is a registered name (the shapes datasets, detectron2's builtin ones on disk) or a spec
of train_net.py --dataset's forms: NAME=ANNOTATIONS.json:IMAGE_DIR (COCO),
NAME=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR or NAME=lvis:ANNOTATIONS.json:IMAGE_DIR.
Prints image sizes, instances per image and per class, and where the objects go after the
config's train and test resizes (per level, below / above / between the ranges, sharing a centre
cell), then plain-language warnings naming the config keys to change. Writes report.json and
scale_histogram.png into --output (default output/dataset_report/<name>).

--fit OUT.yaml also writes a config fitted to the dataset (resizes, scale ranges, grids, class
count, and where the data calls for it SIGMA and the detections per image; each value with the
statistic it came from, solo_d2/visualization/dataset_fit.py) that inherits --config-file, and
prints what it changes and where the objects go with it. It keeps the architecture; --fit-model
also drops the outer levels that receive no objects:

    python tools/analyze_dataset.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --dataset mydata=annotations.json:images/ --fit output/mydata.yaml

--fit also counts the objects lost to shared grid cells (every cell of their centre region also
another object's) at the test resize with the base and the fitted config, as the rules predict
them from boxes and as the model's own target assignment gives them on the decoded masks.

--trials ITERS checks the fit by measurement (solo_d2/engine/fit_trials.py): the base config and
a few fitted candidates are each trained ITERS iterations on the dataset and evaluated on
--val-dataset (a name or spec), or on a deterministic held-out share of its images; OUT.yaml is
the best one's (the base, trained with two seeds, unless a fitted one beats their mean by more
than their difference and --trial-margin points), with the trial table in its comments and in
OUT.trials.json. Trial outputs go to OUT's folder, <OUT
stem>_trials/.

    python tools/analyze_dataset.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --dataset mydata=annotations.json:images/ --fit output/mydata.yaml --trials 300

Exit status 0, or 2 on bad arguments, config, dataset or OUT, or when every trial fails (one
"error: ..." line).
"""

import argparse
import difflib
import logging
import sys
from pathlib import Path
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from solo_d2.atomic_io import atomic_write_json
from solo_d2.config import ConfigError, load_config
from solo_d2.data.shapes import register_shapes
from solo_d2.data.shapes_panoptic import register_shapes_panoptic
from solo_d2.engine.fit_trials import (
    MARGIN,
    VAL_FRACTION,
    choose,
    format_trials,
    run_trials,
    split_dataset,
    training_progress,
    trial_candidates,
    trials_record,
)
from solo_d2.engine.preflight import check_config
from solo_d2.kinds import register_dataset, spec_forms
from solo_d2.model_zoo import resolve_config_file
from solo_d2.visualization.dataset_fit import ConfigFit, config_value, fit_config, write_fit
from solo_d2.visualization.dataset_report import (
    analyze_dataset,
    format_report,
    measure_lost_targets,
    plot_scale_histogram,
)

ROOT = Path(__file__).resolve().parent.parent
FEW_VALIDATION_IMAGES = 50  # a held-out split below this gets a warning: its metric is noisy


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add(
        "--config-file",
        required=True,
        metavar="FILE",
        help="model config: a file or a model zoo name",
    )
    add(
        "--dataset",
        required=True,
        metavar="NAME|SPEC",
        help=f"a registered dataset name, or a spec: {' or '.join(spec_forms())}",
    )
    add(
        "--output",
        metavar="DIR",
        help="folder for report.json and scale_histogram.png (default "
        "output/dataset_report/<dataset name>)",
    )
    add(
        "--fit",
        metavar="OUT.yaml",
        help="also write a config fitted to the dataset's statistics, inheriting --config-file",
    )
    add(
        "--fit-model",
        action="store_true",
        help="with --fit: also change the architecture (drop the outer levels that receive no "
        "objects)",
    )
    add(
        "--trials",
        type=int,
        default=0,
        metavar="ITERS",
        help="with --fit: train the base config and fitted candidates ITERS iterations each and "
        "write the best on the validation split (0: off)",
    )
    add(
        "--val-dataset",
        metavar="NAME|SPEC",
        help="with --trials: the validation set (default: a deterministic held-out "
        f"{100 * VAL_FRACTION:g}%% of --dataset's images)",
    )
    add(
        "--trial-margin",
        type=float,
        default=MARGIN,
        metavar="POINTS",
        help="with --trials: a fitted candidate replaces the base config only when its "
        "validation AP (PQ) beats the base's mean over two seeds by more than this and their "
        f"difference (default {MARGIN:g})",
    )
    add(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. INPUT.MIN_SIZE_TEST 1024",
    )
    return parser  # fmt: skip


def resolve_dataset(arg: str, max_image_pixels: int) -> str:
    """The dataset name of ``arg``: registered now when it is a spec (NAME=...).

    Raises:
        ValueError, OSError: a bad spec, missing files, or an unknown name (one line).
    """
    register_shapes()
    register_shapes_panoptic()
    if "=" in arg:
        return register_dataset(arg, max_image_pixels)
    registered = DatasetCatalog.list()
    if arg not in registered:
        close = difflib.get_close_matches(arg, registered, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"--dataset {arg!r} is not a registered dataset{hint}; give a spec of the form "
            f"{spec_forms()[0]}"
        )
    return arg


def fit_and_check(
    cfg, dicts, classes, name: str, config_file: str, out_yaml: str, opts=(), fit_model=False
):
    """Fit a config to the dataset, write it to ``out_yaml``, load it back and preflight it.
    The ``--opts`` overrides that the fit does not set are written too (the fit used them).

    Returns:
        the :class:`ConfigFit` and the fitted config.
    Raises:
        ConfigError, ValueError, OSError: the fit or the written file is unusable (one line).
    """
    meta = MetadataCatalog.get(name)
    panoptic = any("segments_info" in d for d in dicts[:1])
    stuff = meta.get("stuff_classes", None) if panoptic else None
    fit = fit_config(
        cfg,
        dicts,
        classes,
        base_config=config_file,
        dataset_name=name,
        stuff_classes=stuff,
        fit_model=fit_model,
    )
    for key in opts[::2]:
        if key not in fit.changes:
            fit.set(key, config_value(cfg, key), "from --opts")
    folder = Path(out_yaml).resolve().parent
    if not folder.is_dir():
        raise OSError(f"--fit {out_yaml}: folder {folder} does not exist")
    write_fit(fit, out_yaml)
    fitted = load_config(out_yaml)
    check_config(fitted, splits=("TRAIN",), check_weights=False)
    return fit, fitted


def format_changes(fit: ConfigFit, cfg) -> str:
    """What the fitted config changes, one line per key: base value -> fitted value."""
    lines = []
    for key, (value, comment) in fit.changes.items():
        old = config_value(cfg, key)
        if isinstance(old, (list, tuple)):
            old = type(value)(old) if isinstance(value, (list, tuple)) else old
        mark = "  " if old == value else "* "
        lines.append(f"{mark}{key}: {old} -> {value}  ({comment})")
    return "\n".join(lines)


def lost_targets_check(cfg, fitted, dicts, base_report, fitted_report) -> dict:
    """Objects lost to shared cells at the test resize, base vs fitted config: predicted from the
    boxes (the reports) and measured with the model's target assignment on decoded masks."""
    out = {}
    for name, c, report in (("base", cfg, base_report), ("fitted", fitted, fitted_report)):
        sc = c.MODEL.SOLO
        measured = measure_lost_targets(
            dicts, c.INPUT.MIN_SIZE_TEST, c.INPUT.MAX_SIZE_TEST, sc.FPN_SCALE_RANGES,
            sc.NUM_GRIDS, float(sc.SIGMA),
        )  # fmt: skip
        out[name] = {"predicted": report["test"]["lost_targets"], "measured": measured}
    return out


def format_lost_check(check: dict) -> str:
    """The lost-targets line: (object, level) pairs without a cell of their own, base -> fitted."""
    b, f = check["base"], check["fitted"]
    mb, mf = b["measured"], f["measured"]
    return (
        "objects without a grid cell of their own at the test resize, base -> fitted (a cell "
        "predicts one mask; counted per level): predicted from the boxes of every image "
        f"{sum(b['predicted']):g} -> {sum(f['predicted']):g} (per level {b['predicted']} -> "
        f"{f['predicted']}); measured with the model's target assignment on the masks of "
        f"{mb['images']} images {sum(mb['lost_per_level'])} -> {sum(mf['lost_per_level'])} "
        f"(per level {mb['lost_per_level']} -> {mf['lost_per_level']}; without a cell on "
        f"every level they are on: {mb['lost']} -> {mf['lost']} of {mb['instances']})"
    )


def trials_folder(out_yaml: str) -> Path:
    """``<OUT stem>_trials/`` beside OUT.yaml, made here (OUT's folder must exist)."""
    out = Path(out_yaml).resolve()
    if not out.parent.is_dir():
        raise OSError(f"--fit {out_yaml}: folder {out.parent} does not exist")
    folder = out.parent / f"{out.stem}_trials"
    folder.mkdir(exist_ok=True)
    return folder


def check_by_trials(args, cfg, fit, name: str, opts_keys) -> dict:
    """The trial stage (solo_d2/engine/fit_trials.py): returns the trial record written beside
    OUT.yaml; OUT.yaml becomes the chosen candidate's config.

    Raises:
        ValueError, OSError, ConfigError: a bad --val-dataset, a dataset that cannot be split,
            or every trial failed (one line).
    """
    out_yaml = Path(args.fit).resolve()
    folder = trials_folder(args.fit)
    if args.val_dataset:
        val = resolve_dataset(args.val_dataset, cfg.INPUT.MAX_IMAGE_PIXELS)
        train, held_out = name, False
    else:
        train, val = split_dataset(name, str(folder / "split"))
        held_out = True
    n_val = len(DatasetCatalog.get(val))
    if held_out and n_val < FEW_VALIDATION_IMAGES:
        print(
            f"warning: the held-out validation split has {n_val} images: the trials' metric "
            "on so few images moves by several points from run to run, so a candidate may "
            "win or lose by chance; give a larger validation set with --val-dataset",
            file=sys.stderr,
        )
    candidates = trial_candidates(cfg, fit, opts_keys)
    for c in candidates:  # each candidate's config, for the user to train or compare
        write_fit(c.fit, str(folder / f"{c.name}.yaml"))
    with training_progress(str(folder / "log.txt")):  # as train_net.py shows training
        results = run_trials(cfg, candidates, train, val, args.trials, str(folder))
    chosen = choose(results, args.trial_margin)
    winner = next(c for c in candidates if c.name == chosen.candidate)
    table = format_trials(results, chosen, args.trials)
    where = f"held-out {n_val} images of {name!r}" if held_out else repr(val)
    notes = [
        f"Checked by training (--trials {args.trials}): each candidate trained on {train!r} and "
        f"evaluated on {where}; a fitted candidate replaces the base only when it beats the "
        "base's mean over two seeds by more than their difference and more than "
        f"{args.trial_margin:g} points.",
        *table,
    ]
    write_fit(winner.fit, str(out_yaml), notes)
    check_config(load_config(str(out_yaml)), splits=("TRAIN",), check_weights=False)
    record = trials_record(
        results, chosen, dataset=name, train_dataset=train, val_dataset=val,
        held_out=held_out, iterations=args.trials, margin=args.trial_margin,
        config=str(out_yaml),
    )  # fmt: skip
    atomic_write_json(str(out_yaml.with_suffix(".trials.json")), record, indent=1)
    print("\n".join(table))
    return record


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.fit_model and not args.fit:
        parser.error("--fit-model needs --fit OUT.yaml")
    if (args.trials or args.val_dataset) and not args.fit:
        parser.error("--trials and --val-dataset need --fit OUT.yaml")
    if args.trials < 0:
        parser.error(f"--trials must be 0 (off) or a number of iterations, got {args.trials}")
    if args.val_dataset and not args.trials:
        parser.error("--val-dataset needs --trials ITERS")
    if len(args.opts) % 2:
        parser.error(f"--opts needs KEY VALUE pairs, got {args.opts}")
    record = None
    try:
        args.config_file = resolve_config_file(args.config_file)  # a file, else a zoo name
        cfg = load_config(args.config_file, args.opts)  # ConfigError: one line on a mistake
        name = resolve_dataset(args.dataset, cfg.INPUT.MAX_IMAGE_PIXELS)
        dicts = DatasetCatalog.get(name)  # missing files of a builtin dataset raise here
        classes = MetadataCatalog.get(name).get("thing_classes", None) or []
        report = analyze_dataset(cfg, dicts, classes, dataset_name=name)
        if args.fit:
            # with --trials, OUT.yaml is written once the trials chose; the rules' fit goes
            # to the trials folder
            rules = str(trials_folder(args.fit) / "rules.yaml") if args.trials else args.fit
            fit, fitted = fit_and_check(
                cfg, dicts, classes, name, args.config_file, rules, args.opts, args.fit_model
            )
            fitted_report = analyze_dataset(fitted, dicts, classes, dataset_name=name)
            lost = lost_targets_check(cfg, fitted, dicts, report, fitted_report)
            if args.trials:
                record = check_by_trials(args, cfg, fit, name, args.opts[::2])
    except (ConfigError, ValueError, OSError, AssertionError) as e:  # DatasetError: ValueError
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    out = Path(args.output or ROOT / "output" / "dataset_report" / name)
    out.mkdir(parents=True, exist_ok=True)
    scales = report.pop("_scales")
    report["config_file"] = str(Path(args.config_file).resolve())
    if args.fit:
        report["lost_targets_check"] = lost
    atomic_write_json(str(out / "report.json"), report, indent=1)
    plot_scale_histogram({**report, "_scales": scales}, str(out / "scale_histogram.png"))
    print(format_report(report))
    print(f"wrote {out / 'report.json'} and {out / 'scale_histogram.png'}")
    if args.fit:
        fitted_report.pop("_scales")
        print(f"\nfitted config {args.fit} (* changed; base value -> fitted value):")
        print(format_changes(fit, cfg))
        print("\n".join(fit.decision))
        print("with the fitted config:")
        print(format_report(fitted_report, levels_only=True))
        print(format_lost_check(lost))
        if record is not None:
            print(
                f"\nchecked by {len(record['trials'])} trials of {args.trials} iterations: "
                f"{args.fit} is the {record['chosen']!r} candidate's config; table in "
                f"{Path(args.fit).with_suffix('.trials.json')}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
