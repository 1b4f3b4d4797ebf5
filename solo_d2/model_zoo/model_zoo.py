"""The configs of solo_d2 by name, and one table of every published checkpoint of the SOLO family.

Config names are the file names of the configs without ``.yaml`` ("SOLOv2_R50_3x"). Checkpoints
are downloaded through detectron2's ``PathManager`` (iopath's cache: ``$FVCORE_CACHE`` or
``~/.torch/iopath_cache``), checked against their published sha256 where one is known, and read
by the weights-only loaders of :mod:`solo_d2.checkpoint` (nothing in them runs).
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse

import torch
import yaml
from detectron2.config import CfgNode
from detectron2.utils.file_io import PathManager

from ..config import ConfigError, load_config, merge_config_opts
from ..engine.predictor import load_model
from .config_files import close_names, config_stem, get_config_file
from .official import convert

__all__ = [
    "CHECKPOINTS",
    "ChecksumError",
    "PublishedCheckpoint",
    "checkpoint_file",
    "get",
    "get_config",
    "published_checkpoint",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedCheckpoint:
    """One published checkpoint and the config of its model."""

    config: str  # config name in this model zoo
    source: str  # "adelaidet": loads as it is; "official": converted by model_zoo.official
    url: str
    sha256: Optional[str]  # None: no checksum published, the download is not verified


_ADELAIDET = "https://huggingface.co/ZjuCv/AdelaiDet/resolve/main/"
_OFFICIAL = "https://huggingface.co/xinlongwang/SOLO/resolve/main/"


def _official(config: str, file: str, sha256: Optional[str]) -> PublishedCheckpoint:
    return PublishedCheckpoint(config, "official", _OFFICIAL + file, sha256)


# Every published checkpoint. The model-zoo tables of aim-uofa/AdelaiDet (configs/SOLOv2) and
# WXinlong/SOLO link to AARNet CloudStor, which closed in 2023; the same files are on the Hugging
# Face hub: AdelaiDet's in the ZjuCv/AdelaiDet mirror, the official ones uploaded by their author
# (xinlongwang/SOLO). The sha256 values are the hub's Git LFS object ids of those files. Where a
# config has several checkpoints, the first one is the default.
CHECKPOINTS: Tuple[PublishedCheckpoint, ...] = (
    PublishedCheckpoint(
        "SOLOv2_R50_3x",
        "adelaidet",
        _ADELAIDET + "SOLOv2_R50_3x.pth",
        "361eb419f4398c7d7ef1292c007b767746c01a277a3b5393de84f05cdacf1d05",
    ),
    PublishedCheckpoint(
        "SOLOv2_R101_3x",
        "adelaidet",
        _ADELAIDET + "SOLOv2_R101_3x.pth",
        "689b8ce6dd82b3a1a2f8f146266e88e8e807bffaf5def04d2fd886b4a8f71aa9",
    ),
    _official("SOLO_R50_1x", "SOLO_R50_1x.pth", None),
    _official("SOLO_R50_3x", "SOLO_R50_3x.pth", None),
    _official("SOLO_R101_3x", "SOLO_R101_3x.pth", None),
    _official(
        "Decoupled_SOLO_R50_1x",
        "DECOUPLED_SOLO_R50_1x.pth",
        "79308c6d6c9d08a45f66cc65fbc1e4bbbfe109534ec71f4dd2f512f7b31d877d",
    ),
    _official(
        "Decoupled_SOLO_R50_3x",
        "DECOUPLED_SOLO_R50_3x.pth",
        "57ae7529291e7b6c87d847692084a7cd64dfd56f80fc3b6733758bbd81b21180",
    ),
    _official(
        "Decoupled_SOLO_R101_3x",
        "DECOUPLED_SOLO_R101_3x.pth",
        "711049ff1e5280e8a6b2d96cb09cfe7f76308192650cdcd751954aa709d661cc",
    ),
    _official(
        "Decoupled_SOLO_Light_R50_3x",
        "DECOUPLED_SOLO_LIGHT_R50_3x.pth",
        "185aa3aae847366013a89b80857306f28c49a45608c1345d2cdc84477f7dd18e",
    ),
    _official(
        "Decoupled_SOLO_Light_DCN_R50_3x",
        "DECOUPLED_SOLO_LIGHT_DCN_R50_3x.pth",
        "d2a231ceca5cd4f0552774e7d941859e51ca59ebf6b29055aafaec5aec2071b5",
    ),
    _official(
        "SOLOv2_R50_1x",
        "SOLOv2_R50_1x.pth",
        "17e10fe2198665c573b363c504a1547e6a917e22fa94e926d7f8646432d8a506",
    ),
    _official(
        "SOLOv2_R50_3x",
        "SOLOv2_R50_3x.pth",
        "659975203266ca2d00167790796fde961d09930c01124377d3ee3a8be3a3a660",
    ),
    _official(
        "SOLOv2_R101_3x",
        "SOLOv2_R101_3x.pth",
        "7126c25eee6575ef405fc689b46510493b4dc991ebf758a12645109ed906c55f",
    ),
    _official(
        "SOLOv2_R101_DCN_3x",
        "SOLOv2_R101_DCN_3x.pth",
        "3cd436711e57047bf00a733fb606262097b4eff7121d3251305aeab3ccc249c5",
    ),
    _official(
        "SOLOv2_X101_DCN_3x",
        "SOLOv2_X101_DCN_3x.pth",
        "e0ef1edcb04d4e468b5bd7cc63d8de4d8267402ee180679c6c0ddbeda51f7d46",
    ),
    _official(
        "SOLOv2_Light_448_R18_3x",
        "SOLOv2_LIGHT_448_R18_3x.pth",
        "4f89669be79143566e02bdc51428fc10c83a3974a53326fcae1cf7e336dc6997",
    ),
    _official(
        "SOLOv2_Light_448_R34_3x",
        "SOLOv2_LIGHT_448_R34_3x.pth",
        "9243f7b9e64e4ae0a77517fed392a7f170ab3e5cad7028caa7b062c34d87d3c5",
    ),
    _official("SOLOv2_Light_448_R50_3x", "SOLOv2_LIGHT_448_R50_3x.pth", None),
    _official("SOLOv2_Light_512_DCN_R50_3x", "SOLOv2_LIGHT_512_DCN_R50_3x.pth", None),
)


class ChecksumError(ValueError):
    """A downloaded checkpoint whose sha256 is not the published one."""


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def published_checkpoint(name: str, source: Optional[str] = None) -> PublishedCheckpoint:
    """The entry of :data:`CHECKPOINTS` for the config ``name``: its first one, or the one from
    ``source`` ("adelaidet" or "official").

    Raises:
        ConfigError: no checkpoint of that config (and source) is published.
    """
    stem = config_stem(name)
    found = [c for c in CHECKPOINTS if c.config == stem and source in (None, c.source)]
    if found:
        return found[0]
    published = sorted({c.config for c in CHECKPOINTS})
    what = f"{stem!r} from {source!r}" if source else repr(stem)
    close = [] if stem in published else close_names(stem, published)
    hint = "close names: " + ", ".join(close) if close else "published: " + ", ".join(published)
    raise ConfigError(f"no published checkpoint of {what}; {hint}")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(ckpt: PublishedCheckpoint) -> str:
    """The local file of ``ckpt.url`` (``file://`` URLs as they are, others through iopath's
    cache).

    Raises:
        OSError: it cannot be downloaded or does not exist (one line).
    """
    if ckpt.url.startswith("file://"):
        local = unquote(urlparse(ckpt.url).path)
    else:
        try:
            local = PathManager.get_local_path(ckpt.url)
        except Exception as e:  # urllib, http and iopath errors alike
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise OSError(
                f"{ckpt.config}: {ckpt.url} could not be downloaded ({reason}); download it "
                "yourself and pass the file as MODEL.WEIGHTS"
            ) from None
    if not os.path.isfile(local):
        raise OSError(f"{ckpt.config}: checkpoint file {local} does not exist")
    return local


def _verify(ckpt: PublishedCheckpoint, local: str) -> None:
    """Check ``local`` against ``ckpt.sha256``; without one, log that it is not verified.

    Raises:
        ChecksumError: the checksums differ.
    """
    if ckpt.sha256 is None:
        logger.info(f"{ckpt.config} ({ckpt.source}): checksum not published, {local} not verified")
        return
    digest = _sha256(local)
    if digest != ckpt.sha256.lower():
        raise ChecksumError(
            f"{local}: sha256 {digest} is not the published {ckpt.sha256} of {ckpt.url}; "
            "delete the file and download it again"
        )
    logger.info(f"{ckpt.config} ({ckpt.source}): {local} matches the published sha256")


def checkpoint_file(name: str, source: Optional[str] = None) -> str:
    """The published checkpoint of the config ``name`` (see :func:`published_checkpoint`) as a
    local file: downloaded once into iopath's cache and checked against its sha256. Official
    checkpoints are returned as published (mmdetection layout; :func:`get_config` converts).

    Raises:
        ConfigError: nothing is published for ``name``. OSError: the download failed.
        ChecksumError: the file is not the published one.
    """
    ckpt = published_checkpoint(name, source)
    local = _download(ckpt)
    _verify(ckpt, local)
    return local


def _converted_config(src: Path, config_file: str) -> str:
    """The config written by the official converter for the checkpoint ``src`` (converted once,
    next to it: ``<stem>.solo_d2.pth`` and ``<stem>.solo_d2.yaml``, ``_BASE_`` ``config_file``).
    """
    dst = src.with_name(f"{src.stem}.solo_d2.pth")
    yaml_path = dst.with_suffix(".yaml")
    base = str(Path(config_file).resolve())
    fresh = (
        dst.is_file()
        and yaml_path.is_file()
        and dst.stat().st_mtime >= src.stat().st_mtime
        and (yaml.safe_load(yaml_path.read_text()) or {}).get("_BASE_") == base
    )
    if not fresh:
        convert(src, dst, config=Path(config_file), log=logger.info)
    return str(yaml_path)


# --------------------------------------------------------------------------------------------
# configs and models, as detectron2.model_zoo gives them
# --------------------------------------------------------------------------------------------


def get_config(
    name: str,
    trained: bool = False,
    opts: Sequence[str] = (),
    source: Optional[str] = None,
) -> CfgNode:
    """The config ``name`` loaded by :func:`solo_d2.config.load_config`, ``opts`` (KEY VALUE
    overrides) merged last.

    With ``trained=True``, MODEL.WEIGHTS is the published checkpoint (:func:`checkpoint_file`:
    downloaded once, checksum verified). AdelaiDet's checkpoints load as they are; an official
    one is converted once by :func:`solo_d2.model_zoo.official.convert`, and the config is the
    converter's (the official input convention, RGB with ImageNet mean/std, over ``name``).

    Raises:
        ConfigError: unknown name, no published checkpoint, a bad override. OSError,
            ChecksumError: see :func:`checkpoint_file`.
    """
    config_file = get_config_file(name)
    if not trained:
        return load_config(config_file, opts)
    local = checkpoint_file(name, source)
    if published_checkpoint(name, source).source == "official":
        return load_config(_converted_config(Path(local), config_file), opts)
    cfg = load_config(config_file)
    cfg.MODEL.WEIGHTS = local
    merge_config_opts(cfg, opts)
    return cfg


def get(
    name: str,
    trained: bool = False,
    device: Optional[str] = None,
    opts: Sequence[str] = (),
    source: Optional[str] = None,
) -> torch.nn.Module:
    """The model of the config ``name`` (:func:`get_config`) in eval mode, built and loaded by
    :func:`solo_d2.engine.load_model` (weights that do not fit are an error).

    Args:
        trained: load the published checkpoint (else the weights are randomly initialised and
            nothing is downloaded).
        device: where the model goes ("cpu", "cuda", ...); default: the config's MODEL.DEVICE,
            or the CPU when it asks for CUDA and none is available.
        opts: KEY VALUE config overrides.
        source: which published checkpoint ("adelaidet" or "official"); default: the first.
    """
    cfg = get_config(name, trained=trained, opts=opts, source=source)
    if device is None and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    model, _ = load_model(cfg, weights=None if trained else "", device=device)
    return model
