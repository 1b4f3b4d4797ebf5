"""Evaluation of SOLO-family models on COCO-format data: detectron2's ``COCOEvaluator`` with the
project's data checks and atomic result files."""

import contextlib
import math
import os
import shutil
from typing import Callable, Iterator, Optional, Sequence

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from pycocotools.coco import COCO

from ..atomic_io import TMP_MARKER, atomic_write_json, remove_stale_temporaries
from ..data.validation import check_coco_dict, clean_coco_dict, read_coco_json, summarize_faults

__all__ = ["SOLOCOCOEvaluator"]


def _staging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, f".staging{TMP_MARKER}{os.getpid()}")


class SOLOCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator for SOLO: checked ground truth, atomic result files, 0 AP on no prediction.

    * For a dataset registered by :func:`solo_d2.data.coco.register_coco_dataset`, the ground
      truth is the checked annotation file: the faulty annotations and images it reports (see
      :mod:`solo_d2.data.validation`) are left out, counted and named in the log and listed in
      ``<output_dir>/data_faults.json``; missing "area" / "iscrowd" fields are filled in.
    * ``instances_predictions.pth``, ``coco_instances_results.json`` and the metrics
      (``evaluation_results.json``, NaN written as null) are written to a staging folder, then
      each is renamed into ``output_dir``: a killed evaluation leaves the previous files intact.
    * When the model predicts nothing on any image, AP is reported as 0, not NaN.
    """

    def __init__(self, dataset_name: str, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        self._dataset_name = dataset_name
        self._faults = []
        if self._metadata.get("data_faults", None) is not None:
            self._use_checked_ground_truth()

    def _use_checked_ground_truth(self) -> None:
        json_file = self._metadata.json_file
        data = read_coco_json(json_file)
        checked = check_coco_dict(data, json_file, self._metadata.get("image_root", None))
        self._faults = checked.faults
        if checked.faults:
            self._logger.warning(
                f"Evaluation data {self._dataset_name!r} ({json_file}) has "
                f"{len(checked.faults)} faults; evaluating without the "
                f"{len(checked.bad_annotations)} faulty annotations and "
                f"{len(checked.bad_images)} faulty images:\n" + summarize_faults(checked.faults)
            )
        coco = COCO()
        coco.dataset = clean_coco_dict(data, checked)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            coco.createIndex()
        self._coco_api = coco

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        return results if coco_eval is not None else {k: 0.0 for k in results}

    def evaluate(self, img_ids=None):
        if not self._output_dir or not comm.is_main_process():
            return super().evaluate(img_ids)
        return evaluate_atomically(self, lambda: super(SOLOCOCOEvaluator, self).evaluate(img_ids))


@contextlib.contextmanager
def staged_output(output_dir: Optional[str]) -> Iterator[Optional[str]]:
    """A staging folder inside ``output_dir`` whose files are renamed into ``output_dir`` when the
    block succeeds: a killed evaluation leaves the previous files intact. The folder is removed
    in any case; stale ones of killed runs first. Yields None when ``output_dir`` is empty."""
    if not output_dir:
        yield None
        return
    os.makedirs(output_dir, exist_ok=True)
    remove_stale_temporaries(output_dir)
    staging = _staging_dir(output_dir)
    os.makedirs(staging, exist_ok=True)
    try:
        yield staging
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_evaluation_files(output_dir: str, results: Optional[dict], faults: Sequence) -> None:
    """``data_faults.json`` (when there are faults) and ``evaluation_results.json`` (NaN as
    null, when there are results), each written atomically."""
    if faults:
        atomic_write_json(
            os.path.join(output_dir, "data_faults.json"),
            [f.to_dict() for f in faults],
            indent=1,
            default=str,
        )
    if results:
        atomic_write_json(
            os.path.join(output_dir, "evaluation_results.json"),
            _finite_or_null(results),
            indent=2,
        )


def evaluate_atomically(evaluator, evaluate: Callable[[], Optional[dict]]) -> Optional[dict]:
    """Run ``evaluate`` (a detectron2 evaluator's own, which writes to ``evaluator._output_dir``)
    with its files staged (:func:`staged_output`), then write the evaluation files of its
    results and of ``evaluator._faults``."""
    output_dir = evaluator._output_dir
    try:
        with staged_output(output_dir) as staging:
            evaluator._output_dir = staging
            results = evaluate()
    finally:
        evaluator._output_dir = output_dir
    write_evaluation_files(output_dir, results, evaluator._faults)
    return results


def _finite_or_null(obj):
    """``obj`` with NaN / infinite floats replaced by None (JSON has no NaN; COCO reports NaN for
    an area range without objects)."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
