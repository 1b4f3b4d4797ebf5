"""SOLOv2 heads: the instance branch (category + kernel towers) and the mask-feature branch.

Shape shorthand:
    B: images in the batch        L: instance levels (5)          S_l: grid size of level l
    C: foreground classes         E: dynamic-kernel length (= mask-feature channels)
    Hf, Wf: mask-feature size (stride 4 of the padded batch)

Module and parameter names follow AdelaiDet's SOLOv2 (``ins_head.cate_tower.{3i}``,
``mask_head.convs_all_levels.{l}.conv{j}.0`` ...), so its published checkpoints load unchanged.
"""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import Tensor, nn

__all__ = ["SOLOv2InstanceHead", "SOLOv2MaskHead", "coord_features", "split_instance_features"]


def coord_features(x: Tensor) -> Tensor:
    """Normalised coordinates of a feature map, as SOLO's CoordConv channels.

    Args:
        x: (B, *, H, W) feature map (of the padded batch: coordinates span the padded canvas).
    Returns:
        (B, 2, H, W): channel 0 is x = linspace(-1, 1, W), channel 1 is y = linspace(-1, 1, H).
    """
    b, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    return grid.unsqueeze(0).expand(b, 2, h, w)


def split_instance_features(features: List[Tensor]) -> List[Tensor]:
    """SOLO's level trick: P2 -> stride 8 and P6 -> stride 32, bilinear, align_corners=False.

    Inputs are padded to a multiple of 32, so the first resize is exactly x0.5.
    """
    out = list(features)
    out[0] = F.interpolate(features[0], size=features[1].shape[-2:], mode="bilinear")
    out[-1] = F.interpolate(features[-1], size=features[-2].shape[-2:], mode="bilinear")
    return out


def _conv_norm_relu(in_ch: int, out_ch: int, kernel: int, norm: str) -> List[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=not norm)
    layers = [conv]
    if norm:
        layers.append(get_norm(norm, out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


class SOLOv2InstanceHead(nn.Module):
    """Category and dynamic-kernel predictions on an S x S grid per level (paper Fig. 3)."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_grids: List[int],
        channels: int,
        num_convs: int,
        num_kernels: int,
        norm: str,
        prior_prob: float,
    ):
        """
        Args:
            in_channels: channels of every input level.
            num_classes: C, foreground classes.
            num_grids: S per level.
            channels: tower width.
            num_convs: 3x3 convs per tower.
            num_kernels: E, dynamic 1x1 kernel length.
            norm: "GN" or "" (no norm; convs then get a bias).
            prior_prob: initial classifier probability.
        """
        super().__init__()
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self.num_kernels = num_kernels
        cate, kernel = [], []
        for i in range(num_convs):
            # the kernel tower sees the two CoordConv channels; the category tower does not
            cate += _conv_norm_relu(in_channels if i == 0 else channels, channels, 3, norm)
            kernel += _conv_norm_relu(in_channels + 2 if i == 0 else channels, channels, 3, norm)
        self.cate_tower = nn.Sequential(*cate)
        self.kernel_tower = nn.Sequential(*kernel)
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.kernel_pred = nn.Conv2d(channels, num_kernels, 3, padding=1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        assert channels == {cfg.MODEL.SOLO.INSTANCE_IN_CHANNELS}, (
            f"MODEL.SOLO.INSTANCE_IN_CHANNELS={cfg.MODEL.SOLO.INSTANCE_IN_CHANNELS} but the "
            f"backbone features {cfg.MODEL.SOLO.INSTANCE_IN_FEATURES} have {channels} channels"
        )
        return {
            "in_channels": cfg.MODEL.SOLO.INSTANCE_IN_CHANNELS,
            "num_classes": cfg.MODEL.SOLO.NUM_CLASSES,
            "num_grids": cfg.MODEL.SOLO.NUM_GRIDS,
            "channels": cfg.MODEL.SOLO.INSTANCE_CHANNELS,
            "num_convs": cfg.MODEL.SOLO.NUM_INSTANCE_CONVS,
            "num_kernels": cfg.MODEL.SOLO.NUM_KERNELS,
            "norm": cfg.MODEL.SOLO.NORM,
            "prior_prob": cfg.MODEL.SOLO.PRIOR_PROB,
        }

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features: L maps (B, in_channels, H_l, W_l), already split (strides 8,8,16,32,32).
        Returns:
            cate_logits: L tensors (B, C, S_l, S_l).
            kernels: L tensors (B, E, S_l, S_l).
        """
        cate_logits, kernels = [], []
        for feat, s in zip(features, self.num_grids):
            # CoordConv channels are appended *before* the S x S resize (reference order)
            x = torch.cat([feat, coord_features(feat)], dim=1)
            x = F.interpolate(x, size=(s, s), mode="bilinear")
            kernels.append(self.kernel_pred(self.kernel_tower(x)))
            cate_logits.append(self.cate_pred(self.cate_tower(x[:, :-2])))
        return cate_logits, kernels


class SOLOv2MaskHead(nn.Module):
    """Unified mask-feature branch: all levels brought to the first level's stride and summed."""

    @configurable
    def __init__(
        self, *, in_channels: int, num_levels: int, channels: int, num_kernels: int, norm: str
    ):
        """
        Args:
            in_channels: channels of every input level.
            num_levels: inputs (P2..P5: 4); level l is upsampled l times by 2.
            channels: hidden width.
            num_kernels: E, output channels.
            norm: "GN" or "". The 1x1 output conv always has GroupNorm, as in the reference.
        """
        super().__init__()
        self.convs_all_levels = nn.ModuleList()
        for level in range(num_levels):
            tower = nn.Sequential()
            for j in range(max(level, 1)):
                if j == 0:  # the deepest level also receives the two CoordConv channels
                    in_ch = in_channels + (2 if level == num_levels - 1 else 0)
                else:
                    in_ch = channels
                tower.add_module(
                    f"conv{j}", nn.Sequential(*_conv_norm_relu(in_ch, channels, 3, norm))
                )
                if level > 0:
                    tower.add_module(
                        f"upsample{j}",
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    )
            self.convs_all_levels.append(tower)
        self.conv_pred = nn.Sequential(*_conv_norm_relu(channels, num_kernels, 1, "GN"))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        assert channels == {cfg.MODEL.SOLO.MASK_IN_CHANNELS}, (
            f"MODEL.SOLO.MASK_IN_CHANNELS={cfg.MODEL.SOLO.MASK_IN_CHANNELS} but the backbone "
            f"features {cfg.MODEL.SOLO.MASK_IN_FEATURES} have {channels} channels"
        )
        return {
            "in_channels": cfg.MODEL.SOLO.MASK_IN_CHANNELS,
            "num_levels": len(cfg.MODEL.SOLO.MASK_IN_FEATURES),
            "channels": cfg.MODEL.SOLO.MASK_CHANNELS,
            "num_kernels": cfg.MODEL.SOLO.NUM_KERNELS,
            "norm": cfg.MODEL.SOLO.NORM,
        }

    def forward(self, features: List[Tensor]) -> Tensor:
        """
        Args:
            features: maps (B, in_channels, H_l, W_l) at strides 4, 8, 16, 32 (padded to 32).
        Returns:
            (B, E, Hf, Wf) mask features at the first level's stride.
        """
        out = self.convs_all_levels[0](features[0])
        last = len(features) - 1
        for level in range(1, len(features)):
            x = features[level]
            if level == last:
                x = torch.cat([x, coord_features(x)], dim=1)
            out = out + self.convs_all_levels[level](x)  # out of place: keeps autograd safe
        return self.conv_pred(out)
