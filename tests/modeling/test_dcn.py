"""Deformable convolution: torchvision path against a naive implementation and hand cases,
detectron2's compiled path against torchvision where both exist, module layouts, DCN backbone."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import solo_cfg
from detectron2.layers import ShapeSpec

from solo_d2.modeling.backbone import DeformBottleneckBlock, build_solo_resnet_fpn_backbone
from solo_d2.modeling.dcn import (
    DeformConv,
    DeformConvPack,
    deform_conv2d,
    detectron2_deform_ops_available,
)


def bilinear_zero(x, py, px):
    """Sample (B, C, H, W) at float points (B, Ho, Wo); corners outside the image read 0."""
    b, c, h, w = x.shape
    y0, x0 = torch.floor(py), torch.floor(px)
    out = x.new_zeros(b, c, *py.shape[1:])
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            yi, xi = yy.clamp(0, h - 1).long(), xx.clamp(0, w - 1).long()
            flat = (yi * w + xi).view(b, 1, -1).expand(b, c, -1)
            v = torch.gather(x.flatten(2), 2, flat).view(b, c, *py.shape[1:])
            out += v * (wy * wx * inside)[:, None]
    return out


def naive_deform_conv(x, offset, weight, bias, mask, stride, padding, dilation, groups):
    """Straight from the definition: sample every kernel point at its shifted location, then a
    (grouped) weighted sum. Offset channels per deformable group: (dy, dx) per kernel point."""
    b, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    dg = offset.shape[1] // (2 * kh * kw)
    cpg = c // dg
    base_y = (torch.arange(ho, dtype=x.dtype) * stride - padding)[None, :, None]
    base_x = (torch.arange(wo, dtype=x.dtype) * stride - padding)[None, None, :]
    cols = x.new_zeros(b, c, kh * kw, ho, wo)
    for g in range(dg):
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                dy = offset[:, g * 2 * kh * kw + 2 * k]
                dx = offset[:, g * 2 * kh * kw + 2 * k + 1]
                v = bilinear_zero(
                    x[:, g * cpg : (g + 1) * cpg], base_y + i * dilation + dy,
                    base_x + j * dilation + dx,
                )  # fmt: skip
                if mask is not None:
                    v = v * mask[:, g * kh * kw + k][:, None]
                cols[:, g * cpg : (g + 1) * cpg, k] = v
    cin_g, cout_g = c // groups, cout // groups
    out = torch.cat(
        [
            torch.einsum(
                "ock,bckhw->bohw",
                weight[n * cout_g : (n + 1) * cout_g].flatten(2),
                cols[:, n * cin_g : (n + 1) * cin_g],
            )
            for n in range(groups)
        ],
        dim=1,
    )
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize(
    "stride,padding,dilation,groups,dg", [(1, 1, 1, 1, 1), (2, 1, 1, 2, 2), (1, 2, 2, 1, 1)]
)
def test_torchvision_path_matches_naive(modulated, stride, padding, dilation, groups, dg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    ho = (7 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (9 + 2 * padding - dilation * 2 - 1) // stride + 1
    # offsets up to +-3 px: fractional samples, some fully or partly outside the image
    offset = 3 * torch.randn(2, dg * 18, ho, wo, generator=g, dtype=torch.float64)
    mask = torch.rand(2, dg * 9, ho, wo, generator=g, dtype=torch.float64) if modulated else None
    args = (stride, padding, dilation, groups)
    got = deform_conv2d(
        x, offset, weight, bias, mask, stride=stride, padding=padding, dilation=dilation,
        groups=groups, backend="torchvision",
    )  # fmt: skip
    expected = naive_deform_conv(x, offset, weight, bias, mask, *args)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_hand_case_half_pixel_shift_averages_rows():
    """A 1x1 kernel of weight 1 with dy = 0.5 everywhere reads the mean of rows r and r+1; the
    last row's lower neighbour is outside and reads 0 (so it is halved)."""
    x = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    offset = torch.zeros(1, 2, 3, 4)
    offset[:, 0] = 0.5
    out = deform_conv2d(x, offset, torch.ones(1, 1, 1, 1), backend="torchvision")
    expected = torch.tensor([[2.0, 3, 4, 5], [6, 7, 8, 9], [4, 4.5, 5, 5.5]])
    torch.testing.assert_close(out[0, 0], expected)
    # and dx = -1 reads the left neighbour (0 in the first column)
    offset = torch.zeros(1, 2, 3, 4)
    offset[:, 1] = -1.0
    out = deform_conv2d(x, offset, torch.ones(1, 1, 1, 1), backend="torchvision")
    expected = torch.tensor([[0.0, 0, 1, 2], [0, 4, 5, 6], [0, 8, 9, 10]])
    torch.testing.assert_close(out[0, 0], expected)


