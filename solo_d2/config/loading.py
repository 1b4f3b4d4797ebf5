"""Loading configs: every mistake becomes a one-line :class:`ConfigError`.

:func:`load_config` merges a YAML file and ``KEY VALUE`` overrides into detectron2's config with
the SOLO keys. Checking what a config names (datasets, their class count, the weights file) is
the entry points' preflight, :func:`solo_d2.engine.preflight.check_config`.
"""

import difflib
import os
from typing import List, Sequence

import yaml
from detectron2.config import CfgNode, get_cfg

from .defaults import add_solo_config

__all__ = ["ConfigError", "load_config", "merge_config_opts"]


class ConfigError(ValueError):
    """A config that cannot work; the message is one line saying what to change."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _config_keys(cfg: CfgNode, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        keys += _config_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [prefix + k]
    return keys


# Keys that were removed, with what to write instead.
REMOVED_KEYS = {
    "MODEL.SOLO.PANOPTIC.ENABLED": (
        'a panoptic model is now MODEL.META_ARCHITECTURE "PanopticSOLO": write that instead '
        "(and delete the key)"
    ),
}


def _unknown_key_error(source: str, key: str, cfg: CfgNode) -> ConfigError:
    if key in REMOVED_KEYS:
        return ConfigError(f"{source}: config key {key} was removed; {REMOVED_KEYS[key]}")
    close = difflib.get_close_matches(key, _config_keys(cfg), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{source}: config key {key} does not exist{hint}")


def merge_config_opts(cfg: CfgNode, opts: Sequence[str], source: str = "command line") -> None:
    """Merge KEY VALUE ``opts`` into ``cfg``.

    Raises:
        ConfigError: a key does not exist (with the closest existing key suggested), a value has
            the wrong type, or ``opts`` is not a list of KEY VALUE pairs.
    """
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"{source}: config overrides must be KEY VALUE pairs, got {opts}")
    for key, value in zip(opts[::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except AssertionError as e:  # "Non-existent key: A.B"
            if "Non-existent key" in str(e):
                raise _unknown_key_error(source, key, cfg) from None
            raise ConfigError(f"{source}: {key} {value}: {_one_line(e)}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{source}: {key} {value}: {_one_line(e)}") from None


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2's config with the SOLO keys, ``config_file`` and ``opts`` merged (not frozen).

    Raises:
        ConfigError: the file is missing or not valid YAML, a key does not exist (with the
            closest existing key suggested), a value has the wrong type, or ``opts`` is not a
            list of KEY VALUE pairs.
    """
    cfg = get_cfg()
    add_solo_config(cfg)
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:  # "Non-existent config key: A.B"
        key = str(e.args[0]).rsplit(":", 1)[-1].strip()
        raise _unknown_key_error(f"config file {config_file}", key, cfg) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {config_file} is not valid YAML: {_one_line(e)}") from None
    except (OSError, ValueError, AssertionError, TypeError) as e:  # a missing _BASE_, bad types
        raise ConfigError(f"config file {config_file}: {_one_line(e)}") from None
    merge_config_opts(cfg, opts)
    return cfg
