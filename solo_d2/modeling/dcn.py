"""Deformable convolution (DCNv1 and modulated DCNv2) that runs with or without detectron2's ops.

detectron2's ``DeformConv`` / ``ModulatedDeformConv`` need its compiled ``_C`` extension (and a
GPU); an offline install has neither. These modules keep their parameters and call signatures,
and run on detectron2's kernels when they are compiled and the input is on CUDA, otherwise on
``torchvision.ops.deform_conv2d`` (CPU and GPU). Both implement the same operator:

    y[o, p] = sum_{c, k} w[o, c, k] * m[g, k, p] * x[c](p*stride - pad + k*dil + off[g, k, p])

(g: the deformable group of channel c; x[c](q): bilinear sample of channel c at point q)

where, per deformable group g and kernel point k (row-major over the kernel), the offset channels
are ``2k`` (dy) and ``2k + 1`` (dx) of the group's block, and ``m`` (modulation, DCNv2 only) is
channel ``k`` of the group's mask block; samples outside the input read zeros.

Module names follow the checkpoints that use them: detectron2's ResNet keeps the offsets in a
sibling conv (``conv2_offset``), mmcv's ``DeformConvPack`` (official SOLO heads) owns it as
``conv_offset``. Both layouts are provided (:class:`DeformConv`, :class:`DeformConvPack`).
"""

from functools import lru_cache
from typing import Optional

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = [
    "DCN_TYPES",
    "DeformConv",
    "DeformConvPack",
    "deform_conv2d",
    "detectron2_deform_ops_available",
]

# Config spelling of the deformable conv types (the names the official SOLO configs use).
DCN_TYPES = {"": None, "DCN": False, "DCNv2": True}  # type -> modulated (None: plain conv)


@lru_cache(maxsize=None)
def detectron2_deform_ops_available() -> bool:
    """True when detectron2's compiled deformable-conv kernels can be imported."""
    from ..compat import import_compiled_ops

    try:
        import_compiled_ops()
    except ImportError:
        return False
    return True


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    backend: str = "auto",
) -> Tensor:
    """Deformable convolution, v1 (``mask`` None) or modulated v2.

    Args:
        x: (B, C_in, H, W).
        offset: (B, 2 * G * kh * kw, H_out, W_out), G deformable groups, (dy, dx) per kernel point.
        weight: (C_out, C_in / groups, kh, kw).
        bias: (C_out,) or None.
        mask: (B, G * kh * kw, H_out, W_out) modulation in [0, 1] (already through a sigmoid).
        stride, padding, dilation: int or pair.
        groups: convolution groups (ResNeXt).
        backend: "auto" (detectron2's kernels for CUDA inputs when compiled, else torchvision),
            "detectron2" or "torchvision".
    Returns:
        (B, C_out, H_out, W_out).
    """
    if backend not in ("auto", "detectron2", "torchvision"):
        raise ValueError(f"deform_conv2d backend must be auto/detectron2/torchvision: {backend!r}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    # the kernels expect NCHW strides, size-1 dimensions included: a channels-last 1x1 weight
    # (MODEL.SOLO.CHANNELS_LAST) passes .contiguous() with strides (C, 1, C, C), and
    # torchvision's backward then writes its gradient into overlapping memory
    x, offset, weight = _nchw(x), _nchw(offset), _nchw(weight)
    mask = None if mask is None else _nchw(mask)
    use_d2 = backend == "detectron2" or (
        backend == "auto" and x.is_cuda and detectron2_deform_ops_available()
    )
    if use_d2:
        if not detectron2_deform_ops_available():
            raise RuntimeError("detectron2's deformable-conv ops are not compiled in this install")
        if not x.is_cuda:
            raise RuntimeError("detectron2's deformable-conv ops run on CUDA tensors only")
        return _detectron2_deform_conv(
            x, offset, weight, bias, mask, stride, padding, dilation, groups
        )
    return torchvision.ops.deform_conv2d(
        x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _nchw(t: Tensor) -> Tensor:
    """``t`` with the standard (row-major) strides in every dimension."""
    standard, step = [], 1
    for size in reversed(t.shape):
        standard.append(step)
        step *= size
    return (
        t
        if t.stride() == tuple(reversed(standard))
        else t.clone(memory_format=torch.contiguous_format)
    )


def _detectron2_deform_conv(x, offset, weight, bias, mask, stride, padding, dilation, groups):
    from detectron2.layers.deform_conv import deform_conv, modulated_deform_conv

    kh, kw = weight.shape[-2:]
    deformable_groups = offset.shape[1] // (2 * kh * kw)
    if mask is None:
        out = deform_conv(x, offset, weight, stride, padding, dilation, groups, deformable_groups)
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    # detectron2's modulated op takes square int stride/padding/dilation
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if v[0] != v[1]:
            raise ValueError(f"detectron2's modulated deformable conv needs a square {name}: {v}")
    return modulated_deform_conv(
        x, offset, mask, weight, bias, stride[0], padding[0], dilation[0], groups, deformable_groups
    )


class DeformConv(nn.Module):
    """Deformable conv whose offsets (and DCNv2 mask) are inputs, as detectron2's DeformConv and
    ModulatedDeformConv (same parameters: ``weight``, optional ``bias``, ``norm``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
        activation=None,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm = norm
        self.activation = activation
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def output_size(self, h: int, w: int):
        return tuple(
            (i + 2 * p - (d * (k - 1) + 1)) // s + 1
            for i, p, d, k, s in zip(
                (h, w), self.padding, self.dilation, self.kernel_size, self.stride
            )
        )

    def forward(self, x: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: (B, C_in, H, W).
            offset: (B, 2 * G * kh * kw, H_out, W_out).
            mask: (B, G * kh * kw, H_out, W_out) in [0, 1] for DCNv2, None for DCNv1.
        """
        if x.numel() == 0:  # empty batch: a correctly shaped empty output
            out = x.new_zeros(x.shape[0], self.out_channels, *self.output_size(*x.shape[-2:]))
        else:
            out = deform_conv2d(
                x, offset, self.weight, self.bias, mask,
                stride=self.stride, padding=self.padding, dilation=self.dilation,
                groups=self.groups,
            )  # fmt: skip
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deformable_groups={self.deformable_groups}, "
            f"bias={self.bias is not None}"
        )


class DeformConvPack(DeformConv):
    """Deformable conv that predicts its own offsets with a conv ``conv_offset`` (mmcv layout).

    ``conv_offset`` has the same kernel, stride, padding and dilation and outputs
    ``G * 2 * kh * kw`` channels (DCNv1) or ``G * 3 * kh * kw`` (DCNv2: the first two thirds are
    the offsets, the last third the mask logits). It starts at zero: a regular conv at first.
    """

    def __init__(self, *args, modulated: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.modulated = modulated
        kh, kw = self.kernel_size
        per_point = 3 if modulated else 2
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.deformable_groups * per_point * kh * kw,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_offset(x)
        if not self.modulated:
            return super().forward(x, out)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        return super().forward(x, torch.cat([o1, o2], dim=1), mask.sigmoid())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", modulated={self.modulated}"
