"""Compatibility with AdelaiDet's SOLOv2: its ``MODEL.SOLOV2.*`` config keys and checkpoints.

AdelaiDet's checkpoints need no key mapping: this project's SOLOv2 names its modules as AdelaiDet
does (``backbone.*``, ``ins_head.*``, ``mask_head.*``), so ``DetectionCheckpointer(model).load``
loads them directly. What differs is the config namespace, translated here.
"""

from typing import Any, Dict

from detectron2.config import CfgNode

__all__ = ["ADELAIDET_KEY_MAP", "apply_adelaidet_solov2_config", "is_adelaidet_solov2_state_dict"]

# AdelaiDet MODEL.SOLOV2.<key> -> this project's key (relative to the config root).
ADELAIDET_KEY_MAP = {
    "INSTANCE_IN_FEATURES": "MODEL.SOLO.INSTANCE_IN_FEATURES",
    "FPN_INSTANCE_STRIDES": "MODEL.SOLO.FPN_INSTANCE_STRIDES",
    "FPN_SCALE_RANGES": "MODEL.SOLO.FPN_SCALE_RANGES",
    "SIGMA": "MODEL.SOLO.SIGMA",
    "INSTANCE_IN_CHANNELS": "MODEL.SOLO.INSTANCE_IN_CHANNELS",
    "INSTANCE_CHANNELS": "MODEL.SOLO.INSTANCE_CHANNELS",
    "NUM_INSTANCE_CONVS": "MODEL.SOLO.NUM_INSTANCE_CONVS",
    "NUM_GRIDS": "MODEL.SOLO.NUM_GRIDS",
    "NUM_CLASSES": "MODEL.SOLO.NUM_CLASSES",
    "NUM_KERNELS": "MODEL.SOLO.NUM_KERNELS",
    "NORM": "MODEL.SOLO.NORM",
    "PRIOR_PROB": "MODEL.SOLO.PRIOR_PROB",
    "MASK_IN_FEATURES": "MODEL.SOLO.MASK_IN_FEATURES",
    "MASK_IN_CHANNELS": "MODEL.SOLO.MASK_IN_CHANNELS",
    "MASK_CHANNELS": "MODEL.SOLO.MASK_CHANNELS",
    "NMS_PRE": "MODEL.SOLO.NMS_PRE_TOPK",
    "SCORE_THR": "MODEL.SOLO.SCORE_THRESH_TEST",
    "UPDATE_THR": "MODEL.SOLO.UPDATE_THRESH_TEST",
    "MASK_THR": "MODEL.SOLO.MASK_THRESH_TEST",
    "MAX_PER_IMG": "TEST.DETECTIONS_PER_IMAGE",
    "NMS_TYPE": "MODEL.SOLO.NMS_TYPE",
    "NMS_KERNEL": "MODEL.SOLO.NMS_KERNEL",
    "NMS_SIGMA": "MODEL.SOLO.NMS_SIGMA",
    "LOSS.FOCAL_ALPHA": "MODEL.SOLO.LOSS.FOCAL_ALPHA",
    "LOSS.FOCAL_GAMMA": "MODEL.SOLO.LOSS.FOCAL_GAMMA",
    "LOSS.FOCAL_WEIGHT": "MODEL.SOLO.LOSS.FOCAL_WEIGHT",
    "LOSS.DICE_WEIGHT": "MODEL.SOLO.LOSS.DICE_WEIGHT",
}
# AdelaiDet keys without a counterpart: the DCN flags are ignored by AdelaiDet's code, coordinates
# are always used, the focal loss is always sigmoid, and NUM_MASKS must equal NUM_KERNELS.
_IGNORED = {"USE_DCN_IN_INSTANCE", "TYPE_DCN", "USE_COORD_CONV", "LOSS.FOCAL_USE_SIGMOID"}


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_adelaidet_solov2_config(cfg: CfgNode, solov2: Dict[str, Any]) -> None:
    """Set ``cfg`` from AdelaiDet's ``MODEL.SOLOV2`` values (a dict, nested for ``LOSS``).

    Raises ValueError on keys it does not know or on NUM_MASKS != NUM_KERNELS.
    """
    flat = _flatten(solov2)
    if "NUM_MASKS" in flat and flat["NUM_MASKS"] != flat.get("NUM_KERNELS", flat["NUM_MASKS"]):
        raise ValueError(
            f"AdelaiDet MODEL.SOLOV2.NUM_MASKS={flat['NUM_MASKS']} differs from NUM_KERNELS="
            f"{flat['NUM_KERNELS']}; SOLOv2's 1x1 dynamic kernels need them equal"
        )
    unknown = set(flat) - set(ADELAIDET_KEY_MAP) - _IGNORED - {"NUM_MASKS"}
    if unknown:
        raise ValueError(f"unknown AdelaiDet MODEL.SOLOV2 keys: {sorted(unknown)}")
    opts = []
    for key, value in flat.items():
        if key in ADELAIDET_KEY_MAP:
            if isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            target = ADELAIDET_KEY_MAP[key]
            current = cfg
            for part in target.split("."):
                current = current[part]
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            opts += [target, value]
    cfg.merge_from_list(opts)


def is_adelaidet_solov2_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True when the keys have AdelaiDet SOLOv2's head layout."""
    return any(k.startswith("ins_head.kernel_tower.") for k in state_dict) and any(
        k.startswith("mask_head.convs_all_levels.") for k in state_dict
    )
