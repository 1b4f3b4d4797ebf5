"""SOLO-family configuration: the keys (:func:`add_solo_config`) and loading a config file with
its command-line overrides into a detectron2 ``CfgNode`` (:func:`load_config`).

This layer depends on detectron2's config alone; checking a config against the registered
datasets and files is :func:`solo_d2.engine.preflight.check_config`."""

from .defaults import DEFAULT_MAX_IMAGE_PIXELS, add_solo_config
from .loading import ConfigError, load_config, merge_config_opts

__all__ = [
    "add_solo_config",
    "ConfigError",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "load_config",
    "merge_config_opts",
]
