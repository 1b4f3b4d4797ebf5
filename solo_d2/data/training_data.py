"""The training data, built by the data layer: the training datasets' packs (memory-mapped, no
JSON read; :mod:`solo_d2.data.packed`) with detectron2's samplers over them, or detectron2's own
path (the dataset dicts) when a dataset has no pack; the training faults reported first.

:func:`build_train_loader` is what ``Trainer.build_train_loader`` calls.
"""

import logging
import os
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_train_loader,
    print_instances_class_histogram,
)
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm
from torch.utils.data import Sampler

from ..atomic_io import atomic_write_json
from .faults import DatasetError, summarize_faults
from .packed import PackedDataset, open_packs, repeat_factors
from .record import dataset_record

__all__ = ["build_train_loader", "packed_train_data", "report_training_faults"]

logger = logging.getLogger(__name__)


def build_train_loader(cfg: CfgNode, mapper, use_packs: bool = True):
    """detectron2's training loader of ``cfg`` with ``mapper``, over the packs of
    ``DATASETS.TRAIN`` when they all have one and ``use_packs`` (:func:`packed_train_data`), else
    over the dataset dicts as detectron2 builds them; the faults of the training data are
    reported (or refused with ``DATASETS.STRICT``) first (:func:`report_training_faults`)."""
    report_training_faults(cfg, cfg.DATASETS.TRAIN)
    dataset, sampler = packed_train_data(cfg) if use_packs else (None, None)
    return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)


def packed_train_data(cfg: CfgNode) -> Tuple[Optional[torchdata.Dataset], Optional[Sampler]]:
    """The training datasets from their packs (:mod:`solo_d2.data.packed`: memory-mapped, shared
    by the processes, no JSON read) and detectron2's sampler of ``DATALOADER.SAMPLER_TRAIN`` over
    them, or (None, None) unless every dataset of ``DATASETS.TRAIN`` has a pack and the sampler
    is one of TrainingSampler, RepeatFactorTrainingSampler, RandomSubsetTrainingSampler.

    As detectron2's ``get_detection_dataset_dicts``: images without a non-crowd annotation are
    left out with ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``, and the class histogram is logged.
    """
    kind = cfg.DATALOADER.SAMPLER_TRAIN
    samplers = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")
    packs = open_packs(cfg.DATASETS.TRAIN) if kind in samplers else None
    if packs is None:
        return None, None
    panoptic = [pack.panoptic for pack in packs]
    if any(panoptic) and (not all(panoptic) or kind == "RepeatFactorTrainingSampler"):
        return None, None  # a mix, or class frequencies of panoptic data: detectron2's path
    if not any(panoptic):  # detectron2 filters and counts dicts with "annotations" only
        packs = _filter_and_count(cfg, packs)
    dataset = packs[0] if len(packs) == 1 else torchdata.ConcatDataset(packs)
    logger.info(
        f"Using training sampler {kind} over {len(dataset)} images mapped from packed datasets"
    )
    if kind == "RepeatFactorTrainingSampler":
        factors = repeat_factors(packs, cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.REPEAT_SQRT)
        return dataset, RepeatFactorTrainingSampler(factors, seed=cfg.SEED)
    if kind == "RandomSubsetTrainingSampler":
        return dataset, RandomSubsetTrainingSampler(
            len(dataset), cfg.DATALOADER.RANDOM_SUBSET_RATIO
        )
    return dataset, TrainingSampler(len(dataset))


def _filter_and_count(cfg: CfgNode, packs: List[PackedDataset]) -> List[PackedDataset]:
    """The packs without images lacking a non-crowd annotation (with
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``); logs the class histogram, as detectron2 does."""
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        before = sum(map(len, packs))
        packs = [pack.with_instances() for pack in packs]
        after = sum(map(len, packs))
        logger.info(f"Removed {before - after} images with no usable annotations. {after} left.")
    classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
    counts = sum(pack.class_histogram(len(classes)) for pack in packs)
    annotations = [{"category_id": c} for c in np.repeat(np.arange(len(classes)), counts).tolist()]
    print_instances_class_histogram([{"annotations": annotations}], classes)  # all images at once
    return packs


def report_training_faults(cfg: CfgNode, names: Iterable[str]) -> None:
    """Log the faults of the training datasets, list them in OUTPUT_DIR; raise when strict."""
    for name in names:
        record = dataset_record(name)
        faults = record.faults if record is not None else ()
        if not faults:
            continue
        if cfg.DATASETS.STRICT:
            raise DatasetError(
                f"Training dataset {name!r} has {len(faults)} faulty annotations or images and "
                f"DATASETS.STRICT is on (set it False to skip them with a warning):\n"
                + summarize_faults(faults)
            )
        listing = os.path.join(cfg.OUTPUT_DIR, f"data_faults_{name}.json")
        if comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            atomic_write_json(listing, [f.to_dict() for f in faults], indent=1, default=str)
        logger.warning(
            f"Training dataset {name!r}: {len(faults)} faulty annotations or images are left "
            f"out (listed in {listing}; DATASETS.STRICT True makes them errors)"
        )
