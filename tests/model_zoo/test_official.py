"""solo_d2.model_zoo.official (and its command line, tools/convert_official_solo.py) on state
dicts laid out as the official SOLO checkpoints (WXinlong/SOLO, mmdetection v1).

The official state dicts are generated here from the mmdetection-v1 module structure (torchvision
ResNet, mmcv ConvModule ``conv``/``gn``, DCN ``conv.conv_offset``), independently of the
converter's rules, and their head key counts are checked against the key counts of the real
heads (SOLOHead, DecoupledSOLOHead, DecoupledSOLOLightHead, SOLOv2Head + MaskFeatHead of
WXinlong/SOLO). After conversion the model built from the written config must load them with no
missing or unexpected key, every tensor must land exactly once, and hand-picked tensors must land
where they should.
"""

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from solo_d2.config import load_config
from solo_d2.model_zoo import official as conv

GRIDS = [40, 36, 24, 16, 12]
_G = torch.Generator().manual_seed(0)


def t(*shape):
    return torch.rand(shape, generator=_G)


def bn(prefix, c):
    return {
        f"{prefix}.weight": t(c), f"{prefix}.bias": t(c), f"{prefix}.running_mean": t(c),
        f"{prefix}.running_var": t(c) + 0.5, f"{prefix}.num_batches_tracked": torch.tensor(7),
    }  # fmt: skip


