"""Checkpoints of the official SOLO repository (WXinlong/SOLO, mmdetection v1) for solo_d2.

The official SOLO, Decoupled SOLO, Decoupled SOLO light (DCN) and SOLOv2 (DCN, light)
checkpoints (mmcv format ``{"meta", "state_dict"}``) and torchvision-style ImageNet ResNet/ResNeXt
state dicts (``conv1.weight``, ``layer1.0...``, ``fc.*``) are converted key by key to this
project's layout: torchvision ResNet -> detectron2 ResNet (``layerN`` -> ``res{N+1}``, ``bnK`` ->
``convK.norm``, ``downsample`` -> ``shortcut``, DCN ``conv2.conv_offset`` -> ``conv2_offset``),
``neck`` -> ``backbone.fpn_*``, ``bbox_head`` -> ``ins_head`` towers (``{name}.{i}.conv`` ->
``.{3i}``, ``.gn`` -> ``.{3i+1}``) and predictions, ``mask_feat_head`` -> ``mask_head``. Class
channels and coordinate channels are in the same order in both, so no tensor is permuted.
BatchNorm's ``num_batches_tracked`` and an ImageNet classifier (``fc``) are dropped; any other key
that matches no rule makes the conversion fail.

The architecture is read off the converted tensors (head, towers, channels, grids, DCN) as config
settings; with the official input convention, which differs from detectron2's MSRA backbones
(RGB input, ImageNet mean/std normalisation, stride in the 3x3 conv: :data:`RGB_SETTINGS`), they
make the config the weights need. :func:`convert` does it all and checks that the model of that
config loads the weights with no missing, unexpected or misshapen tensor.
"""

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode

from ..checkpoint.safe_load import UnsafeCheckpointError, load_torch_file
from ..config import load_config
from .config_files import configs_dir as model_zoo_configs_dir

__all__ = [
    "RGB_SETTINGS",
    "Conversion",
    "ConversionError",
    "convert",
    "convert_key",
    "convert_state_dict",
    "infer_settings",
    "load_official",
    "loading_problems",
    "matching_configs",
    "settings_config",
    "write_yaml",
]

logger = logging.getLogger(__name__)

# the official models' input convention (torchvision ImageNet backbones, mmdet img_norm_cfg)
RGB_SETTINGS = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}

# bbox_head tower name -> this project's tower name
_TOWERS = {
    "cate_convs": "cate_tower",
    "kernel_convs": "kernel_tower",
    "ins_convs": "mask_tower",
    "ins_convs_x": "mask_tower_x",
    "ins_convs_y": "mask_tower_y",
}
# bbox_head prediction convs -> this project's
_PREDS = {
    "solo_cate": "cate_pred",
    "dsolo_cate": "cate_pred",
    "solo_kernel": "kernel_pred",
    "solo_ins_list": "mask_preds",
    "dsolo_ins_list_x": "mask_preds_x",
    "dsolo_ins_list_y": "mask_preds_y",
}
_PRED_LISTS = ("solo_ins_list", "dsolo_ins_list_x", "dsolo_ins_list_y")
_BASIC_BLOCKS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
_BOTTLENECK_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}

StateDict = Dict[str, torch.Tensor]


class ConversionError(Exception):
    """A checkpoint that cannot be converted; nothing was written."""


# --------------------------------------------------------------------------------------------
# key mapping
# --------------------------------------------------------------------------------------------


