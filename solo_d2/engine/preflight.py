"""Preflight: check what a config names before any work starts.

:func:`check_config` runs in ``train_net.py`` (in the launching process, before workers start)
and in :class:`~solo_d2.engine.Trainer` (before the model is built, and before an evaluation);
every mistake becomes a one-line :class:`~solo_d2.config.ConfigError` naming the key, the value
and the fix.
"""

import difflib
import os
from typing import Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import ConfigError
from ..data.shapes import SPLITS as SHAPES_SPLITS
from ..data.shapes_panoptic import SPLITS as PANOPTIC_SHAPES_SPLITS
from ..kinds import kind_of
from ..modeling import is_panoptic
from ..modeling.tiling import check_tile_config

__all__ = ["check_config"]


def _resumable(cfg: CfgNode) -> bool:
    return os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))


def _missing_files(name: str, key: str) -> Optional[ConfigError]:
    """The error for a registered dataset whose ``json_file`` or ``image_root`` is missing (the
    builtin detectron2 datasets are registered whether their files exist or not), or None."""
    if name in SHAPES_SPLITS or name in PANOPTIC_SHAPES_SPLITS:  # generated when first used
        return None
    files = kind_of(name).files(name)  # [(what, path)]: the annotation file, the images first
    (_, json_file), (_, image_root) = files[:2]
    what, missing = next(
        ((w, p) for w, p in files if isinstance(p, str) and not os.path.exists(p)), (None, None)
    )
    if missing is None:
        return None
    error = f"dataset {name!r} (DATASETS.{key}): its {what} {os.path.abspath(missing)} is missing"
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    inside = os.path.commonpath([os.path.abspath(root), os.path.abspath(missing)])
    if inside == os.path.abspath(root):  # one of detectron2's builtin datasets
        env = os.getenv("DETECTRON2_DATASETS")
        where = (
            f"$DETECTRON2_DATASETS = {env}" if env else "./datasets ($DETECTRON2_DATASETS unset)"
        )
        layout = " and ".join(
            os.path.relpath(p, root) + ("/" if p == image_root else "")
            for p in (json_file, image_root)
            if isinstance(p, str)
        )
        error += f"; detectron2 looks for its builtin datasets in {where}, this one as {layout}"
    return ConfigError(
        f"{error}; to train or evaluate on your own COCO-format data, register it with "
        f"--dataset NAME=ANNOTATIONS.json:IMAGE_DIR and set DATASETS.{key} \"('NAME',)\""
    )


def check_config(
    cfg: CfgNode,
    *,
    resume: bool = False,
    check_weights: bool = True,
    splits: Sequence[str] = ("TRAIN", "TEST"),
) -> None:
    """Check what the config names before any work starts.

    * every dataset of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (those of ``splits``: evaluation
      alone needs only "TEST") is registered, and the ``json_file`` and ``image_root`` of its
      metadata exist (detectron2 registers its builtin datasets, e.g. ``coco_2017_train``, even
      when they are not on disk);
    * ``MODEL.SOLO.NUM_CLASSES`` equals the number of categories of each of them (when its
      metadata knows ``thing_classes``), and a panoptic model's
      ``MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES`` their stuff categories; a panoptic model trains
      on panoptic datasets only;
    * detectron2's builtin COCO panoptic datasets among them that are on disk are re-registered
      with the project's panoptic convention (:func:`solo_d2.data.panoptic.adopt_builtin_panoptic`);
    * ``INPUT.MAX_IMAGE_PIXELS`` is positive; the ``INPUT.TILE`` keys are valid when tiles are on;
    * with ``check_weights``, a local ``MODEL.WEIGHTS`` file exists (URLs and ``scheme://``
      paths are not fetched here); it is not needed when ``resume`` finds a checkpoint.

    Raises:
        ConfigError: one line naming the key, the value and the fix.
    """
    registered = set(DatasetCatalog.list())
    for name in {n for key in splits for n in cfg.DATASETS[key] if n in registered}:
        kind_of(name).adopt(name)  # detectron2's builtin panoptic datasets: the SOLO convention
    panoptic = is_panoptic(cfg)
    for key in splits:
        for name in cfg.DATASETS[key]:
            if name not in registered:
                close = difflib.get_close_matches(name, sorted(registered), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                form = (
                    f"{name}=panoptic:PANOPTIC.json:PANOPTIC_PNG_DIR:IMAGE_DIR"
                    if panoptic
                    else f"{name}=ANNOTATIONS.json:IMAGE_DIR (LVIS: {name}=lvis:ANNOTATIONS.json"
                    ":IMAGE_DIR)"
                )
                raise ConfigError(
                    f"DATASETS.{key} names dataset {name!r}, which is not registered{hint}; "
                    f"register it with --dataset {form}"
                )
            error = _missing_files(name, key)
            if error is not None:
                raise error
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            if classes is not None and len(classes) != cfg.MODEL.SOLO.NUM_CLASSES:
                shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                subset = (
                    " (to evaluate a model trained on more categories on some of them, keep all "
                    "of the model's categories, with their ids, in the dataset's 'categories', "
                    "annotated or not)"
                    if key == "TEST"
                    else ""
                )
                raise ConfigError(
                    f"MODEL.SOLO.NUM_CLASSES is {cfg.MODEL.SOLO.NUM_CLASSES} but dataset "
                    f"{name!r} (DATASETS.{key}) has {len(classes)} categories ({shown}); set "
                    f"MODEL.SOLO.NUM_CLASSES {len(classes)}{subset}"
                )
            kind_of(name).check(cfg, name, key)
    if cfg.INPUT.MAX_IMAGE_PIXELS <= 0:
        raise ConfigError(
            f"INPUT.MAX_IMAGE_PIXELS is {cfg.INPUT.MAX_IMAGE_PIXELS}; it must be a positive "
            "number of pixels"
        )
    if cfg.INPUT.TILE.TRAIN or cfg.INPUT.TILE.TEST:
        try:
            check_tile_config(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    weights = cfg.MODEL.WEIGHTS
    if check_weights and weights and "://" not in weights and not os.path.isfile(weights):
        if not (resume and _resumable(cfg)):
            raise ConfigError(f"MODEL.WEIGHTS file not found: {weights}")