def torchvision_resnet(depth, groups=1, width_per_group=64, dcn="", prefix="backbone."):
    """torchvision / mmdet-v1 ResNet(-Xt) keys; dcn "DCN"/"DCNv2": layer2-4 conv2.conv_offset."""
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    basic = depth in (18, 34)
    sd = {f"{prefix}conv1.weight": t(64, 3, 7, 7), **bn(f"{prefix}bn1", 64)}
    inplanes = 64
    for layer, (n, planes) in enumerate(zip(blocks, [64, 128, 256, 512]), start=1):
        for b in range(n):
            p = f"{prefix}layer{layer}.{b}"
            if basic:
                sd[f"{p}.conv1.weight"] = t(planes, inplanes, 3, 3)
                sd[f"{p}.conv2.weight"] = t(planes, planes, 3, 3)
                sd.update(bn(f"{p}.bn1", planes) | bn(f"{p}.bn2", planes))
                out = planes
            else:
                width = planes * width_per_group // 64 * groups
                out = planes * 4
                sd[f"{p}.conv1.weight"] = t(width, inplanes, 1, 1)
                sd[f"{p}.conv2.weight"] = t(width, width // groups, 3, 3)
                sd[f"{p}.conv3.weight"] = t(out, width, 1, 1)
                sd.update(bn(f"{p}.bn1", width) | bn(f"{p}.bn2", width) | bn(f"{p}.bn3", out))
                if dcn and layer > 1:
                    per_point = 3 if dcn == "DCNv2" else 2
                    sd[f"{p}.conv2.conv_offset.weight"] = t(per_point * 9, width, 3, 3)
                    sd[f"{p}.conv2.conv_offset.bias"] = t(per_point * 9)
            if b == 0 and (inplanes != out or layer > 1):
                sd[f"{p}.downsample.0.weight"] = t(out, inplanes, 1, 1)
                sd.update(bn(f"{p}.downsample.1", out))
            inplanes = out
    return sd


def fpn(in_channels):
    sd = {}
    for k, c in enumerate(in_channels):
        sd[f"neck.lateral_convs.{k}.conv.weight"] = t(256, c, 1, 1)
        sd[f"neck.lateral_convs.{k}.conv.bias"] = t(256)
        sd[f"neck.fpn_convs.{k}.conv.weight"] = t(256, 256, 3, 3)
        sd[f"neck.fpn_convs.{k}.conv.bias"] = t(256)
    return sd


def conv_module(prefix, cin, cout, k=3, dcn=""):
    """mmcv ConvModule with GN (no conv bias), optionally a DCN(v2) conv with conv_offset."""
    sd = {f"{prefix}.conv.weight": t(cout, cin, k, k), f"{prefix}.gn.weight": t(cout)}
    sd[f"{prefix}.gn.bias"] = t(cout)
    if dcn:
        per_point = 3 if dcn == "DCNv2" else 2
        sd[f"{prefix}.conv.conv_offset.weight"] = t(per_point * k * k, cin, k, k)
        sd[f"{prefix}.conv.conv_offset.bias"] = t(per_point * k * k)
    return sd


def tower(name, n, first_in, width=256, dcn="", last_only=False):
    sd = {}
    for i in range(n):
        d = dcn if not last_only or i == n - 1 else ""
        sd |= conv_module(f"bbox_head.{name}.{i}", first_in if i == 0 else width, width, 3, d)
    return sd


def solo_head():
    sd = tower("ins_convs", 7, 258) | tower("cate_convs", 7, 256)
    for level, s in enumerate(GRIDS):
        sd[f"bbox_head.solo_ins_list.{level}.weight"] = t(s * s, 256, 1, 1)
        sd[f"bbox_head.solo_ins_list.{level}.bias"] = t(s * s)
    return sd | {"bbox_head.solo_cate.weight": t(80, 256, 3, 3), "bbox_head.solo_cate.bias": t(80)}


def decoupled_lists():
    sd = {}
    for axis in "xy":
        for level, s in enumerate(GRIDS):
            sd[f"bbox_head.dsolo_ins_list_{axis}.{level}.weight"] = t(s, 256, 3, 3)
            sd[f"bbox_head.dsolo_ins_list_{axis}.{level}.bias"] = t(s)
    return sd | {
        "bbox_head.dsolo_cate.weight": t(80, 256, 3, 3),
        "bbox_head.dsolo_cate.bias": t(80),
    }


def decoupled_head():
    towers = tower("ins_convs_x", 7, 257) | tower("ins_convs_y", 7, 257)
    return towers | tower("cate_convs", 7, 256) | decoupled_lists()


def decoupled_light_dcn_head():
    towers = tower("ins_convs", 4, 258, dcn="DCN", last_only=True)
    return towers | tower("cate_convs", 4, 256, dcn="DCN", last_only=True) | decoupled_lists()


def solov2_heads(n, width, e, dcn="", last_only=False, mask_dcn=""):
    sd = tower("cate_convs", n, 256, width, dcn, last_only)
    sd |= tower("kernel_convs", n, 258, width, dcn, last_only)
    sd |= {"bbox_head.solo_cate.weight": t(80, width, 3, 3), "bbox_head.solo_cate.bias": t(80)}
    sd |= {"bbox_head.solo_kernel.weight": t(e, width, 3, 3), "bbox_head.solo_kernel.bias": t(e)}
    for level in range(4):
        for j in range(max(level, 1)):
            cin = 256 + (2 if level == 3 and j == 0 else 0) if j == 0 else 128
            prefix = f"mask_feat_head.convs_all_levels.{level}.conv{j}"
            sd |= conv_module(prefix, cin, 128, 3, mask_dcn)
    return sd | conv_module("mask_feat_head.conv_pred.0", 128, e, 1, mask_dcn)


def official(backbone, neck, head):
    return {"meta": {"epoch": 36, "CLASSES": ("person",)}, "state_dict": backbone | neck | head}


def head_keys(sd):
    return [k for k in sd if k.startswith(("bbox_head.", "mask_feat_head."))]


R50_FPN = [256, 512, 1024, 2048]
CASES = {
    # name (also of the matching config): (official checkpoint, head key count of the real heads)
    "SOLO_R50_3x": (lambda: official(torchvision_resnet(50), fpn(R50_FPN), solo_head()), 54),
    "Decoupled_SOLO_R50_3x": (
        lambda: official(torchvision_resnet(50), fpn(R50_FPN), decoupled_head()), 85,
    ),
    "Decoupled_SOLO_Light_DCN_R50_3x": (
        lambda: official(torchvision_resnet(50, dcn="DCN"), fpn(R50_FPN),
                         decoupled_light_dcn_head()), 50,
    ),
    "SOLOv2_R101_DCN_3x": (
        lambda: official(torchvision_resnet(101, dcn="DCNv2"), fpn(R50_FPN),
                         solov2_heads(4, 512, 256, "DCNv2", mask_dcn="DCNv2")), 84,
    ),
    "SOLOv2_Light_512_DCN_R50_3x": (
        lambda: official(torchvision_resnet(50, dcn="DCN"), fpn(R50_FPN),
                         solov2_heads(3, 256, 128, "DCN", last_only=True)), 50,
    ),
    "SOLOv2_Light_448_R18_3x": (
        lambda: official(torchvision_resnet(18), fpn([64, 128, 256, 512]),
                         solov2_heads(2, 256, 128)), 40,  # 2-conv towers
    ),
}  # fmt: skip

# official key -> converted key, written out by hand from the module names of both implementations
HAND_CHECKS = {
    "backbone.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
    "backbone.bn1.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
    "backbone.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
    "backbone.layer2.0.downsample.1.bias": "backbone.bottom_up.res3.0.shortcut.norm.bias",
    "backbone.layer3.1.bn2.running_mean": "backbone.bottom_up.res4.1.conv2.norm.running_mean",
    "backbone.layer4.1.conv1.weight": "backbone.bottom_up.res5.1.conv1.weight",
    "backbone.layer4.1.conv2.conv_offset.weight": "backbone.bottom_up.res5.1.conv2_offset.weight",
    "backbone.layer2.0.conv2.conv_offset.bias": "backbone.bottom_up.res3.0.conv2_offset.bias",
    "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral2.weight",
    "neck.fpn_convs.3.conv.bias": "backbone.fpn_output5.bias",
    "bbox_head.cate_convs.0.conv.weight": "ins_head.cate_tower.0.weight",
    "bbox_head.cate_convs.1.gn.weight": "ins_head.cate_tower.4.weight",
    "bbox_head.cate_convs.3.conv.conv_offset.weight": "ins_head.cate_tower.9.conv_offset.weight",
    "bbox_head.cate_convs.2.conv.conv_offset.bias": "ins_head.cate_tower.6.conv_offset.bias",
    "bbox_head.kernel_convs.0.gn.bias": "ins_head.kernel_tower.1.bias",
    "bbox_head.ins_convs.6.conv.weight": "ins_head.mask_tower.18.weight",
    "bbox_head.ins_convs.3.conv.conv_offset.weight": "ins_head.mask_tower.9.conv_offset.weight",
    "bbox_head.ins_convs_x.0.conv.weight": "ins_head.mask_tower_x.0.weight",
    "bbox_head.ins_convs_y.6.gn.bias": "ins_head.mask_tower_y.19.bias",
    "bbox_head.solo_ins_list.4.bias": "ins_head.mask_preds.4.bias",
    "bbox_head.solo_ins_list.0.weight": "ins_head.mask_preds.0.weight",
    "bbox_head.dsolo_ins_list_x.2.weight": "ins_head.mask_preds_x.2.weight",
    "bbox_head.dsolo_ins_list_y.4.bias": "ins_head.mask_preds_y.4.bias",
    "bbox_head.solo_cate.bias": "ins_head.cate_pred.bias",
    "bbox_head.dsolo_cate.weight": "ins_head.cate_pred.weight",
    "bbox_head.solo_kernel.weight": "ins_head.kernel_pred.weight",
    "mask_feat_head.convs_all_levels.3.conv0.conv.weight": "mask_head.convs_all_levels.3.conv0.0.weight",  # noqa: E501
    "mask_feat_head.convs_all_levels.2.conv1.gn.weight": "mask_head.convs_all_levels.2.conv1.1.weight",  # noqa: E501
    "mask_feat_head.convs_all_levels.1.conv0.conv.conv_offset.weight": "mask_head.convs_all_levels.1.conv0.0.conv_offset.weight",  # noqa: E501
    "mask_feat_head.conv_pred.0.conv.weight": "mask_head.conv_pred.0.weight",
    "mask_feat_head.conv_pred.0.gn.bias": "mask_head.conv_pred.1.bias",
    "mask_feat_head.conv_pred.0.conv.conv_offset.weight": "mask_head.conv_pred.0.conv_offset.weight",  # noqa: E501
}


def load_written_config(yaml_path):
    return load_config(str(yaml_path), ["MODEL.DEVICE", "cpu"])


def fingerprint(x: torch.Tensor):
    return tuple(x.shape), round(float(x.double().sum()), 6)


@pytest.mark.parametrize("name", list(CASES))
def test_convert_and_load(name, tmp_path):
    make, head_count = CASES[name]
    ckpt = make()
    assert len(head_keys(ckpt["state_dict"])) == head_count  # the key count of the real heads
    src = tmp_path / f"{name}.pth"
    torch.save(ckpt, src)
    dst = tmp_path / "out" / "model_final.pth"
    yaml_path = conv.convert(src, dst).yaml_path
    written = yaml.safe_load(yaml_path.read_text())
    assert written["_BASE_"].endswith(f"configs/{name}.yaml")
    assert (
        written["INPUT"]["FORMAT"] == "RGB"
        and written["MODEL"]["RESNETS"]["STRIDE_IN_1X1"] is False
    )
    assert written["MODEL"]["PIXEL_STD"] == [58.395, 57.12, 57.375]

    cfg = load_written_config(yaml_path)
    assert cfg.MODEL.WEIGHTS == str(dst.resolve())
    model = build_model(cfg)
    incompatible = DetectionCheckpointer(model)._load_model(torch.load(dst, weights_only=True))
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert not incompatible.incorrect_shapes
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # the path users take

    official_sd = ckpt["state_dict"]
    own = model.state_dict()
    for old, new in HAND_CHECKS.items():
        if old in official_sd:
            assert torch.equal(own[new], official_sd[old]), (old, new)
    # every official tensor but num_batches_tracked lands exactly once (random values are unique)
    kept = [v for k, v in official_sd.items() if not k.endswith("num_batches_tracked")]
    own_fp = sorted(fingerprint(v) for k, v in own.items() if k not in ("pixel_mean", "pixel_std"))
    assert own_fp == sorted(fingerprint(v) for v in kept)


def test_inferred_architecture_of_the_light_dcn_model():
    state, _, _ = conv.convert_state_dict(CASES["SOLOv2_Light_512_DCN_R50_3x"][0]()["state_dict"])
    s = conv.infer_settings(state)
    assert s["MODEL.SOLO.HEAD"] == "SOLOv2InstanceHead"
    assert s["MODEL.SOLO.NUM_INSTANCE_CONVS"] == 3 and s["MODEL.SOLO.INSTANCE_CHANNELS"] == 256
    assert s["MODEL.SOLO.NUM_KERNELS"] == 128 and s["MODEL.SOLO.MASK_DCN"] == ""
    assert (s["MODEL.SOLO.TOWER_DCN"], s["MODEL.SOLO.TOWER_DCN_CONVS"]) == ("DCN", "last")
    assert s["MODEL.RESNETS.DEFORM_ON_PER_STAGE"] == [False, True, True, True]
    assert s["MODEL.RESNETS.DEFORM_MODULATED"] is False


def test_imagenet_backbones_for_the_torchvision_configs(tmp_path):
    """torchvision ImageNet ResNet-18 (with its fc classifier) and a ResNeXt-101 64x4d layout:
    converted to detectron2 backbone keys, fc dropped, groups read off the shapes."""
    r18 = torchvision_resnet(18, prefix="")
    r18 |= {"fc.weight": t(1000, 512), "fc.bias": t(1000)}
    src, dst = tmp_path / "resnet18-f37072fd.pth", tmp_path / "R-18-torchvision.pth"
    torch.save(r18, src)
    result = conv.convert(src, dst)
    assert result.yaml_path is None and result.settings["MODEL.RESNETS.DEPTH"] == 18
    cfg = load_written_config(REPO / "configs" / "SOLOv2_Light_448_R18_3x.yaml")
    backbone = {
        k[len("backbone.bottom_up.") :]: v
        for k, v in build_model(cfg).state_dict().items()
        if k.startswith("backbone.bottom_up.")
    }
    loaded = torch.load(dst, weights_only=True)["model"]
    assert {k[len("backbone.bottom_up.") :] for k in loaded} == set(backbone)
    assert torch.equal(loaded["backbone.bottom_up.res3.0.shortcut.weight"], r18["layer2.0.downsample.0.weight"])  # fmt: skip  # noqa: E501

    x101 = torchvision_resnet(101, groups=64, width_per_group=4, prefix="")
    state, _, _ = conv.convert_state_dict(x101)
    s = conv.infer_settings(state)
    assert (s["MODEL.RESNETS.DEPTH"], s["MODEL.RESNETS.NUM_GROUPS"]) == (101, 64)
    assert s["MODEL.RESNETS.WIDTH_PER_GROUP"] == 4


def test_unknown_keys_fail_and_write_nothing(tmp_path):
    ckpt = CASES["SOLO_R50_3x"][0]()
    ckpt["state_dict"]["bbox_head.solo_mystery.weight"] = t(3)
    ckpt["state_dict"]["backbone.layer1.0.bn4.weight"] = t(3)
    src, dst = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(ckpt, src)
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_official_solo.py"), str(src), str(dst)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert "bbox_head.solo_mystery.weight" in res.stderr
    assert "backbone.layer1.0.bn4.weight" in res.stderr
    assert not dst.exists() and not dst.with_suffix(".yaml").exists()


def test_loading_problems_reports_what_does_not_load():
    ckpt = CASES["SOLOv2_Light_448_R18_3x"][0]()
    state, _, _ = conv.convert_state_dict(ckpt["state_dict"])
    cfg = conv.settings_config(
        REPO / "configs" / "SOLOv2_Light_448_R18_3x.yaml", conv.infer_settings(state)
    )
    state.pop("ins_head.kernel_pred.bias")
    state["ins_head.cate_pred.weight"] = state["ins_head.cate_pred.weight"][:10]
    problems = conv.loading_problems(cfg, state)
    assert "missing in the checkpoint: ins_head.kernel_pred.bias" in problems
    assert any(p.startswith("shape of ins_head.cate_pred.weight") for p in problems)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(conv.ConversionError, match="cannot be read as a torch checkpoint"):
        conv.convert(bad, tmp_path / "out.pth")
    with pytest.raises(conv.ConversionError, match="no such file"):
        conv.convert(tmp_path / "missing.pth", tmp_path / "out.pth")