def _backbone_key(rest: str) -> Optional[str]:
    """torchvision ResNet name (after ``backbone.``) -> detectron2 name (after ``bottom_up.``)."""
    m = re.fullmatch(r"(conv1\.weight)|bn1\.(weight|bias|running_mean|running_var)", rest)
    if m:
        return "stem.conv1.weight" if m.group(1) else f"stem.conv1.norm.{m.group(2)}"
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", rest)
    if not m:
        return None
    stage, block, tail = int(m.group(1)) + 1, m.group(2), m.group(3)
    prefix = f"res{stage}.{block}."
    rules = [
        (r"conv([1-3])\.weight", lambda g: f"conv{g[0]}.weight"),
        (r"bn([1-3])\.(weight|bias|running_mean|running_var)", lambda g: f"conv{g[0]}.norm.{g[1]}"),
        (r"downsample\.0\.weight", lambda g: "shortcut.weight"),
        (
            r"downsample\.1\.(weight|bias|running_mean|running_var)",
            lambda g: f"shortcut.norm.{g[0]}",
        ),
        (r"conv2\.conv_offset\.(weight|bias)", lambda g: f"conv2_offset.{g[0]}"),  # DCN
    ]
    for pattern, new in rules:
        m = re.fullmatch(pattern, tail)
        if m:
            return prefix + new(m.groups())
    return None


def _conv_module_key(conv: str, norm: str, tail: str) -> Optional[str]:
    """An mmcv ConvModule's ``conv.weight`` / ``conv.conv_offset.*`` / ``gn.*`` renamed under the
    prefixes ``conv`` (the convolution) and ``norm`` (its GroupNorm)."""
    if tail == "conv.weight":
        return f"{conv}.weight"
    m = re.fullmatch(r"conv\.conv_offset\.(weight|bias)", tail)
    if m:
        return f"{conv}.conv_offset.{m.group(1)}"
    m = re.fullmatch(r"gn\.(weight|bias)", tail)
    if m:
        return f"{norm}.{m.group(1)}"
    return None


def _tower_key(tower: str, i: int, tail: str) -> Optional[str]:
    """``{i}.conv.weight`` / ``{i}.conv.conv_offset.*`` / ``{i}.gn.*`` of a ConvModule list:
    this project's towers are flat Sequentials of (conv, GroupNorm, ReLU) per ConvModule."""
    return _conv_module_key(f"{tower}.{3 * i}", f"{tower}.{3 * i + 1}", tail)


def _mask_feat_key(rest: str) -> Optional[str]:
    """``mask_feat_head.`` names -> ``mask_head.`` names."""
    m = re.fullmatch(r"convs_all_levels\.(\d+)\.conv(\d+)\.(.+)", rest)
    if m:
        base, tail = f"convs_all_levels.{m.group(1)}.conv{m.group(2)}", m.group(3)
    else:
        m = re.fullmatch(r"conv_pred\.0\.(.+)", rest)
        if not m:
            return None
        base, tail = "conv_pred", m.group(1)
    return _conv_module_key(f"{base}.0", f"{base}.1", tail)


def convert_key(key: str) -> Optional[str]:
    """This project's name for an official key, or None when no rule matches."""
    if key.startswith("backbone."):
        new = _backbone_key(key[len("backbone.") :])
        return None if new is None else "backbone.bottom_up." + new
    m = re.fullmatch(r"neck\.(lateral_convs|fpn_convs)\.([0-3])\.conv\.(weight|bias)", key)
    if m:
        kind = "fpn_lateral" if m.group(1) == "lateral_convs" else "fpn_output"
        return f"backbone.{kind}{int(m.group(2)) + 2}.{m.group(3)}"
    m = re.fullmatch(r"bbox_head\.(\w+?)\.(\d+)\.(.+)", key)
    if m and m.group(1) in _TOWERS:
        new = _tower_key(_TOWERS[m.group(1)], int(m.group(2)), m.group(3))
        return None if new is None else "ins_head." + new
    m = re.fullmatch(r"bbox_head\.(\w+?)\.(?:(\d+)\.)?(weight|bias)", key)
    if m and m.group(1) in _PREDS:
        level = f".{m.group(2)}" if m.group(2) is not None else ""
        if (m.group(1) in _PRED_LISTS) == (m.group(2) is not None):
            return f"ins_head.{_PREDS[m.group(1)]}{level}.{m.group(3)}"
        return None
    if key.startswith("mask_feat_head."):
        new = _mask_feat_key(key[len("mask_feat_head.") :])
        return None if new is None else "mask_head." + new
    return None


