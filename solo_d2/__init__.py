"""solo_d2: the SOLO family of instance segmentation models for Detectron2.

``import solo_d2`` is light (detectron2's config only). The models register with detectron2's
registries when :mod:`solo_d2.modeling` is first imported: by :func:`add_solo_config` below, by
``solo_d2.SOLO`` / ``solo_d2.model_zoo`` / ``solo_d2.engine``, or by importing it directly.
"""

from . import config as _config

__all__ = ["add_solo_config", "SOLO", "SOLOv2", "mask_target_strides"]
__version__ = "0.1.0"

# Names served from solo_d2.modeling on first access (PEP 562), so that importing the package or
# its config layer does not load the models (and with them pycocotools).
_MODELING_NAMES = ("SOLO", "SOLOv2", "mask_target_strides")


def add_solo_config(cfg) -> None:
    """Add the SOLO-family keys to a detectron2 config (:func:`solo_d2.config.add_solo_config`)
    and register the SOLO models, so that detectron2's ``build_model(cfg)`` and
    ``DefaultPredictor(cfg)`` find ``MODEL.META_ARCHITECTURE: "SOLO"``."""
    from . import modeling  # noqa: F401  (registers the META_ARCH, backbone and heads)

    _config.add_solo_config(cfg)


def __getattr__(name: str):
    if name in _MODELING_NAMES:
        from . import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'solo_d2' has no attribute {name!r}")
