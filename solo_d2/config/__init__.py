"""SOLO-family configuration: the keys (:func:`add_solo_config`) and loading a config file with
its command-line overrides into a checked detectron2 ``CfgNode`` (:func:`load_config`)."""

from .defaults import add_solo_config
from .loading import ConfigError, check_config, load_config, merge_config_opts

__all__ = ["add_solo_config", "ConfigError", "load_config", "merge_config_opts", "check_config"]
