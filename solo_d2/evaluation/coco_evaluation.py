"""Evaluation of SOLO-family models on COCO-format data: detectron2's ``COCOEvaluator`` with the
project's data checks and atomic result files."""

import contextlib
import logging
import math
import os
import shutil
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from pycocotools.coco import COCO

from ..atomic_io import TMP_MARKER, atomic_write_json, remove_stale_temporaries
from ..compat import set_coco_ground_truth
from ..data.check_cache import read_and_check
from ..data.dataset_dicts import clean_coco_dict
from ..data.faults import summarize_faults
from ..data.record import DatasetRecord, dataset_record

__all__ = ["SOLOCOCOEvaluator"]

logger = logging.getLogger(__name__)


def _staging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, f".staging{TMP_MARKER}{os.getpid()}")


class SOLOCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator for SOLO: checked ground truth, atomic result files, 0 AP on no prediction.

    * For a dataset registered by :func:`solo_d2.data.coco.register_coco_dataset`, the ground
      truth is the checked annotation file: the faulty annotations and images it reports (see
      :mod:`solo_d2.data.validation`) are left out, counted and named in the log and listed in
      ``<output_dir>/data_faults.json``; missing "area" / "iscrowd" fields are filled in.
    * ``instances_predictions.pth``, ``coco_instances_results.json`` and the metrics
      (``evaluation_results.json``, NaN written as null) are written to a staging folder (the
      ``output_dir`` detectron2's evaluator is given), then each is renamed into ``output_dir``:
      a killed evaluation leaves the previous files intact.
    * When the model predicts nothing on any image, AP is reported as 0, not NaN.
    * With ``ground_truth`` (a function of the dataset name giving a COCO instances dict), a
      dataset without ``json_file`` is evaluated against what it gives, written to
      ``<output_dir>/<dataset>_coco_format.json`` (the metadata's ``json_file`` from then on, as
      after detectron2's conversion of other data): the panoptic kind passes its datasets' thing
      instances (:func:`solo_d2.data.panoptic.panoptic_things_coco`), for the instance AP of a
      panoptic model beside PQ.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        ground_truth: Optional[Callable[[str], dict]] = None,
        **kwargs,
    ):
        """Arguments of detectron2's ``COCOEvaluator``; ``ground_truth``: see the class."""
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.distributed = distributed
        self.faults = []
        self.num_detections = 0
        metadata = MetadataCatalog.get(dataset_name)
        if output_dir and not hasattr(metadata, "json_file"):
            # as detectron2 does, but into output_dir itself rather than the staging folder
            os.makedirs(output_dir, exist_ok=True)
            cache = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
            if ground_truth is not None:  # made once per process
                if comm.is_main_process():
                    atomic_write_json(cache, ground_truth(dataset_name))
                comm.synchronize()
            else:
                convert_to_coco_json(
                    dataset_name, cache, allow_cached=kwargs.get("allow_cached_coco", True)
                )
            metadata.json_file = cache
        staging = _staging_dir(output_dir) if output_dir and comm.is_main_process() else output_dir
        super().__init__(dataset_name, tasks, distributed, staging, **kwargs)
        record = dataset_record(dataset_name)
        if record is not None and "json_file" in record.files:  # a COCO-style file it checked
            set_coco_ground_truth(self, self.checked_ground_truth(record))

    def checked_ground_truth(self, record: DatasetRecord) -> COCO:
        """The dataset's annotation file without its faulty annotations and images; sets
        ``self.faults``."""
        json_file = record.files["json_file"]
        data, checked, _ = read_and_check(  # the check of the registration, reused
            json_file, record.files["image_root"], record.max_image_pixels
        )
        self.faults = checked.faults
        if checked.faults:
            logger.warning(
                f"Evaluation data {self.dataset_name!r} ({json_file}) has "
                f"{len(checked.faults)} faults; evaluating without the "
                f"{len(checked.bad_annotations)} faulty annotations and "
                f"{len(checked.bad_images)} faulty images:\n" + summarize_faults(checked.faults)
            )
        coco = COCO()
        coco.dataset = clean_coco_dict(data, checked)
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            coco.createIndex()
        return coco

    def reset(self):
        super().reset()
        self.num_detections = 0

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        self.num_detections += sum(len(o["instances"]) for o in outputs if "instances" in o)

    def evaluate(self, img_ids=None):
        detections = self.num_detections
        if self.distributed:
            detections = sum(comm.all_gather(detections))
        if not self.output_dir or not comm.is_main_process():
            results = super().evaluate(img_ids)
        else:
            with staged_output(self.output_dir) as staging:
                assert staging == _staging_dir(self.output_dir)
                results = super().evaluate(img_ids)
        if results and detections == 0:  # detectron2 reports NaN without any prediction
            results = OrderedDict((task, {k: 0.0 for k in res}) for task, res in results.items())
        if self.output_dir and comm.is_main_process():
            write_evaluation_files(self.output_dir, results, self.faults)
        return results


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


def _finite_or_null(obj):
    """``obj`` with NaN / infinite floats replaced by None (JSON has no NaN; COCO reports NaN for
    an area range without objects)."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