def _dropped(key: str, backbone_only: bool) -> bool:
    if key.endswith("num_batches_tracked"):
        return True
    return backbone_only and re.fullmatch(r"(backbone\.)?fc\.(weight|bias)", key) is not None


def convert_state_dict(state: StateDict) -> Tuple[StateDict, List[str], List[str]]:
    """Rename every tensor of an official state dict (``module.`` prefixes of DataParallel and
    the ``backbone.`` prefix a bare ImageNet ResNet lacks are handled).

    Returns:
        converted state dict, dropped keys, unmapped keys (the conversion failed if any).
    Raises:
        ConversionError: two keys map to the same name.
    """
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    backbone_only = not any(k.startswith(("bbox_head.", "neck.")) for k in state)
    if backbone_only and not any(k.startswith("backbone.") for k in state):
        state = {"backbone." + k: v for k, v in state.items()}  # a bare ImageNet ResNet
    out, dropped, unmapped = OrderedDict(), [], []
    for key, value in state.items():
        if _dropped(key, backbone_only):
            dropped.append(key)
            continue
        new = convert_key(key)
        if new is None:
            unmapped.append(key)
        elif new in out:
            raise ConversionError(f"two keys map to {new}: check {key}")
        else:
            out[new] = value
    return out, dropped, unmapped


# --------------------------------------------------------------------------------------------
# architecture read off the converted tensors
# --------------------------------------------------------------------------------------------


def _dcn_type(offset: torch.Tensor) -> str:
    """The deformable conv type of an offset conv's (P * K * K, C, K, K) weight: "DCN" (P = 2
    offsets per kernel point) or "DCNv2" (P = 3: offsets and a modulation mask)."""
    per_point = offset.shape[0] // (offset.shape[2] * offset.shape[3])
    return {2: "DCN", 3: "DCNv2"}[per_point]


def _tower_convs(sd: StateDict, tower: str) -> List[int]:
    return sorted(
        int(m.group(1))
        for k in sd
        for m in [re.fullmatch(rf"ins_head\.{tower}\.(\d+)\.weight", k)]
        if m and sd[k].dim() == 4
    )


