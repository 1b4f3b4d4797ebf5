"""Evaluation of SOLO-family models on LVIS-format data: federated mask and box AP.

LVIS's rules (Gupta et al., CVPR 2019, §4; the ``lvis`` package's ``LVISEval``): on each image
only the categories annotated in it or listed in its ``neg_category_ids`` are evaluated (a
detection of any other category is dropped); a detection of a category in the image's
``not_exhaustive_category_ids`` that matches no annotation is not a false positive; at most 300
detections per image (``TEST.DETECTIONS_PER_IMAGE``); AP is also averaged over the rare, common and
frequent categories (APr, APc, APf).

:class:`SOLOLVISEvaluator` evaluates as detectron2's ``LVISEvaluator`` (a ``DatasetEvaluator``
of its own, using detectron2's public ``instances_to_coco_json``), with the project's data checks
and atomic result files (as :class:`~solo_d2.evaluation.SOLOCOCOEvaluator`), 0 AP when the model
predicts nothing, and NaN (``null`` in ``evaluation_results.json``) for a frequency group without
any annotated category in the data (LVISEval reports -1 there).

The ``lvis`` package (PyPI ``lvis`` 0.5.3, the one detectron2 imports) uses ``np.float`` in
``lvis/eval.py``; numpy removed that alias in 1.24. During an evaluation,
:func:`lvis_numpy_compat` gives ``lvis.eval`` a numpy namespace that has it, and restores the
module afterwards, without editing site-packages or numpy itself.
"""

import builtins
import contextlib
import copy
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..data.dataset_dicts import clean_coco_dict
from ..data.faults import summarize_faults
from ..data.lvis import read_and_check_lvis
from ..data.record import dataset_record
from .coco_evaluation import staged_output, write_evaluation_files

__all__ = ["SOLOLVISEvaluator", "LVIS_METRICS", "lvis_numpy_compat", "evaluate_on_lvis"]

logger = logging.getLogger(__name__)

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
LVIS_MAX_DETS = 300  # LVIS's official limit of detections per image


class _NumpyWithFloat:
    """numpy, seen through a namespace that also has the ``float`` alias (``np.float`` was the
    builtin ``float``, i.e. float64 as a dtype) that numpy removed in 1.24."""

    float = builtins.float

    def __getattr__(self, name: str):
        return getattr(np, name)


@contextlib.contextmanager
def lvis_numpy_compat() -> Iterator[None]:
    """Within the block, ``lvis.eval`` (lvis 0.5.3) works with numpy >= 1.24: its module-level
    ``np`` is a :class:`_NumpyWithFloat`; the previous one is restored afterwards. Only that
    module's reference changes (numpy and every other module are untouched); nothing changes when
    its numpy has ``float``."""
    import lvis.eval

    previous = lvis.eval.np
    if not hasattr(previous, "float"):
        lvis.eval.np = _NumpyWithFloat()
    try:
        yield
    finally:
        lvis.eval.np = previous


def _lvis_api(dataset: dict):
    """An ``lvis.LVIS`` index of an in-memory dataset dict (``LVIS()`` only reads files)."""
    from lvis import LVIS

    api = LVIS.__new__(LVIS)
    api.logger = logging.getLogger("lvis.lvis")
    api.dataset = dataset
    api._create_index()
    return api


def evaluate_on_lvis(
    lvis_gt, results: List[dict], iou_type: str, max_dets: int = LVIS_MAX_DETS, logger=None
) -> Dict[str, float]:
    """Federated LVIS AP of ``results`` (LVIS-format detections, the file's category ids).

    Args:
        lvis_gt: an ``lvis.LVIS`` of the ground truth.
        iou_type: "segm" or "bbox".
        max_dets: detections kept per image (the highest scoring).
    Returns:
        {metric: value in percent} for :data:`LVIS_METRICS`; NaN for a frequency group (or area
        range) without annotated categories; all 0 when ``results`` is empty.
    """
    from lvis import LVISEval, LVISResults

    logger = logger or logging.getLogger(__name__)
    if not results:
        logger.warning(f"No {iou_type} predictions: LVIS AP is 0")
        return {m: 0.0 for m in LVIS_METRICS}
    results = copy.deepcopy(results)
    if iou_type == "segm":
        # without "bbox", LVISResults takes each detection's area from its mask (as detectron2)
        for r in results:
            r.pop("bbox", None)
    with lvis_numpy_compat():
        dt = LVISResults(lvis_gt, results, max_dets=max_dets)
        lvis_eval = LVISEval(lvis_gt, dt, iou_type)
        lvis_eval.params.max_dets = max_dets  # only labels the printout; LVISResults applied it
        lvis_eval.run()
        lvis_eval.print_results()
        raw = lvis_eval.get_results()
    out = {m: float(raw[m]) * 100 if raw[m] >= 0 else math.nan for m in LVIS_METRICS}
    logger.info(f"Evaluation results for {iou_type}: \n" + create_small_table(out))
    return out


