"""solo_d2's model zoo, in the convention of ``detectron2.model_zoo``: the published configs by
name and the published checkpoints of the SOLO family.

    from solo_d2 import model_zoo
    model = model_zoo.get("SOLOv2_R50_3x", trained=True)   # AdelaiDet's COCO model, eval mode
    cfg = model_zoo.get_config("SOLOv2_R18_quickstart_shapes")
    path = model_zoo.get_config_file("SOLOv2_R50_3x")

The configs ship inside the package (``solo_d2/model_zoo/configs/``, copied from the repository's
top-level ``configs/`` when the wheel is built); a source checkout or an editable install reads
the top-level ``configs/`` folder itself.
"""

from .config_files import config_names, configs_dir, get_config_file, resolve_config_file
from .model_zoo import (
    CHECKPOINTS,
    ChecksumError,
    PublishedCheckpoint,
    checkpoint_file,
    get,
    get_config,
    published_checkpoint,
)

__all__ = [
    "CHECKPOINTS",
    "ChecksumError",
    "PublishedCheckpoint",
    "checkpoint_file",
    "config_names",
    "configs_dir",
    "get",
    "get_config",
    "get_config_file",
    "published_checkpoint",
    "resolve_config_file",
]