def infer_settings(sd: StateDict) -> Dict[str, object]:
    """Config settings (flat keys) that describe the converted model's architecture.

    Raises:
        ConversionError: no backbone, a ResNet depth detectron2 does not build, or no known head.
    """
    s: Dict[str, object] = {}
    blocks = []
    for stage in range(2, 6):
        ids = {int(k.split(".")[3]) for k in sd if k.startswith(f"backbone.bottom_up.res{stage}.")}
        blocks.append(max(ids) + 1 if ids else 0)
    if not any(blocks):
        raise ConversionError("no backbone tensors found (expected backbone.layer1..4)")
    bottleneck = "backbone.bottom_up.res2.0.conv3.weight" in sd
    # basic blocks (no conv3): R18 / R34; bottlenecks: R50 / R101 / R152
    depths = _BOTTLENECK_BLOCKS if bottleneck else _BASIC_BLOCKS
    if tuple(blocks) not in depths:
        raise ConversionError(f"unsupported ResNet: {blocks} blocks per stage")
    s["MODEL.RESNETS.DEPTH"] = depths[tuple(blocks)]
    if bottleneck:
        conv2 = sd["backbone.bottom_up.res2.0.conv2.weight"]  # (width, width / groups, 3, 3)
        groups = conv2.shape[0] // conv2.shape[1]
        s["MODEL.RESNETS.NUM_GROUPS"] = groups
        s["MODEL.RESNETS.WIDTH_PER_GROUP"] = conv2.shape[0] // groups
        s["MODEL.RESNETS.RES2_OUT_CHANNELS"] = sd["backbone.bottom_up.res2.0.conv3.weight"].shape[0]
    else:
        s["MODEL.RESNETS.RES2_OUT_CHANNELS"] = sd["backbone.bottom_up.res2.0.conv2.weight"].shape[0]
    deform = [f"backbone.bottom_up.res{i}.0.conv2_offset.weight" in sd for i in range(2, 6)]
    s["MODEL.RESNETS.DEFORM_ON_PER_STAGE"] = deform
    if any(deform):
        offset = sd[f"backbone.bottom_up.res{2 + deform.index(True)}.0.conv2_offset.weight"]
        s["MODEL.RESNETS.DEFORM_MODULATED"] = _dcn_type(offset) == "DCNv2"
        s["MODEL.BACKBONE.NAME"] = "build_solo_resnet_fpn_backbone"
    if "ins_head.cate_pred.weight" not in sd:
        return s  # an ImageNet backbone

    s["MODEL.FPN.OUT_CHANNELS"] = sd["backbone.fpn_output2.weight"].shape[0]
    s["MODEL.SOLO.INSTANCE_IN_CHANNELS"] = sd["backbone.fpn_output2.weight"].shape[0]
    cate = sd["ins_head.cate_pred.weight"]
    s["MODEL.SOLO.NUM_CLASSES"] = cate.shape[0]
    s["MODEL.SOLO.INSTANCE_CHANNELS"] = cate.shape[1]
    convs = _tower_convs(sd, "cate_tower")
    s["MODEL.SOLO.NUM_INSTANCE_CONVS"] = len(convs)
    if "ins_head.kernel_pred.weight" in sd:
        head, mask_tower = "SOLOv2InstanceHead", "kernel_tower"
        s["MODEL.SOLO.NUM_KERNELS"] = sd["ins_head.kernel_pred.weight"].shape[0]
        s["MODEL.SOLO.MASK_CHANNELS"] = sd["mask_head.conv_pred.0.weight"].shape[1]
        first_mask_conv = sd["mask_head.convs_all_levels.0.conv0.0.weight"]
        s["MODEL.SOLO.MASK_IN_CHANNELS"] = first_mask_conv.shape[1]
        mask_offsets = [k for k in sd if k.startswith("mask_head.") and "conv_offset.weight" in k]
        s["MODEL.SOLO.MASK_DCN"] = _dcn_type(sd[mask_offsets[0]]) if mask_offsets else ""
    elif "ins_head.mask_preds.0.weight" in sd:
        head, mask_tower = "SOLOInstanceHead", "mask_tower"
        levels = sorted(k for k in sd if re.fullmatch(r"ins_head\.mask_preds\.\d+\.weight", k))
        s["MODEL.SOLO.NUM_GRIDS"] = [
            int(round(sd[f"ins_head.mask_preds.{i}.weight"].shape[0] ** 0.5))
            for i in range(len(levels))
        ]
    elif "ins_head.mask_preds_x.0.weight" in sd:
        light = "ins_head.mask_tower.0.weight" in sd
        head = "DecoupledSOLOLightInstanceHead" if light else "DecoupledSOLOInstanceHead"
        mask_tower = "mask_tower" if light else "mask_tower_x"
        levels = [k for k in sd if re.fullmatch(r"ins_head\.mask_preds_x\.\d+\.weight", k)]
        s["MODEL.SOLO.NUM_GRIDS"] = [
            sd[f"ins_head.mask_preds_x.{i}.weight"].shape[0] for i in range(len(levels))
        ]
    else:
        raise ConversionError("unknown head: no kernel, mask or decoupled mask predictions")
    s["MODEL.SOLO.HEAD"] = head
    offsets = {
        i: sd[f"ins_head.{t}.{i}.conv_offset.weight"]
        for t in ("cate_tower", mask_tower)
        for i in convs
        if f"ins_head.{t}.{i}.conv_offset.weight" in sd
    }
    s["MODEL.SOLO.TOWER_DCN"] = _dcn_type(next(iter(offsets.values()))) if offsets else ""
    if offsets:
        s["MODEL.SOLO.TOWER_DCN_CONVS"] = "last" if set(offsets) == {convs[-1]} else "all"
    return s


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _opts(settings: Dict[str, object]) -> List[object]:
    """Flat ``{key: value}`` settings as a ``[key, value, ...]`` override list."""
    return [x for item in settings.items() for x in item]


