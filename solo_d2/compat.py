"""The only module of solo_d2 that relies on private parts of detectron2.

Everything else in solo_d2 extends detectron2 and fvcore through their public API (subclasses
that call ``super().__init__``, public methods, hooks and attributes);
``tests/test_public_api.py`` enforces it. What is here could not be done that way:

* :func:`distributed_worker` and :func:`find_free_port`: the worker entry point of
  ``detectron2.engine.launch`` (process group, local process group, device) and its free-port
  helper of ``dist_url="auto"``, which :func:`solo_d2.engine.launch` needs to start the same
  workers while it watches them (detectron2's ``launch`` joins them and cannot forward signals).
* :func:`default_trainer_ddp`: ``DefaultTrainer.__init__`` wraps the model with the
  module-level ``create_ddp_model`` of ``detectron2.engine.defaults``, which always passes
  ``device_ids=[local_rank]``; DistributedDataParallel rejects device ids for a CPU module.
  Around ``DefaultTrainer.__init__``, :class:`solo_d2.engine.Trainer` binds that name to
  :func:`solo_d2.engine.create_ddp_model` (no device ids for a CPU model), then restores it.
* :func:`release_process_groups`: the process groups that ``detectron2.utils.comm`` keeps (its
  module field ``_LOCAL_PROCESS_GROUP`` and the ``lru_cache`` of ``create_local_process_group``
  and ``_get_global_gloo_group``), dropped once the groups are destroyed so that they are freed
  while the interpreter is alive (see the function).
* :func:`import_compiled_ops`: the private extension module ``detectron2._C``, whose presence
  tells whether detectron2's deformable-convolution kernels can be used.
* :func:`set_coco_ground_truth`: the ``_coco_api`` field of detectron2's ``COCOEvaluator``, the
  ground truth it evaluates against (replaced by the checked one: faulty annotations left out).
* :func:`panoptic_predictions`: the ``_predictions`` field of ``COCOPanopticEvaluator``, what its
  ``process`` recorded (the evaluator's own ``evaluate`` cannot be restricted to the dataset's
  images).

Upstream version mirrored: detectron2 0.7.2, as installed by ``tools/setup_env.py`` (PyPI
``sal-detectron2==0.7.2``, its Python sources; from GitHub it builds commit
02b5c4e295e990042a714712c21dc79b731e8833). :data:`UPSTREAM_SOURCES` records the sha256 of the
source of each upstream function relied on here; ``tests/test_compat.py`` fails when one of them
changes, so that a new detectron2 is checked before it is used.
"""

import contextlib
import gc
import hashlib
import importlib
import inspect
from types import ModuleType
from typing import Any, Callable, Dict, Iterator

__all__ = [
    "DETECTRON2_VERSION",
    "DETECTRON2_COMMIT",
    "PRIVATE_FIELDS",
    "UPSTREAM_SOURCES",
    "default_trainer_ddp",
    "distributed_worker",
    "find_free_port",
    "import_compiled_ops",
    "panoptic_predictions",
    "release_process_groups",
    "set_coco_ground_truth",
    "source_sha256",
    "upstream_objects",
]

DETECTRON2_VERSION = "0.7.2"
DETECTRON2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"

# the modules themselves (the attribute "launch" of detectron2.engine is the function)
d2_defaults = importlib.import_module("detectron2.engine.defaults")
d2_launch = importlib.import_module("detectron2.engine.launch")
d2_comm = importlib.import_module("detectron2.utils.comm")

# detectron2.engine.launch's private helpers, used as they are
distributed_worker = d2_launch._distributed_worker
find_free_port = d2_launch._find_free_port

