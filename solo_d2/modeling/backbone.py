"""ResNet(-FPN) backbones whose deformable stages run without detectron2's compiled ops.

detectron2's ``build_resnet_backbone`` builds ``DeformBottleneckBlock`` on its compiled
``DeformConv``, which an install without ``detectron2._C`` cannot even construct. The builders here
read the same config keys (``MODEL.RESNETS.*``, including ``DEFORM_ON_PER_STAGE``,
``DEFORM_MODULATED`` and ``DEFORM_NUM_GROUPS``) and produce the same modules and parameter names
(``res3.0.conv2_offset``, ``res3.0.conv2.weight``, ``res3.0.conv2.norm`` ...), so checkpoints move
freely between the two; the deformable convs use :mod:`solo_d2.modeling.dcn`. Without deformable
stages the result is detectron2's ResNet exactly.
"""

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import nn

from .dcn import DeformConv

__all__ = [
    "DeformBottleneckBlock",
    "build_solo_resnet_backbone",
    "build_solo_resnet_fpn_backbone",
    "fold_frozen_batchnorm",
]

_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


class DeformBottleneckBlock(CNNBlockBase):
    """Bottleneck block whose 3x3 conv is deformable (v1, or modulated v2), as detectron2's
    ``DeformBottleneckBlock``: a plain conv ``conv2_offset`` predicts the offsets (and for v2 the
    mask logits, last third of its channels) from the block's 1x1 output."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: str = "BN",
        stride_in_1x1: bool = False,
        dilation: int = 1,
        deform_modulated: bool = False,
        deform_num_groups: int = 1,
    ):
        super().__init__(in_channels, out_channels, stride)
        self.deform_modulated = deform_modulated
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                norm=get_norm(norm, out_channels),
            )  # fmt: skip
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(
            in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1, bias=False,
            norm=get_norm(norm, bottleneck_channels),
        )  # fmt: skip
        per_point = 3 if deform_modulated else 2  # (dy, dx[, mask]) per kernel point
        self.conv2_offset = Conv2d(
            bottleneck_channels, per_point * 9 * deform_num_groups, kernel_size=3,
            stride=stride_3x3, padding=dilation, dilation=dilation,
        )  # fmt: skip
        self.conv2 = DeformConv(
            bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3,
            padding=dilation, dilation=dilation, groups=num_groups,
            deformable_groups=deform_num_groups, bias=False,
            norm=get_norm(norm, bottleneck_channels),
        )  # fmt: skip
        self.conv3 = Conv2d(
            bottleneck_channels, out_channels, kernel_size=1, bias=False,
            norm=get_norm(norm, out_channels),
        )  # fmt: skip
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                weight_init.c2_msra_fill(layer)
        torch.nn.init.zeros_(self.conv2_offset.weight)
        torch.nn.init.zeros_(self.conv2_offset.bias)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        offset = self.conv2_offset(out)
        if self.deform_modulated:
            o1, o2, mask = torch.chunk(offset, 3, dim=1)
            out = self.conv2(out, torch.cat([o1, o2], dim=1), mask.sigmoid())
        else:
            out = self.conv2(out, offset)
        out = self.conv3(F.relu_(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)


@BACKBONE_REGISTRY.register()
def build_solo_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ResNet from ``MODEL.RESNETS.*``, deformable stages on :mod:`.dcn`."""
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH must be one of {sorted(_BLOCKS_PER_STAGE)}: {depth}")
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}")
    # Unlike detectron2's builder, R18/R34 may be narrower than 64 channels in res2 (the
    # quickstart's from-scratch backbone); BasicBlock adds a projection shortcut where needed.
    if depth in (18, 34) and (
        any(r.DEFORM_ON_PER_STAGE) or r.RES5_DILATION != 1 or r.NUM_GROUPS != 1
    ):  # fmt: skip
        raise ValueError(
            "R18/R34 need MODEL.RESNETS.RES5_DILATION=1, NUM_GROUPS=1 and no DEFORM_ON_PER_STAGE"
        )
    stem = BasicStem(
        in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM
    )
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
        stage = idx + 2  # res2 .. res5
        dilation = r.RES5_DILATION if stage == 5 else 1
        first_stride = 1 if idx == 0 or (stage == 5 and dilation == 2) else 2
        kwargs = dict(
            num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=r.NORM,
        )
        if depth in (18, 34):
            kwargs["block_class"] = BasicBlock
        else:
            kwargs.update(
                bottleneck_channels=bottleneck_channels, stride_in_1x1=r.STRIDE_IN_1X1,
                dilation=dilation, num_groups=r.NUM_GROUPS, block_class=BottleneckBlock,
            )  # fmt: skip
            if r.DEFORM_ON_PER_STAGE[idx]:
                kwargs.update(
                    block_class=DeformBottleneckBlock, deform_modulated=r.DEFORM_MODULATED,
                    deform_num_groups=r.DEFORM_NUM_GROUPS,
                )  # fmt: skip
        stages.append(ResNet.make_stage(**kwargs))
        in_channels, out_channels = out_channels, out_channels * 2
        bottleneck_channels *= 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_solo_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNet-FPN with P2-P6 (P6 = max-pool of P5), as detectron2's ``build_resnet_fpn_backbone``,
    on :func:`build_solo_resnet_backbone`."""
    return FPN(
        bottom_up=build_solo_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@torch.no_grad()
def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold each ``FrozenBatchNorm2d`` that is the ``norm`` of a detectron2 ``Conv2d`` into that
    conv's weight and bias, in place, for inference: one pass over the activations less per conv.

    ``norm(conv(x)) = conv(x) * s + t`` with ``s = weight / sqrt(running_var + eps)`` and
    ``t = bias - running_mean * s``, so the conv's weight becomes ``W * s`` (per output channel)
    and its bias ``b * s + t``; results change by float rounding only. Convolutions with other
    norms (GN, trainable BN) and deformable convs are left alone. The folded module must not be
    trained (its convs no longer match the checkpoint's tensors): fold a copy.

    Returns:
        the number of convs folded.
    """
    folded = 0
    for m in module.modules():
        if type(m) is not Conv2d or not isinstance(m.norm, FrozenBatchNorm2d):
            continue
        bn = m.norm
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        m.weight.mul_(scale.reshape(-1, 1, 1, 1).to(m.weight.dtype))
        bias = shift if m.bias is None else m.bias * scale + shift
        m.bias = nn.Parameter(bias.to(m.weight.dtype), requires_grad=False)
        m.norm = None
        folded += 1
    return folded