def _show(settings: Dict[str, object]) -> str:
    """Settings as command-line overrides: ``KEY VALUE`` pairs, strings in double quotes."""
    return " ".join(f"{k} {v!r}".replace("'", '"') for k, v in settings.items())


def settings_config(config: Path, settings: Dict[str, object]) -> CfgNode:
    """The config file ``config`` with ``settings`` (flat keys) merged over it."""
    return load_config(str(config), _opts(settings))


def _get(cfg: CfgNode, key: str) -> object:
    for part in key.split("."):
        cfg = cfg[part]
    return _normalise(cfg)


def _normalise(v: object) -> object:
    """Tuples (as YAML lists load in a CfgNode) and lists compare equal."""
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    return v


def matching_configs(
    settings: Dict[str, object], name: str = "", configs_dir: Optional[Path] = None
) -> List[Path]:
    """Configs in ``configs_dir`` (default: the model zoo's,
    :func:`solo_d2.model_zoo.configs_dir`) whose values of every inferred architecture key match.

    Ordered: the one named as the checkpoint file (official names: SOLOv2_R50_3x.pth ...) first,
    then published configs before the ``Base-*`` ones.
    """
    arch = {k: v for k, v in settings.items() if k.startswith("MODEL.")}
    matches = []
    for path in sorted(Path(configs_dir or model_zoo_configs_dir()).glob("*.yaml")):
        cfg = load_config(str(path))
        if all(_get(cfg, k) == _normalise(v) for k, v in arch.items()):
            matches.append(path)
    return sorted(
        matches,
        key=lambda p: (p.stem.lower() != name.lower(), p.stem.startswith("Base-"), p.name),
    )


def write_yaml(
    path: Path, base: Optional[Path], weights: Path, settings: Dict[str, object], src: str
) -> None:
    """Write ``path``: ``_BASE_`` + the weights + the settings, as a nested YAML mapping."""
    import yaml

    tree: Dict = {}
    for key, value in {**settings, "MODEL.WEIGHTS": str(weights.resolve())}.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    header = (
        f"# Settings the weights {weights.name} need (tools/convert_official_solo.py, from\n"
        f"# {src}): the official models' input convention (RGB, ImageNet mean/std, stride in the\n"
        "# 3x3 conv) and the architecture read off the checkpoint.\n"
    )
    body = {**({"_BASE_": str(base.resolve())} if base else {}), **tree}
    path.write_text(header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None))