class SOLOLVISEvaluator(DatasetEvaluator):
    """Federated LVIS mask and box AP, with checked ground truth and atomic result files.

    * For a dataset registered by :func:`solo_d2.data.lvis.register_lvis_dataset`, the ground
      truth is the checked annotation file (faulty annotations and images left out, named in the
      log and in ``<output_dir>/data_faults.json``). detectron2's builtin LVIS datasets are read
      as they are.
    * ``instances_predictions.pth``, ``lvis_instances_results.json`` and
      ``evaluation_results.json`` (NaN as null) are renamed into ``output_dir`` from a staging
      folder: a killed evaluation leaves the previous files intact.
    * At most ``cfg.TEST.DETECTIONS_PER_IMAGE`` detections per image are evaluated (LVIS: 300).
    * In distributed evaluation (``distributed=True``), the predictions are gathered to the main
      process, which alone evaluates and returns the results (None elsewhere).
    """

    def __init__(
        self,
        dataset_name: str,
        cfg=None,
        *,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        max_dets_per_image: Optional[int] = None,
    ):
        from lvis import LVIS

        self.dataset_name = dataset_name
        self.tasks = ("segm", "bbox")
        self.distributed = distributed
        self.output_dir = output_dir
        if max_dets_per_image is None:
            max_dets_per_image = cfg.TEST.DETECTIONS_PER_IMAGE if cfg is not None else LVIS_MAX_DETS
        self.max_dets_per_image = max_dets_per_image
        if max_dets_per_image != LVIS_MAX_DETS:
            logger.warning(
                f"LVIS AP of {dataset_name!r} with {max_dets_per_image} detections per image "
                f"(TEST.DETECTIONS_PER_IMAGE); LVIS's official AP uses {LVIS_MAX_DETS}"
            )
        self.metadata = MetadataCatalog.get(dataset_name)
        self.faults = []
        self.record = dataset_record(dataset_name)
        if self.record is not None:
            self.lvis_api = self.checked_ground_truth()
        else:  # detectron2's builtin LVIS datasets
            self.lvis_api = LVIS(PathManager.get_local_path(self.metadata.json_file))
        self.has_annotations = len(self.lvis_api.get_ann_ids()) > 0
        self.predictions = []

    def checked_ground_truth(self):
        """An ``lvis.LVIS`` of the annotation file without its faulty annotations and images;
        sets ``self.faults``."""
        json_file = self.record.files["json_file"]
        data, checked, _ = read_and_check_lvis(  # the check of the registration, reused
            json_file,
            self.record.files["image_root"],
            max_image_pixels=self.record.max_image_pixels,
        )
        self.faults = checked.faults
        if checked.faults:
            logger.warning(
                f"Evaluation data {self.dataset_name!r} ({json_file}) has "
                f"{len(checked.faults)} faults; evaluating without the "
                f"{len(checked.bad_annotations)} faulty annotations and "
                f"{len(checked.bad_images)} faulty images:\n" + summarize_faults(checked.faults)
            )
        return _lvis_api(clean_coco_dict(data, checked))

    def reset(self):
        self.predictions = []

    def process(self, inputs, outputs):
        for model_input, output in zip(inputs, outputs):
            if "instances" in output:
                image_id = model_input["image_id"]
                instances = output["instances"].to("cpu")
                self.predictions.append(
                    {"image_id": image_id, "instances": instances_to_coco_json(instances, image_id)}
                )

    def evaluate(self):
        if self.distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self.predictions, dst=0)))
            if not comm.is_main_process():
                return None
        else:
            predictions = self.predictions
        if not predictions:
            logger.warning(f"LVIS evaluation of {self.dataset_name!r}: no predictions received")
            return {}
        output_dir = self.output_dir if comm.is_main_process() else None
        with staged_output(output_dir) as staging:
            if staging:
                with open(os.path.join(staging, "instances_predictions.pth"), "wb") as f:
                    torch.save(predictions, f)
            results = self.evaluate_predictions(predictions, staging)
        if output_dir:
            write_evaluation_files(output_dir, results, self.faults)
        return copy.deepcopy(results)

    def evaluate_predictions(self, predictions: List[dict], json_dir: Optional[str]) -> dict:
        """{"segm": metrics, "bbox": metrics} of ``predictions`` (the outputs of :meth:`process`,
        of all processes); writes ``lvis_instances_results.json`` to ``json_dir`` when given."""
        results = list(itertools.chain(*[p["instances"] for p in predictions]))
        id_map = self.metadata.get("thing_dataset_id_to_contiguous_id", None)
        if id_map is not None:
            to_file_id = {v: k for k, v in id_map.items()}
            for r in results:
                r["category_id"] = to_file_id[r["category_id"]]
        else:  # detectron2's builtin LVIS: ids 1..C
            for r in results:
                r["category_id"] += 1
        if json_dir:
            path = os.path.join(json_dir, "lvis_instances_results.json")
            logger.info(f"Saving results to {path}")
            with open(path, "w") as f:
                json.dump(results, f)
        if not self.has_annotations:
            logger.info("Annotations are not available for evaluation.")
            return OrderedDict()
        return OrderedDict(
            (task, evaluate_on_lvis(self.lvis_api, results, task, self.max_dets_per_image))
            for task in self.tasks
        )
