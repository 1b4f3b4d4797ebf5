"""Panoptic quality (PQ) of SOLO panoptic models: detectron2's ``COCOPanopticEvaluator`` on the
images of the registered dataset only, with atomic result files.

PQ, SQ and RQ are counted by panopticapi (PyPI ``panopticapi-lite``, a copy of
cocodataset/panopticapi), as by detectron2's evaluator. In each image, a predicted segment and a
ground-truth segment of the same category match when their IoU is strictly above 0.5 (the
prediction's pixels on void are left out of the union; crowd regions never match). An unmatched
ground-truth segment is a false negative (FN) unless it is a crowd region; an unmatched prediction
is a false positive (FP) unless more than half of it lies on void or on a crowd region of its
category. Per category, over all images::

    SQ = sum of the IoUs of the matches / TP     RQ = TP / (TP + FP / 2 + FN / 2)     PQ = SQ * RQ

and PQ, SQ, RQ of "All", "Things" and "Stuff" are the means over the categories of that kind that
have at least one segment (ground truth or predicted).
"""

import contextlib
import copy
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from tabulate import tabulate

from ..atomic_io import atomic_write_json
from ..compat import panoptic_predictions
from .coco_evaluation import staged_output, write_evaluation_files

__all__ = ["SOLOPanopticEvaluator", "PanopticAPINotInstalledError"]

logger = logging.getLogger(__name__)

# The metric groups of panopticapi: name, isthing (None: all categories), detectron2's suffix.
_GROUPS = (("All", None, ""), ("Things", True, "_th"), ("Stuff", False, "_st"))


class PanopticAPINotInstalledError(ImportError):
    """panopticapi (PyPI ``panopticapi-lite``, installed without dependencies) is missing."""

    def __init__(self):
        super().__init__(
            "Panoptic evaluation (PQ) needs the 'panopticapi' module of the 'panopticapi-lite' "
            "package (requirements-nodeps.txt), which is not installed: run `make test` or "
            "`python tools/setup_env.py`, or `pip install --no-deps panopticapi-lite==0.2.0`",
            name="panopticapi",
        )


def _import_panopticapi():
    """panopticapi's evaluation module, or :class:`PanopticAPINotInstalledError`."""
    try:
        import panopticapi.evaluation
        import panopticapi.utils  # noqa: F401  (detectron2's process() imports id2rgb from it)
    except ImportError as e:
        raise PanopticAPINotInstalledError() from e
    return panopticapi.evaluation