def loading_problems(cfg: CfgNode, state: StateDict) -> List[str]:
    """Build ``cfg``'s model on CPU and list what keeps ``state`` from loading exactly: missing
    keys, unexpected keys and shape mismatches, one line each (empty: it loads exactly)."""
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    own = build_model(cfg).state_dict()
    for buffer in ("pixel_mean", "pixel_std"):  # from the config, not from checkpoints
        own.pop(buffer, None)
    problems = [f"missing in the checkpoint: {k}" for k in own if k not in state]
    problems += [f"not in the model: {k}" for k in state if k not in own]
    problems += [
        f"shape of {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    return problems


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


def load_official(path: Path, trust_pickle: bool = False) -> StateDict:
    """The state dict of an official checkpoint (mmcv ``state_dict``, or ``model``, or bare).

    The file is read by PyTorch's weights-only loader, which runs no code from it
    (:func:`~.safe_load.load_torch_file`).

    Args:
        trust_pickle: UNSAFE, for files from a trusted source only: load with full pickle, which
            runs whatever code the file names, instead of the weights-only loader.
    Raises:
        ConversionError: no such file, refused by the weights-only loader, not a torch file, or
            no state dict of tensors in it.
    """
    try:
        ckpt = load_torch_file(path, trust_pickle=trust_pickle)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except UnsafeCheckpointError as e:
        raise ConversionError(
            f"{path}: refused without running it: it references the Python global {e.refused}. "
            "Only if the file is from a source you trust, pass --trust-pickle (UNSAFE: full "
            "pickle runs any code the file names)"
        ) from None
    except Exception as e:  # not a torch file
        raise ConversionError(
            f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ConversionError(f"{path}: no state dict of tensors found (mmcv 'state_dict' key)")
    return ckpt


@dataclass
class Conversion:
    """What :func:`convert` wrote."""

    state: StateDict  # the converted state dict, saved as {"model": state}
    settings: Dict[str, object]  # RGB_SETTINGS and the inferred architecture, flat keys
    yaml_path: Optional[Path]  # the config written next to the weights; None for a backbone


def convert(
    src: Path,
    dst: Path,
    config: Optional[Path] = None,
    trust_pickle: bool = False,
    configs_dir: Optional[Path] = None,
    log: Callable[[str], None] = logger.info,
) -> Conversion:
    """Convert the official checkpoint ``src`` into ``dst`` and, for a whole model, ``dst`` with
    the suffix ``.yaml``: the config those weights need, ``_BASE_`` ``config`` (by default the
    first of :func:`matching_configs` in ``configs_dir``, default the model zoo's configs).
    ``log`` receives progress lines.

    Raises:
        ConversionError: ``src`` cannot be read, a key matches no rule, no config matches, or the
            config's model does not load the converted weights exactly; nothing is written then.
    """
    official = load_official(src, trust_pickle)
    state, dropped, unmapped = convert_state_dict(official)
    log(f"{src}: {len(official)} tensors, {len(state)} converted, {len(dropped)} dropped")
    if dropped:
        kinds = sorted({re.sub(r"\d+", "N", k) for k in dropped})
        log(f"  dropped ({len(dropped)}): {', '.join(kinds)}")
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} key(s) match no conversion rule, nothing written:\n  "
            + "\n  ".join(unmapped)
        )
    architecture = infer_settings(state)
    settings = {**RGB_SETTINGS, **architecture}
    yaml_path = None
    if "ins_head.cate_pred.weight" not in state:
        log("  an ImageNet backbone: configs using it need " + _show(RGB_SETTINGS))
    else:
        if config is None:
            configs_dir = Path(configs_dir or model_zoo_configs_dir())
            candidates = matching_configs(architecture, src.stem, configs_dir)
            if not candidates:
                raise ConversionError(
                    f"no config in {configs_dir} has this architecture; pass --config BASE.yaml "
                    f"(inferred: {_show(architecture)})"
                )
            config = candidates[0]
            log(f"  matching configs: {', '.join(p.name for p in candidates)}; using {config.name}")
        problems = loading_problems(settings_config(config, settings), state)
        if problems:
            raise ConversionError(
                f"the model of {config.name} with the inferred settings does not take these "
                "weights, nothing written:\n  " + "\n  ".join(problems[:50])
            )
        yaml_path = dst.with_suffix(".yaml")
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": state, "__author__": f"official SOLO ({src.name}), solo_d2 conversion"}, dst
    )
    log(f"wrote {dst}")
    if yaml_path is not None:
        write_yaml(yaml_path, config, dst, settings, src.name)
        log(
            f"wrote {yaml_path}: evaluate with\n  python train_net.py --config-file {yaml_path} "
            "--eval-only"
        )
    return Conversion(state, settings, yaml_path)
