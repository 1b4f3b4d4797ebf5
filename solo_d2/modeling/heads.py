"""Heads of the SOLO family: one category branch, a mask branch per variant.

SOLO and Decoupled SOLO: Wang et al., "SOLO: Segmenting Objects by Locations", ECCV 2020, and
"SOLO: A Simple Framework for Instance Segmentation", TPAMI 2021; SOLOv2: Wang et al., "SOLOv2:
Dynamic and Fast Instance Segmentation", NeurIPS 2020. Reference code: WXinlong/SOLO and
aim-uofa/AdelaiDet.

Shape shorthand:
    B: images in the batch        L: instance levels (5)          S_l: grid size of level l
    C: foreground classes         E: dynamic-kernel length (= mask-feature channels)
    Hf, Wf: mask-feature size (stride 4 of the padded batch)
    h_l, w_l: size of level l's mask prediction (SOLO / Decoupled SOLO: 2x the level's features)
    P: positive samples

Every variant predicts, per level, C class logits on an S x S grid (the category branch, shared
by :class:`SOLOHead`) and a mask for every grid cell; the variants differ only in how a cell's
mask is represented, and each head is the one place that says how to read it
(``positive_masks`` in training, ``soft_mask_fn`` at inference and in export):

    ============================  =================================================  ==============
    head (MODEL.SOLO.HEAD)        mask of cell (i, j) of level l                      mask stride
    ============================  =================================================  ==============
    SOLOv2InstanceHead            sigmoid(kernel_l[i, j] . mask_features)             4
    SOLOInstanceHead              sigmoid(M_l[i * S + j])            (S^2 maps)       stride_l / 2
    DecoupledSOLOInstanceHead     sigmoid(Y_l[i]) * sigmoid(X_l[j])  (2 x S maps)     stride_l / 2
    DecoupledSOLOLightInstanceHead  as Decoupled, one shared mask tower               stride_l / 2
    ============================  =================================================  ==============

Module names: SOLOv2's follow AdelaiDet (``ins_head.cate_tower.{3i}``,
``mask_head.convs_all_levels.{l}.conv{j}.0`` ...), so its published checkpoints load unchanged;
the other variants use the same scheme (``ins_head.mask_tower.{3i}``, ``ins_head.mask_preds.{l}``,
``mask_tower_x``/``_y``, ``mask_preds_x``/``_y``); solo_d2.model_zoo.official maps the official
SOLO repository's names onto them.
"""

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from .dcn import DCN_TYPES, DeformConv, DeformConvPack
from .postprocessing import cell_levels

__all__ = [
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
    "mask_target_strides",
    "mask_stride",
    "SoftMasks",
    "SOLOHead",
    "SOLOv2InstanceHead",
    "SOLOInstanceHead",
    "DecoupledSOLOInstanceHead",
    "DecoupledSOLOLightInstanceHead",
    "SOLOv2MaskHead",
    "coord_features",
    "split_instance_features",
]

# f(cells) -> soft masks: cells (n,) int64 indices into the concatenated cells of all levels
# (level-major, row-major inside a level), masks (n, Hf, Wf) probabilities.
SoftMasks = Callable[[Tensor], Tensor]

SOLO_HEAD_REGISTRY = Registry("SOLO_HEAD")
SOLO_HEAD_REGISTRY.__doc__ = """
Instance heads of the SOLO family (category branch + the variant's mask branch), chosen by
``MODEL.SOLO.HEAD``. The registered object is called with ``obj(cfg, input_shape)``, where
``input_shape`` is one ShapeSpec per instance level, and must return a :class:`SOLOHead`.
"""


def build_solo_head(cfg, input_shape: List[ShapeSpec]) -> "SOLOHead":
    """Build the instance head named by ``cfg.MODEL.SOLO.HEAD``."""
    return _head_class(cfg.MODEL.SOLO.HEAD)(cfg, input_shape)


def _head_class(name: str):
    if name not in SOLO_HEAD_REGISTRY:
        raise ValueError(
            f"MODEL.SOLO.HEAD={name!r} is not a registered SOLO head; registered: "
            f"{sorted(n for n, _ in SOLO_HEAD_REGISTRY)}"
        )
    return SOLO_HEAD_REGISTRY.get(name)


