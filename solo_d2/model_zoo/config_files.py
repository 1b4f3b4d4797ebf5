"""The configs of solo_d2's model zoo, by name: where they are (:func:`configs_dir`), their
names, and resolving a name or a path as ``--config-file`` does."""

import difflib
import os
from pathlib import Path
from typing import List, Sequence

from ..config import ConfigError

__all__ = [
    "configs_dir",
    "config_names",
    "config_stem",
    "close_names",
    "get_config_file",
    "resolve_config_file",
]

# configs/ inside the installed package (copied there when the wheel is built, see setup.py)
_PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
# configs/ at the top of a source checkout (also what an editable install reads)
_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def configs_dir() -> Path:
    """The folder of the shipped configs: the package's ``model_zoo/configs`` in an installed
    wheel, else the top-level ``configs/`` of the source checkout solo_d2 is imported from.

    Raises:
        FileNotFoundError: neither exists (a broken install).
    """
    if _PACKAGE_CONFIGS.is_dir():
        return _PACKAGE_CONFIGS
    checkout = _CHECKOUT_ROOT / "configs"
    if checkout.is_dir() and (_CHECKOUT_ROOT / "setup.py").is_file():
        return checkout
    raise FileNotFoundError(
        f"solo_d2's configs are missing: neither {_PACKAGE_CONFIGS} (installed package) nor "
        f"{checkout} (source checkout) exists; reinstall solo_d2"
    )


def config_names() -> List[str]:
    """Every config name of the model zoo ("SOLOv2_R50_3x", ..., the ``Base-*`` ones too)."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def config_stem(name: str) -> str:
    """``name`` without a ``.yaml`` suffix."""
    return name[: -len(".yaml")] if name.endswith(".yaml") else name


def close_names(name: str, names: Sequence[str]) -> List[str]:
    """Up to three of ``names`` close to ``name``, ignoring case."""
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(config_stem(name).lower(), list(by_lower), n=3, cutoff=0.6)
    return [by_lower[c] for c in close]


def _names_hint(name: str) -> str:
    close = close_names(name, config_names())
    if close:
        return "close names: " + ", ".join(close)
    return "solo_d2.model_zoo.config_names() lists them, e.g. SOLOv2_R50_3x"


def get_config_file(name: str) -> str:
    """The path of the config ``name`` ("SOLOv2_R50_3x" or "SOLOv2_R50_3x.yaml").

    Raises:
        ConfigError: no config has that name (the message names the close ones).
    """
    stem = config_stem(name)
    path = configs_dir() / f"{stem}.yaml"
    if stem and "/" not in stem and "\\" not in stem and path.is_file():
        return str(path)
    raise ConfigError(f"{name!r} is not a config of the solo_d2 model zoo; {_names_hint(name)}")


def resolve_config_file(name_or_path: str) -> str:
    """``name_or_path`` when it is a file, else the model zoo config of that name (also for
    ``configs/NAME.yaml`` given outside a checkout): what ``--config-file`` accepts.

    Raises:
        ConfigError: neither a file nor a config name (one line, with close names).
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    path = Path(name_or_path)
    if name_or_path and (len(path.parts) == 1 or path.parent.name == "configs"):
        try:
            return get_config_file(path.name)
        except ConfigError:
            pass
    hint = f"; {_names_hint(path.name)}" if name_or_path else ""
    raise ConfigError(
        f"config file {name_or_path} does not exist and is not a model zoo config name{hint}"
    )