# "module:qualified name" of each upstream function relied on -> sha256 of its source. The
# functions that read or write the private fields used here are included.
UPSTREAM_SOURCES: Dict[str, str] = {
    "detectron2.engine.launch:_distributed_worker": (
        "9175817ff3137f6e71ff8505d54d2916b704854a34b51273e619fe08fb94f822"
    ),
    "detectron2.engine.launch:_find_free_port": (
        "e3e7e88d8c4596fb9079c4e13a2cb8c9c4c3ab34adc843ab398363c4c810fbc0"
    ),
    "detectron2.utils.comm:create_local_process_group": (
        "0b26371ed1013153b9f661f118d832d848e7b44645b799736674dda714ef2f46"
    ),
    "detectron2.utils.comm:_get_global_gloo_group": (
        "c62229e4d6b12d6b3076c13388d6a3a1715f0f9945e74b74d7b602b1cfe6a9e8"
    ),
    "detectron2.engine.defaults:create_ddp_model": (
        "cb051eec11776c79ddfffb13dfc2523c607a3db5500125b8a84e0ba4f5e31e26"
    ),
    "detectron2.engine.defaults:DefaultTrainer.__init__": (
        "d7a2d8646201904756a9ea89a504933a9dacff5a923192368c757a31b0999b05"
    ),
    "detectron2.evaluation.coco_evaluation:COCOEvaluator.__init__": (
        "00c6fc73dbf326743f2a0236931e17c0f776423a0a59c28d70c788e776e807e1"
    ),
    "detectron2.evaluation.coco_evaluation:COCOEvaluator._eval_predictions": (
        "af889c28df2ab0c90f268bd8fef91bfbdf83cc4fe75cec5f4f487dfb99bbc6d5"
    ),
    "detectron2.evaluation.panoptic_evaluation:COCOPanopticEvaluator.reset": (
        "8b9dbda135985dd111ada2c2f035f6abf8d09d4e47df7a8dab526e511951cdc5"
    ),
    "detectron2.evaluation.panoptic_evaluation:COCOPanopticEvaluator.process": (
        "2cc93bca2dddeb87ec38b4511bf1f343ffbd8ea900a1a0724845b9715ebeb93d"
    ),
}

# private fields read or written here: (module:class, field, methods of it that use the field)
PRIVATE_FIELDS = (
    (
        "detectron2.evaluation.coco_evaluation:COCOEvaluator",
        "_coco_api",
        ("__init__", "_eval_predictions"),
    ),
    (
        "detectron2.evaluation.panoptic_evaluation:COCOPanopticEvaluator",
        "_predictions",
        ("reset", "process"),
    ),
)


def upstream_objects() -> Dict[str, Callable]:
    """The upstream function of each key of :data:`UPSTREAM_SOURCES`."""
    objects = {}
    for key in UPSTREAM_SOURCES:
        module_name, qualname = key.split(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        objects[key] = obj
    return objects


def source_sha256(obj: Callable) -> str:
    """sha256 of ``inspect.getsource(obj)``."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()


@contextlib.contextmanager
def default_trainer_ddp(create_ddp_model: Callable) -> Iterator[None]:
    """Within the block, ``DefaultTrainer.__init__`` wraps the model with ``create_ddp_model``
    (same arguments as detectron2's) instead of detectron2's; restored afterwards."""
    previous = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = previous


def release_process_groups() -> None:
    """Drop ``detectron2.utils.comm``'s references to the process groups (the local group and the
    cached Gloo group), after ``torch.distributed.destroy_process_group()``, and free them now.

    Kept, they are freed only while the interpreter shuts down, where a Gloo group's threads can
    end the process with "terminate called without an active exception" (SIGABRT, exit -6)
    instead of its own status: measured under torchrun, 5 of 35 two-rank runs that exited right
    after the destroy, none of 45 with this. Afterwards ``comm.create_local_process_group`` can
    be called again (a new process group in the same process).
    """
    d2_comm.create_local_process_group.cache_clear()
    d2_comm._get_global_gloo_group.cache_clear()
    d2_comm._LOCAL_PROCESS_GROUP = None
    gc.collect()


def import_compiled_ops() -> ModuleType:
    """detectron2's compiled extension ``detectron2._C`` (deformable convolution kernels, ...);
    ImportError when detectron2 was installed without it."""
    return importlib.import_module("detectron2._C")


def set_coco_ground_truth(evaluator, coco_api) -> None:
    """Make ``evaluator`` evaluate against ``coco_api`` (a ``pycocotools.coco.COCO``)."""
    evaluator._coco_api = coco_api


def panoptic_predictions(evaluator) -> list:
    """The predictions ``evaluator.process`` recorded since its last ``reset`` (dicts with
    "image_id", "file_name", "png_string", "segments_info")."""
    return evaluator._predictions