def test_zero_offsets_equal_a_regular_conv():
    """In float64: the two sum their 72 products in other orders (float32 would differ by ~1e-6
    of the result, depending on the CPU's kernels)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 12, dtype=torch.float64)
    weight, bias = torch.randn(5, 8, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    offset = torch.zeros(2, 18, 5, 6, dtype=torch.float64)
    out = deform_conv2d(x, offset, weight, bias, stride=2, padding=1)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, stride=2, padding=1))


@pytest.mark.parametrize("modulated", [False, True])
def test_pack_starts_as_a_conv_and_has_mmcv_keys(modulated):
    """conv_offset starts at zero: DCNv1 = conv; DCNv2 = conv * sigmoid(0) = half of it (in
    float64, as above)."""
    torch.manual_seed(0)
    m = DeformConvPack(8, 4, 3, padding=1, bias=True, modulated=modulated).double()
    assert set(m.state_dict()) == {"weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    assert m.conv_offset.weight.shape == (27 if modulated else 18, 8, 3, 3)
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    conv = F.conv2d(x, m.weight, None, padding=1)
    expected = (0.5 * conv if modulated else conv) + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), expected)
    pack_1x1 = DeformConvPack(128, 256, 1, modulated=True)
    assert pack_1x1.conv_offset.weight.shape == (3, 128, 1, 1)  # official conv_pred DCNv2 key


def test_gradients_reach_offsets_and_weights():
    torch.manual_seed(0)
    m = DeformConvPack(4, 4, 3, padding=1, modulated=True)
    torch.nn.init.normal_(m.conv_offset.weight, std=0.1)
    m(torch.randn(1, 4, 8, 8)).square().sum().backward()
    for p in (m.weight, m.conv_offset.weight, m.conv_offset.bias):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", [1, 3])
def test_channels_last_weights_train_like_nchw(kernel):
    """MODEL.SOLO.CHANNELS_LAST stores every 4-D weight NHWC; a 1x1 one then has strides
    (C, 1, C, C), which torchvision's backward cannot write its gradient into. Same outputs and
    gradients as NCHW weights."""
    torch.manual_seed(0)
    ref = DeformConvPack(8, 16, kernel, padding=kernel // 2, modulated=True)
    torch.nn.init.normal_(ref.conv_offset.weight, std=0.1)
    fast = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    x = torch.randn(1, 8, 6, 7)
    outs = []
    for m, inp in ((ref, x), (fast, x.contiguous(memory_format=torch.channels_last))):
        out = m(inp)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


def test_empty_batch_and_bad_backend():
    m = DeformConv(4, 6, 3, stride=2, padding=1)
    out = m(torch.zeros(0, 4, 9, 9), torch.zeros(0, 18, 5, 5))
    assert out.shape == (0, 6, 5, 5)
    with pytest.raises(ValueError, match="backend"):
        deform_conv2d(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 1, 1),
                      backend="cuda")  # fmt: skip


def test_detectron2_backend_refuses_clearly_when_unavailable():
    if detectron2_deform_ops_available() and torch.cuda.is_available():
        pytest.skip("detectron2's ops and CUDA are present: covered by the agreement test")
    with pytest.raises(RuntimeError, match="detectron2"):
        deform_conv2d(
            torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 1, 1),
            backend="detectron2",
        )  # fmt: skip


@pytest.mark.skipif(
    not (torch.cuda.is_available() and detectron2_deform_ops_available()),
    reason="needs CUDA and detectron2 compiled with its _C ops (absent in the offline install)",
)
@pytest.mark.parametrize("modulated", [False, True])
def test_detectron2_and_torchvision_paths_agree_on_gpu(modulated):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 14, generator=g).cuda()
    weight = torch.randn(8, 4, 3, 3, generator=g).cuda()
    offset = (2 * torch.randn(2, 36, 6, 7, generator=g)).cuda()
    mask = torch.rand(2, 18, 6, 7, generator=g).cuda() if modulated else None
    bias = torch.randn(8, generator=g).cuda() if modulated else None
    kw = dict(stride=2, padding=1, groups=2)
    d2 = deform_conv2d(x, offset, weight, bias, mask, backend="detectron2", **kw)
    tv = deform_conv2d(x, offset, weight, bias, mask, backend="torchvision", **kw)
    torch.testing.assert_close(d2, tv, rtol=1e-4, atol=1e-4)


def _dcn_cfg(modulated, depth=50, groups=1, width=64):
    return solo_cfg(
        opts=[
            "MODEL.RESNETS.DEPTH", depth,
            "MODEL.RESNETS.NUM_GROUPS", groups,
            "MODEL.RESNETS.WIDTH_PER_GROUP", width,
            "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True],
            "MODEL.RESNETS.DEFORM_MODULATED", modulated,
        ]
    )  # fmt: skip


@pytest.mark.parametrize("modulated", [False, True])
def test_dcn_backbone_keys_and_forward(modulated):
    """detectron2's parameter names (conv2_offset beside conv2), offsets 18/27 channels, and a
    backbone that runs on CPU with its P2-P6 outputs."""
    torch.manual_seed(0)
    backbone = build_solo_resnet_fpn_backbone(_dcn_cfg(modulated), ShapeSpec(channels=3))
    sd = backbone.state_dict()
    assert sd["bottom_up.res3.0.conv2_offset.weight"].shape == (27 if modulated else 18, 128, 3, 3)
    assert "bottom_up.res3.0.conv2.norm.weight" in sd
    assert not any("conv2_offset" in k for k in sd if k.startswith("bottom_up.res2."))
    assert isinstance(backbone.bottom_up.res5[0], DeformBottleneckBlock)
    out = backbone(torch.randn(1, 3, 64, 96))
    assert [out[k].shape[-2:] for k in ("p2", "p6")] == [(16, 24), (1, 2)]


def test_dcn_backbone_without_deform_is_detectron2_resnet():
    """Same parameter names and shapes as detectron2's builder when no stage is deformable."""
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    cfg = _dcn_cfg(False, depth=50, groups=32, width=4)
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    ours = build_solo_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    theirs = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