class SOLOPanopticEvaluator(COCOPanopticEvaluator):
    """COCOPanopticEvaluator for SOLO: the dataset's images only, atomic result files.

    * Only the images of ``DatasetCatalog.get(dataset_name)`` are evaluated: the images that the
      dataset loader left out (its record's faults) and those outside a registered subset of the
      panoptic JSON are not counted (panopticapi alone would fail on an image without
      prediction). Predictions of other images are ignored; a dataset image without prediction
      is an error.
    * The result is detectron2's ``{"panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"}}``
      (percent). A group (things / stuff) without any segment, ground-truth or predicted, has
      PQ = SQ = RQ = 0 (an image set on which the model predicts nothing has PQ 0, never an
      error); one with no category at all in the dataset (no stuff category) has NaN.
    * ``predictions.json`` (the COCO panoptic JSON of the predictions; their PNGs are not kept)
      and the metrics (``evaluation_results.json``, NaN written as null) are written to a staging
      folder, then renamed into ``output_dir``: a killed evaluation leaves the previous files
      intact.
    * In distributed evaluation, the predictions are gathered to the main process, which alone
      evaluates and returns the results (None elsewhere). Call :meth:`evaluate` on all workers.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None):
        _import_panopticapi()
        super().__init__(dataset_name, output_dir)
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.metadata = MetadataCatalog.get(dataset_name)
        self.image_ids = None

    def process(self, inputs, outputs):
        """Record the predictions of a batch (see ``COCOPanopticEvaluator.process``).

        The model's segments_info dicts are not modified, and their tensor / numpy scalars
        ("score", "area", ...) are turned into Python numbers for the JSON file.
        """
        plain_outputs = []
        for output in outputs:
            seg, segments_info = output["panoptic_seg"]
            if segments_info is not None:
                segments_info = [{k: _plain(v) for k, v in s.items()} for s in segments_info]
            plain_outputs.append({**output, "panoptic_seg": (seg, segments_info)})
        super().process(inputs, plain_outputs)

    def dataset_image_ids(self) -> list:
        """The image ids of the registered dataset, in its order (loaded once)."""
        if self.image_ids is None:
            ids = [d["image_id"] for d in DatasetCatalog.get(self.dataset_name)]
            self.image_ids = list(dict.fromkeys(ids))
        return self.image_ids

    def evaluate(self):
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(panoptic_predictions(self), dst=0)))
        if not comm.is_main_process():
            return None

        with staged_output(self.output_dir) as staging:
            pq_res = self.compute_pq(predictions, staging)
            results = OrderedDict({"panoptic_seg": _detectron2_metrics(pq_res)})
        if self.output_dir:
            write_evaluation_files(self.output_dir, results, faults=[])
        _log_pq_table(pq_res)
        return results

    def compute_pq(self, predictions: list, json_dir: Optional[str]) -> dict:
        """panopticapi's PQ of ``predictions`` on the dataset's images: {"All" / "Things" /
        "Stuff": {"pq", "sq", "rq", "n"}}. Writes ``predictions.json`` to ``json_dir``."""
        gt_json = PathManager.get_local_path(self.metadata.panoptic_json)
        gt_folder = PathManager.get_local_path(self.metadata.panoptic_root)
        with open(gt_json) as f:
            gt = json.load(f)
        image_ids = self.dataset_image_ids()
        id_set = set(image_ids)
        gt_annotations = {
            a.get("image_id"): a for a in gt["annotations"] if a.get("image_id") in id_set
        }
        pred_annotations = {p["image_id"]: p for p in predictions if p["image_id"] in id_set}
        self.check_coverage(image_ids, gt_annotations, pred_annotations, gt_json)
        n_ignored = len({p["image_id"] for p in predictions} - id_set)
        logger.info(
            f"Evaluating PQ of {self.dataset_name!r} on its {len(image_ids)} images "
            f"({len(gt['annotations'])} in {gt_json})"
            + (f"; ignoring the predictions of {n_ignored} other images" if n_ignored else "")
        )

        with contextlib.ExitStack() as stack:
            pred_folder = stack.enter_context(_temporary_folder(json_dir))
            annotations, used_names = [], set()
            for image_id in image_ids:
                pred = dict(pred_annotations[image_id])
                png = pred.pop("png_string")
                pred["file_name"] = _unique_name(pred["file_name"], used_names)
                with open(os.path.join(pred_folder, pred["file_name"]), "wb") as f:
                    f.write(png)
                annotations.append(pred)
            if json_dir:
                images = [im for im in gt.get("images", []) if im.get("id") in id_set]
                atomic_write_json(
                    os.path.join(json_dir, "predictions.json"),
                    {**gt, "images": images, "annotations": annotations},
                )
            matched = [(gt_annotations[i], a) for i, a in zip(image_ids, annotations)]
            categories = {c["id"]: c for c in gt["categories"]}
            pq_stat = _accumulate_pq_stats(
                copy.deepcopy(matched), gt_folder, pred_folder, categories
            )

        pq_res = {}
        for group, isthing, _ in _GROUPS:
            try:
                pq_res[group], _ = pq_stat.pq_average(categories, isthing=isthing)
            except ZeroDivisionError:  # no category of the group has any segment
                exists = any(isthing in (None, c["isthing"] == 1) for c in categories.values())
                value = 0.0 if exists else math.nan
                pq_res[group] = {"pq": value, "sq": value, "rq": value, "n": 0}
                if exists:
                    logger.warning(
                        f"PQ of {self.dataset_name!r}: no {group.lower()} segment in the ground "
                        f"truth or the predictions; {group} PQ, SQ and RQ reported as 0"
                    )
        return pq_res

    def check_coverage(self, image_ids, gt_annotations, pred_annotations, gt_json) -> None:
        for what, found, where in (
            ("ground truth", gt_annotations, f"the panoptic JSON {gt_json}"),
            ("prediction", pred_annotations, "the evaluated predictions"),
        ):
            missing = [i for i in image_ids if i not in found]
            if missing:
                raise ValueError(
                    f"Panoptic evaluation of {self.dataset_name!r}: {where} has no {what} for "
                    f"{len(missing)} of the dataset's {len(image_ids)} images "
                    f"(image ids {missing[:5]}{' ...' if len(missing) > 5 else ''})"
                )


def _plain(value):
    """A tensor / numpy scalar as a Python number; anything else unchanged."""
    return value.item() if hasattr(value, "item") else value


def _unique_name(name: str, used: set) -> str:
    """``name``, or ``<stem>_<k><ext>`` if two images share a file name (in different folders)."""
    stem, ext = os.path.splitext(name)
    k, unique = 0, name
    while unique in used:
        k += 1
        unique = f"{stem}_{k}{ext}"
    used.add(unique)
    return unique


@contextlib.contextmanager
def _temporary_folder(parent: Optional[str]):
    """A new folder for the predicted PNGs (in ``parent`` when given), removed afterwards."""
    folder = tempfile.mkdtemp(prefix="panoptic_png_", dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _num_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, multiprocessing.cpu_count())


def _accumulate_pq_stats(matched: list, gt_folder: str, pred_folder: str, categories: dict):
    """panopticapi's ``PQStat`` (per-category TP, FP, FN, IoU sum) of the (ground-truth,
    prediction) annotation pairs ``matched``, counted by one process per CPU (at most one per
    image; none for a single image) with panopticapi's per-image matching."""
    pq_evaluation = _import_panopticapi()
    count = pq_evaluation.pq_compute_single_core
    n = min(_num_workers(), len(matched))
    chunks = [matched[i::n] for i in range(n)]
    with contextlib.redirect_stdout(io.StringIO()):  # panopticapi prints its progress
        if n <= 1:
            stats = [count(0, chunk, gt_folder, pred_folder, categories) for chunk in chunks]
        else:
            with multiprocessing.Pool(processes=n) as pool:
                stats = pool.starmap(
                    count,
                    [
                        (i, chunk, gt_folder, pred_folder, categories)
                        for i, chunk in enumerate(chunks)
                    ],
                )
    total = pq_evaluation.PQStat()
    for stat in stats:
        total += stat
    return total


def _detectron2_metrics(pq_res: dict) -> dict:
    """detectron2's keys (PQ, SQ, RQ, PQ_th, ..., RQ_st), in percent."""
    return {
        f"{metric.upper()}{suffix}": float(100 * pq_res[group][metric])
        for group, _, suffix in _GROUPS
        for metric in ("pq", "sq", "rq")
    }


def _log_pq_table(pq_res: dict) -> None:
    rows = [
        [group] + [100 * pq_res[group][m] for m in ("pq", "sq", "rq")] + [pq_res[group]["n"]]
        for group, _, _ in _GROUPS
    ]
    table = tabulate(
        rows,
        headers=["", "PQ", "SQ", "RQ", "#categories"],
        tablefmt="pipe",
        floatfmt=".3f",
        stralign="center",
        numalign="center",
    )
    logger.info("Panoptic Evaluation Results:\n" + table)