def mask_target_strides(cfg) -> List[int]:
    """Strides at which ``cfg``'s model predicts masks, one per instance level.

    The one place these are derived from a config: the model (:class:`~.meta_arch.SOLO`) and the
    dataset mapper both read them here. The mapper rescales every ground-truth mask to each
    distinct stride (see targets.mask_target_field).
    """
    return _head_class(cfg.MODEL.SOLO.HEAD).mask_target_strides(cfg)


def mask_stride(cfg) -> int:
    """The model's mask stride: the finest of :func:`mask_target_strides`. Soft masks at
    inference and the ``gt_masks_small`` training field are at this stride."""
    return min(mask_target_strides(cfg))


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


def _fpn_stride(name: str) -> int:
    """Stride of FPN level ``"pN"``: 2^N."""
    if len(name) < 2 or name[0] != "p" or not name[1:].isdigit():
        raise ValueError(f"MODEL.SOLO.MASK_IN_FEATURES[0] must be an FPN level 'pN', got {name!r}")
    return 2 ** int(name[1:])


def _check_dcn(dcn: str, dcn_convs: str, key: str) -> None:
    if dcn not in DCN_TYPES:
        raise ValueError(f"MODEL.SOLO.{key} must be one of {sorted(DCN_TYPES)}, got {dcn!r}")
    if dcn_convs not in ("all", "last"):
        raise ValueError(f"MODEL.SOLO.TOWER_DCN_CONVS must be 'all' or 'last', got {dcn_convs!r}")


def _conv(in_ch: int, out_ch: int, kernel: int, bias: bool, dcn: str = "") -> nn.Module:
    """A conv of the given kernel ('same' padding): plain, DCNv1 ("DCN") or DCNv2 ("DCNv2")."""
    if not dcn:
        return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias)
    return DeformConvPack(
        in_ch, out_ch, kernel, padding=kernel // 2, bias=bias, modulated=DCN_TYPES[dcn]
    )


def _conv_norm_relu(in_ch: int, out_ch: int, kernel: int, norm: str, dcn: str = "") -> List:
    layers = [_conv(in_ch, out_ch, kernel, bias=not norm, dcn=dcn)]
    if norm:
        layers.append(get_norm(norm, out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _tower(
    in_channels: int, channels: int, num_convs: int, norm: str, dcn: str, dcn_convs: str
) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, norm, ReLU); conv i is at index 3i when there is a norm.

    ``dcn_convs`` says which convs are deformable when ``dcn`` is set: "all", or "last" (the
    official light heads).
    """
    layers = []
    for i in range(num_convs):
        deform = dcn if dcn_convs == "all" or i == num_convs - 1 else ""
        layers += _conv_norm_relu(in_channels if i == 0 else channels, channels, 3, norm, deform)
    return nn.Sequential(*layers)


def _init_normal(module: nn.Module, std: float = 0.01) -> None:
    """normal(std) weights and zero biases for every conv, leaving DCN offset convs at zero."""
    for name, m in module.named_modules():
        if name.endswith("conv_offset"):
            continue
        if isinstance(m, (nn.Conv2d, DeformConv)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)


def _prior_bias(prior_prob: float) -> float:
    return -math.log((1 - prior_prob) / prior_prob)


class SOLOHead(nn.Module):
    """Base of the instance heads: the category branch and the mask-branch interface.

    Category branch, per level: the level's feature is resized to
    S_l x S_l (bilinear, not aspect-preserving), goes through ``cate_tower`` (3x3 conv, GN, ReLU)
    and ``cate_pred`` (3x3 conv to C logits, bias at the prior probability).

    Subclasses implement the mask branch, and are the only place that knows how its output
    is read:

    * :meth:`forward_mask` - the level's mask prediction from its feature;
    * :meth:`positive_masks` - (training) mask probabilities of positive cells;
    * :meth:`soft_mask_fn` - (inference and export) a function from cells to soft masks;
    * :meth:`mask_target_strides` - the stride of each level's mask prediction.

    ``uses_mask_features``: the masks need the separate mask-feature branch (SOLOv2).
    ``last_instance_wins``: the target policy of a grid cell covered by several instances (see
    :func:`~.targets.assign_grid_targets`): one positive, the last instance's (SOLO v1 and
    Decoupled SOLO: the reference writes dense per-cell mask targets in turn), or one positive per
    instance (SOLOv2).
    """

    uses_mask_features = False
    last_instance_wins = True

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_grids: List[int],
        channels: int,
        num_convs: int,
        norm: str,
        prior_prob: float,
        tower_dcn: str = "",
        tower_dcn_convs: str = "all",
    ):
        """
        Args:
            in_channels: channels of every input level.
            num_classes: C, foreground classes.
            num_grids: S per level.
            channels: tower width.
            num_convs: 3x3 convs per tower.
            norm: "GN" or "" (no norm; convs then get a bias).
            prior_prob: initial classifier probability.
            tower_dcn: "" (plain convs), "DCN" (v1) or "DCNv2" (modulated) tower convs.
            tower_dcn_convs: "all" tower convs deformable, or only the "last" one.
        """
        super().__init__()
        _check_dcn(tower_dcn, tower_dcn_convs, "TOWER_DCN")
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self._tower_args = dict(
            channels=channels, num_convs=num_convs, norm=norm, dcn=tower_dcn,
            dcn_convs=tower_dcn_convs,
        )  # fmt: skip
        self.cate_tower = self._make_tower(in_channels)
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.prior_prob = prior_prob

    def _make_tower(self, in_channels: int) -> nn.Sequential:
        return _tower(in_channels, **self._tower_args)

    def _init_head_weights(self) -> None:
        """Reference init: normal(0.01) convs, classifier bias at the prior probability."""
        _init_normal(self)
        nn.init.constant_(self.cate_pred.bias, _prior_bias(self.prior_prob))

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
            "norm": cfg.MODEL.SOLO.NORM,
            "prior_prob": cfg.MODEL.SOLO.PRIOR_PROB,
            "tower_dcn": cfg.MODEL.SOLO.TOWER_DCN,
            "tower_dcn_convs": cfg.MODEL.SOLO.TOWER_DCN_CONVS,
        }

    @classmethod
    def mask_target_strides(cls, cfg) -> List[int]:
        """Stride (in input pixels) of each level's mask prediction, from the config alone."""
        raise NotImplementedError

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features: L maps (B, in_channels, H_l, W_l), already split (strides 8,8,16,32,32).
        Returns:
            cate_logits: L tensors (B, C, S_l, S_l).
            mask_preds: L tensors, the variant's mask predictions (see :meth:`forward_mask`).
        """
        cate_logits, mask_preds = [], []
        for level, (feat, s) in enumerate(zip(features, self.num_grids)):
            cate_in = F.interpolate(feat, size=(s, s), mode="bilinear")
            cate_logits.append(self.cate_pred(self.cate_tower(cate_in)))
            mask_preds.append(self.forward_mask(feat, level))
        return cate_logits, mask_preds

    def forward_mask(self, feature: Tensor, level: int) -> Tensor:
        raise NotImplementedError

    def positive_masks(
        self, mask_pred: Tensor, mask_feat: Optional[Tensor], images: Tensor, cells: Tensor
    ) -> Tensor:
        """Mask probabilities of positive cells of one level.

        Args:
            mask_pred: the level's entry of ``forward``'s mask_preds.
            mask_feat: (B, E, Hf, Wf) mask features, or None if the head uses none.
            images, cells: (P,) int64 image index and cell index ``i * S + j`` of each positive.
        Returns:
            (P, h, w) probabilities at the level's mask stride (of the padded canvas).
        """
        raise NotImplementedError

    def soft_mask_fn(
        self,
        mask_preds: List[Tensor],
        mask_feat: Optional[Tensor],
        image: int,
        out_hw: Tuple[int, int],
    ) -> SoftMasks:
        """Inference: a function from cells of one image to their soft masks.

        The one implementation of the variant's mask reading at inference, used by eager
        post-processing (:func:`~.postprocessing.solo_postprocess`) and by export
        (:class:`solo_d2.export.SOLOExportable`) alike. It must trace: tensor operations only
        (comparisons, gather/index, ``nonzero``, ``index_put``), no Python branch or loop that
        depends on the data, and a valid (0, Hf, Wf) result for n = 0 cells.

        Args:
            mask_preds, mask_feat: outputs for the whole batch.
            image: index of the image in the batch.
            out_hw: (Hf, Wf) size of the soft masks (the padded canvas at the mask stride).
        Returns:
            f(cells) with cells (n,) int64 indices into the levels' cells concatenated
            (level-major, row-major inside a level), returning (n, Hf, Wf) probabilities.
        """
        raise NotImplementedError


@SOLO_HEAD_REGISTRY.register()
class SOLOv2InstanceHead(SOLOHead):
    """SOLOv2: a dynamic 1x1 kernel per cell applied to the unified mask features (Fig. 3)."""

    uses_mask_features = True
    last_instance_wins = False  # a shared cell trains once per covering instance

    @configurable
    def __init__(self, *, num_kernels: int, **kwargs):
        """
        Args:
            num_kernels: E, dynamic 1x1 kernel length.
            kwargs: as :class:`SOLOHead`.
        """
        super().__init__(**kwargs)
        self.num_kernels = num_kernels
        # the kernel tower sees the two CoordConv channels; the category tower does not
        self.kernel_tower = self._make_tower(kwargs["in_channels"] + 2)
        self.kernel_pred = nn.Conv2d(self._tower_args["channels"], num_kernels, 3, padding=1)
        self._init_head_weights()

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        return {**super().from_config(cfg, input_shape), "num_kernels": cfg.MODEL.SOLO.NUM_KERNELS}

    @classmethod
    def mask_target_strides(cls, cfg) -> List[int]:
        stride = _fpn_stride(cfg.MODEL.SOLO.MASK_IN_FEATURES[0])
        return [stride] * len(cfg.MODEL.SOLO.NUM_GRIDS)

    def forward_mask(self, feature: Tensor, level: int) -> Tensor:
        """(B, E, S_l, S_l) kernels. CoordConv channels are appended *before* the S x S resize
        (reference order: the kernel tower sees resampled coordinates)."""
        s = self.num_grids[level]
        x = torch.cat([feature, coord_features(feature)], dim=1)
        x = F.interpolate(x, size=(s, s), mode="bilinear")
        return self.kernel_pred(self.kernel_tower(x))

    def positive_masks(self, mask_pred, mask_feat, images, cells):
        kernels = mask_pred.flatten(2)[images, :, cells]  # (P, E)
        b, e, hf, wf = mask_feat.shape
        out = mask_feat.new_empty(len(cells), hf, wf)
        feat = mask_feat.flatten(2)  # (B, E, Hf*Wf)
        for i in images.unique().tolist():  # one matmul per image: its kernels on its features
            sel = images == i
            out[sel] = torch.sigmoid(kernels[sel] @ feat[i]).view(-1, hf, wf)
        return out

    def soft_mask_fn(self, mask_preds, mask_feat, image, out_hw):
        """sigmoid(kernel . features): (G, E) kernels of all cells on the (E, Hf * Wf) features."""
        e, hf, wf = mask_feat[image].shape
        if (hf, wf) != tuple(out_hw):  # sizes are constants of a trace: no branch is recorded
            raise ValueError(f"mask features {(hf, wf)} != canvas/stride {tuple(out_hw)}")
        kernels = torch.cat([k[image].permute(1, 2, 0).reshape(-1, e) for k in mask_preds])
        feat = mask_feat[image].reshape(e, hf * wf)
        return lambda cells: torch.sigmoid_(kernels[cells] @ feat).reshape(-1, hf, wf)


def _upsample2x(x: Tensor) -> Tensor:
    # the reference's F.interpolate(scale_factor=2, bilinear), written with the exact output size
    return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear")


class _LevelMaskHead(SOLOHead):
    """Shared parts of SOLO v1 and Decoupled SOLO: masks predicted from each level's features at
    twice their resolution, so at stride ``instance_stride / 2`` (4, 4, 8, 16, 16)."""

    @classmethod
    def mask_target_strides(cls, cfg) -> List[int]:
        strides = cfg.MODEL.SOLO.FPN_INSTANCE_STRIDES
        if any(s % 2 for s in strides):
            raise ValueError(f"MODEL.SOLO.FPN_INSTANCE_STRIDES must be even, got {strides}")
        return [s // 2 for s in strides]

    def _init_mask_preds(self, *module_lists: nn.ModuleList) -> None:
        # the mask outputs start at the prior probability too (reference bias_init_with_prob)
        for preds in module_lists:
            for conv in preds:
                nn.init.constant_(conv.bias, _prior_bias(self.prior_prob))


@SOLO_HEAD_REGISTRY.register()
class SOLOInstanceHead(_LevelMaskHead):
    """SOLO (v1): S^2 mask maps per level, one per grid cell."""

    @configurable
    def __init__(self, **kwargs):
        """Arguments as :class:`SOLOHead`."""
        super().__init__(**kwargs)
        channels = self._tower_args["channels"]
        self.mask_tower = self._make_tower(kwargs["in_channels"] + 2)  # + x, y coordinates
        self.mask_preds = nn.ModuleList(nn.Conv2d(channels, s * s, 1) for s in self.num_grids)
        self._init_head_weights()
        self._init_mask_preds(self.mask_preds)

    def forward_mask(self, feature: Tensor, level: int) -> Tensor:
        """(B, S_l^2, 2H_l, 2W_l) mask logits, channel i * S + j for cell (i, j)."""
        x = torch.cat([feature, coord_features(feature)], dim=1)
        return self.mask_preds[level](_upsample2x(self.mask_tower(x)))

    def positive_masks(self, mask_pred, mask_feat, images, cells):
        return torch.sigmoid(mask_pred[images, cells])

    def soft_mask_fn(self, mask_preds, mask_feat, image, out_hw):
        """Each cell's own map (channel ``i * S + j`` of its level), through a sigmoid, bilinearly
        resized to the canvas (as the reference)."""
        maps = [m[image] for m in mask_preds]  # per level (S_l^2, h_l, w_l) logits

        def soft_masks(cells: Tensor) -> Tensor:
            levels, local = cell_levels(cells, self.num_grids)
            out = maps[0].new_zeros((cells.shape[0],) + tuple(out_hw))
            for level, m in enumerate(maps):  # the fixed levels; an empty selection is valid
                sel = (levels == level).nonzero()[:, 0]
                probs = m[local[sel]].sigmoid()[:, None]  # (n_l, 1, h_l, w_l): empty batch ok
                out.index_put_((sel,), F.interpolate(probs, size=out_hw, mode="bilinear")[:, 0])
            return out

        return soft_masks


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOInstanceHead(_LevelMaskHead):
    """Decoupled SOLO: S column maps X and S row maps Y per level; cell (i, j)'s mask is
    sigmoid(Y[i]) * sigmoid(X[j]). Two mask towers, the X one sees the x coordinate and the Y one
    the y coordinate."""

    @configurable
    def __init__(self, **kwargs):
        """Arguments as :class:`SOLOHead`."""
        super().__init__(**kwargs)
        self._build_mask_branch(kwargs["in_channels"])
        channels = self._tower_args["channels"]
        self.mask_preds_x = nn.ModuleList(
            nn.Conv2d(channels, s, 3, padding=1) for s in self.num_grids
        )
        self.mask_preds_y = nn.ModuleList(
            nn.Conv2d(channels, s, 3, padding=1) for s in self.num_grids
        )
        self._init_head_weights()
        self._init_mask_preds(self.mask_preds_x, self.mask_preds_y)

    def _build_mask_branch(self, in_channels: int) -> None:
        self.mask_tower_x = self._make_tower(in_channels + 1)
        self.mask_tower_y = self._make_tower(in_channels + 1)

    def _mask_features(self, feature: Tensor) -> Tuple[Tensor, Tensor]:
        coords = coord_features(feature)
        fx = self.mask_tower_x(torch.cat([feature, coords[:, :1]], dim=1))
        fy = self.mask_tower_y(torch.cat([feature, coords[:, 1:]], dim=1))
        return fx, fy

    def forward_mask(self, feature: Tensor, level: int) -> Tensor:
        """(B, 2, S_l, 2H_l, 2W_l) logits: [:, 0] the X (column) maps, [:, 1] the Y (row) maps."""
        fx, fy = self._mask_features(feature)
        x = self.mask_preds_x[level](_upsample2x(fx))
        y = self.mask_preds_y[level](_upsample2x(fy))
        return torch.stack([x, y], dim=1)

    def positive_masks(self, mask_pred, mask_feat, images, cells):
        s = mask_pred.shape[2]
        return torch.sigmoid(mask_pred[images, 1, cells // s]) * torch.sigmoid(
            mask_pred[images, 0, cells % s]
        )

    def soft_mask_fn(self, mask_preds, mask_feat, image, out_hw):
        """``Y[i] * X[j]`` for cell (i, j). As the reference: sigmoid, resize every level's maps to
        the canvas, concatenate the levels; with ``off_l`` the maps of the levels before l, cell
        ``k = i * S_l + j`` of level l reads ``X[off_l + j]`` and ``Y[off_l + i]``."""
        up = [F.interpolate(m[image].sigmoid(), size=out_hw, mode="bilinear") for m in mask_preds]
        x_probs = torch.cat([u[0] for u in up])  # (sum S_l, Hf, Wf)
        y_probs = torch.cat([u[1] for u in up])
        grids = torch.tensor(self.num_grids, device=x_probs.device)
        offsets = grids.cumsum(0) - grids

        def soft_masks(cells: Tensor) -> Tensor:
            levels, local = cell_levels(cells, self.num_grids)
            s = grids[levels]
            rows = torch.div(local, s, rounding_mode="floor")
            cols = local - rows * s
            return x_probs[cols + offsets[levels]] * y_probs[rows + offsets[levels]]

        return soft_masks


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOLightInstanceHead(DecoupledSOLOInstanceHead):
    """Decoupled SOLO light: one mask tower (with both coordinates) feeds both the X and the Y
    predictions."""

    def _build_mask_branch(self, in_channels: int) -> None:
        self.mask_tower = self._make_tower(in_channels + 2)

    def _mask_features(self, feature: Tensor) -> Tuple[Tensor, Tensor]:
        f = self.mask_tower(torch.cat([feature, coord_features(feature)], dim=1))
        return f, f


class SOLOv2MaskHead(nn.Module):
    """Unified mask-feature branch: all levels brought to the first level's stride and summed."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_levels: int,
        channels: int,
        num_kernels: int,
        norm: str,
        dcn: str = "",
    ):
        """
        Args:
            in_channels: channels of every input level.
            num_levels: inputs (P2..P5: 4); level l is upsampled l times by 2.
            channels: hidden width.
            num_kernels: E, output channels.
            norm: "GN" or "". The 1x1 output conv always has GroupNorm, as in the reference.
            dcn: "" or a deformable type ("DCN", "DCNv2") for every conv of the branch, the 1x1
                output conv included (official SOLOv2-DCN models).
        """
        super().__init__()
        _check_dcn(dcn, "all", "MASK_DCN")
        self.convs_all_levels = nn.ModuleList()
        for level in range(num_levels):
            tower = nn.Sequential()
            for j in range(max(level, 1)):
                if j == 0:  # the deepest level also receives the two CoordConv channels
                    in_ch = in_channels + (2 if level == num_levels - 1 else 0)
                else:
                    in_ch = channels
                tower.add_module(
                    f"conv{j}", nn.Sequential(*_conv_norm_relu(in_ch, channels, 3, norm, dcn))
                )
                if level > 0:
                    tower.add_module(
                        f"upsample{j}",
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    )
            self.convs_all_levels.append(tower)
        self.conv_pred = nn.Sequential(*_conv_norm_relu(channels, num_kernels, 1, "GN", dcn))
        _init_normal(self)

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
            "dcn": cfg.MODEL.SOLO.MASK_DCN,
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
