"""Hand-checked tests of SOLOv2 inference post-processing."""

import math

import pytest
import torch

from solo_d2.modeling.postprocessing import (
    mask_nms,
    masks_to_boxes,
    matrix_nms,
    point_nms,
    resize_masks,
    solo_postprocess,
)


def bits(*rows: str) -> torch.Tensor:
    """Masks written as strings of 0/1 pixels: bits("1100", "0110") -> (2, 4) bool."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


# --------------------------------------------------------------------------------------------
# point_nms
# --------------------------------------------------------------------------------------------


def test_point_nms_asymmetric_window():
    """A cell is kept iff it is >= its up, left and up-left neighbours (only those):
    0.2 0.9 0.1      (0,0) 0.2 kept: no up/left neighbour, although right 0.9 and down 0.3
    0.3 0.5 0.7            are larger.  (0,1) 0.9 > left 0.2 kept. (0,2) 0.1 < left 0.9 out.
    0.4 0.6 0.1      (1,0) 0.3 > up 0.2 kept.  (1,1) 0.5 < up 0.9 out.
                     (1,2) 0.7 > up 0.1 and left 0.5 but < up-left 0.9 -> out.
                     (2,0) 0.4 > up 0.3 kept, although right 0.6 is larger.
                     (2,1) 0.6 >= 0.3, 0.5, 0.4 kept, although up-right 0.7 is larger.
                     (2,2) 0.1 out."""
    heat = torch.tensor([[0.2, 0.9, 0.1], [0.3, 0.5, 0.7], [0.4, 0.6, 0.1]])
    keep = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    out = point_nms(heat[None, None])
    assert out.shape == (1, 1, 3, 3)
    torch.testing.assert_close(out[0, 0], heat * keep)


def test_point_nms_ties_and_channels_independent():
    """Equal neighbours both survive (hmax == heat). Channels and images are independent:
    channel 1 is the transpose of channel 0 = [[0.5, 0.5], [0.1, 0.2]] -> [[0.5, 0.1], [0.5, 0.2]];
    in channel 1, (0,1) 0.1 < left 0.5 and (1,1) 0.2 < up-left 0.5 are removed."""
    c0 = torch.tensor([[0.5, 0.5], [0.1, 0.2]])
    heat = torch.stack([c0, c0.T])[None].repeat(2, 1, 1, 1)  # (2, 2, 2, 2)
    out = point_nms(heat)
    # channel 0: (1,0) 0.1 < up 0.5 out; (1,1) 0.2 < up 0.5 out
    exp0 = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    exp1 = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    for b in range(2):
        torch.testing.assert_close(out[b, 0], exp0)
        torch.testing.assert_close(out[b, 1], exp1)


def test_point_nms_equals_max_pool_reference():
    """The shifted-slice maximum is bit-identical to the reference implementations'
    max_pool2d(kernel 2, stride 1, padding 1)[:-1, :-1], on odd sizes, ties and many channels."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 7, 5, 5), (1, 1203, 12, 12), (1, 3, 1, 1)]:
        heat = (torch.rand(shape, generator=g) * 8).round() / 8  # many ties
        hmax = torch.nn.functional.max_pool2d(heat, 2, stride=1, padding=1)[:, :, :-1, :-1]
        assert torch.equal(point_nms(heat), heat * (hmax == heat).float())


# --------------------------------------------------------------------------------------------
# matrix_nms
# --------------------------------------------------------------------------------------------

# Four 8-pixel masks (areas 4, 3, 4, 4), sorted by score 0.9, 0.8, 0.7, 0.6:
#   m0 = 11110000, m1 = 11100000 (area 3), m2 = 00111100, m3 = 00001111
# IoUs: (0,1) = 3/4; (0,2) = 2/6 = 1/3; (1,2) = 1/(3+4-1) = 1/6; (0,3) = (1,3) = 0;
#       (2,3) = 2/6 = 1/3.
MASKS = bits("11110000", "11100000", "00111100", "00001111")
AREAS = torch.tensor([4.0, 3.0, 4.0, 4.0])
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6])
ONE_CLASS = torch.zeros(4, dtype=torch.int64)


def test_matrix_nms_gaussian_same_class():
    """All one class, sigma = 2. comp_i = max IoU of mask i with a higher mask:
    comp = [0, 3/4, 1/3, 1/3].  decay_j = min_{i<j} exp(-2 * (iou_ij^2 - comp_i^2)):
    j=1: i=0: exp(-2 * 9/16) = exp(-1.125) = 0.3246525 -> 0.8 * 0.3246525 = 0.2597220
    j=2: i=0: exp(-2/9) = 0.8007374; i=1: exp(-2 * (1/36 - 9/16)) > 1
         -> 0.7 * 0.8007374 = 0.5605162
    j=3: i=0: exp(0) = 1; i=1: exp(+1.125); i=2: exp(-2 * (1/9 - 1/9)) = 1 -> 0.6 (m2's own
         overlap with m0 compensates its overlap with m3).
    The top mask keeps its score."""
    out = matrix_nms(ONE_CLASS, MASKS, AREAS, SCORES, kernel="gaussian", sigma=2.0)
    torch.testing.assert_close(out, torch.tensor([0.9, 0.2597220, 0.5605162, 0.6]))


def test_matrix_nms_linear_same_class():
    """Linear: decay_j = min_{i<j} (1 - iou_ij) / (1 - comp_i), comp = [0, 3/4, 1/3, 1/3]:
    j=1: (1 - 3/4)/1 = 1/4 -> 0.2
    j=2: i=0: (2/3)/1; i=1: (5/6)/(1/4) = 10/3 -> 2/3 -> 0.4666667
    j=3: i=0: 1; i=1: 1/(1/4) = 4; i=2: (2/3)/(2/3) = 1 -> 0.6."""
    out = matrix_nms(ONE_CLASS, MASKS, AREAS, SCORES, kernel="linear")
    torch.testing.assert_close(out, torch.tensor([0.9, 0.2, 0.7 * 2 / 3, 0.6]))


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_different_classes_do_not_decay(kernel):
    """Labels [0, 1, 0, 1]: only pairs (0,2) (IoU 1/3) and (1,3) (IoU 0) are same-class, so
    m1 is not decayed by m0 despite IoU 3/4. comp = [0, 0, 1/3, 0].
    gaussian: m2 -> 0.7 * exp(-2/9) = 0.5605162;  linear: m2 -> 0.7 * 2/3. Others unchanged."""
    labels = torch.tensor([0, 1, 0, 1])
    out = matrix_nms(labels, MASKS, AREAS, SCORES, kernel=kernel, sigma=2.0)
    m2 = 0.7 * math.exp(-2 / 9) if kernel == "gaussian" else 0.7 * 2 / 3
    torch.testing.assert_close(out, torch.tensor([0.9, 0.8, m2, 0.6]))


def test_matrix_nms_gaussian_sigma_is_code_convention():
    """exp(-sigma * iou^2) (code form, §7.1), not exp(-iou^2 / sigma): same-class masks 1100 and
    1000 have IoU 1/2; sigma 4 -> exp(-4 * 1/4) = exp(-1) = 0.3678794 (the paper form would give
    exp(-1/16))."""
    labels, masks, areas = ONE_CLASS[:2], bits("1100", "1000"), torch.tensor([2.0, 1.0])
    out = matrix_nms(labels, masks, areas, torch.tensor([1.0, 1.0]), kernel="gaussian", sigma=4.0)
    torch.testing.assert_close(out, torch.tensor([1.0, math.exp(-1.0)]))


def test_matrix_nms_linear_identical_masks_no_nan():
    """§7.2: three identical same-class masks give comp = [0, 1, 1]; the reference divides 0/0.
    Expected: no NaN, the top one keeps 0.9, the two lower ones decay to exactly 0 (i=0 term:
    (1 - 1)/(1 - 0) = 0). A fourth identical mask of another class is untouched."""
    masks = bits("0110", "0110", "0110", "0110")
    labels = torch.tensor([2, 2, 2, 5])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    out = matrix_nms(labels, masks, torch.full((4,), 2.0), scores, kernel="linear")
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, torch.tensor([0.9, 0.0, 0.0, 0.6]))
    # gaussian on the same input: i=0 term exp(-2 * 1) for both lower same-class masks
    out = matrix_nms(labels, masks, torch.full((4,), 2.0), scores, kernel="gaussian", sigma=2.0)
    expected = torch.tensor([0.9, 0.8 * math.exp(-2), 0.7 * math.exp(-2), 0.6])
    torch.testing.assert_close(out, expected)


def test_matrix_nms_2d_masks_empty_and_bad_kernel():
    """(N, H, W) masks give the same as their flattened (N, K) form; N = 0 returns the empty
    scores; an unknown kernel raises ValueError."""
    out2d = matrix_nms(ONE_CLASS, MASKS.view(4, 2, 4), AREAS, SCORES)
    torch.testing.assert_close(out2d, matrix_nms(ONE_CLASS, MASKS, AREAS, SCORES))
    no_mask = torch.zeros(0, 3, 3, dtype=torch.bool)
    empty = matrix_nms(ONE_CLASS[:0], no_mask, torch.zeros(0), torch.zeros(0))
    assert empty.shape == (0,)
    with pytest.raises(ValueError):
        matrix_nms(ONE_CLASS, MASKS, AREAS, SCORES, kernel="box")


# --------------------------------------------------------------------------------------------
# mask_nms
# --------------------------------------------------------------------------------------------

# m0 = pixels 0..5 (area 6), m1 = 1..6 (6), m2 = 2..8 (7), 10 pixels, scores descending.
# IoU(0,1) = 5/7 = 0.714; IoU(0,2) = 4/(6+7-4) = 4/9 = 0.444; IoU(1,2) = 5/(6+7-5) = 0.625.
GREEDY = bits("1111110000", "0111111000", "0011111110")
GREEDY_AREAS = torch.tensor([6.0, 6.0, 7.0])
GREEDY_SCORES = torch.tensor([0.9, 0.8, 0.7])


def greedy_nms(labels, iou_threshold):
    return mask_nms(labels, GREEDY, GREEDY_AREAS, GREEDY_SCORES, iou_threshold=iou_threshold)


def test_mask_nms_greedy_suppressed_does_not_suppress():
    """Threshold 0.5: m0 removes m1 (0.714). m2 overlaps m1 by 0.625, but m1 is already removed,
    and m2 overlaps m0 by only 0.444 -> m2 kept. (All-pairs NMS would drop m2.)"""
    keep = greedy_nms(torch.zeros(3, dtype=torch.int64), 0.5)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, False, True]


def test_mask_nms_class_specific_and_threshold():
    """Labels [0, 1, 0]: m1 is another class -> kept; m2 vs m0 is 0.444 -> kept.
    Threshold 0.4 with one class: m0 removes m1 (0.714) and m2 (0.444 > 0.4).
    Threshold 0.8: nothing exceeds it."""
    assert greedy_nms(torch.tensor([0, 1, 0]), 0.5).tolist() == [True, True, True]
    labels = torch.zeros(3, dtype=torch.int64)
    assert greedy_nms(labels, 0.4).tolist() == [True, False, False]
    assert greedy_nms(labels, 0.8).all()
    no_mask = torch.zeros(0, 4, dtype=torch.bool)
    empty = mask_nms(labels[:0], no_mask, torch.zeros(0), torch.zeros(0), iou_threshold=0.5)
    assert empty.shape == (0,)


# --------------------------------------------------------------------------------------------
# masks_to_boxes and resize_masks
# --------------------------------------------------------------------------------------------


def test_masks_to_boxes_d2_convention():
    """Rows 1..2, cols 2..3 -> (x1, y1, x2, y2) = (2, 1, 4, 3) (x2 = last col + 1).
    A single pixel at (y=3, x=4) -> (4, 3, 5, 4). An empty mask -> zeros. Two blobs -> their
    union's box: pixels (0, 0) and (2, 3) -> (0, 0, 4, 3)."""
    masks = torch.zeros(4, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 2:4] = True
    masks[1, 3, 4] = True
    masks[3, 0, 0] = masks[3, 2, 3] = True
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32
    expected = [[2, 1, 4, 3], [4, 3, 5, 4], [0, 0, 0, 0], [0, 0, 4, 3]]
    assert boxes.tolist() == expected
    assert masks_to_boxes(torch.zeros(0, 4, 5, dtype=torch.bool)).shape == (0, 4)


def test_resize_masks_full_and_empty():
    """An all-ones soft mask stays all True at any output size; all-zeros gives all False."""
    soft = torch.stack([torch.ones(4, 6), torch.zeros(4, 6)])
    out = resize_masks(soft, (16, 24), (13, 21), (30, 50), 0.5)
    assert out.shape == (2, 30, 50) and out.dtype == torch.bool
    assert out[0].all() and not out[1].any()


def test_resize_masks_crops_image_region_top_left():
    """Feature 4x8 at stride 4 -> canvas 16x32; the image is the top-left 8x16. Soft mask = 1 on
    feature rows 0..2, cols 0..4 (covers the image plus one feature of margin), 0 elsewhere.
    Upsampled row y samples feature row (y+0.5)/4-0.5 <= 1.375 for y < 8, col x samples
    <= 3.375 for x < 16: only ones are interpolated, so the crop is all ones and the output
    (any size) is all True. Without the crop (resizing the whole canvas) the bottom/right would
    be False."""
    soft = torch.zeros(1, 4, 8)
    soft[0, 0:3, 0:5] = 1.0
    out = resize_masks(soft, (16, 32), (8, 16), (10, 20), 0.5)
    assert out.shape == (1, 10, 20)
    assert out.all()


def test_resize_masks_half_boundary_and_chunks():
    """Left half of an 8x8 feature (cols 0..3) = 1, canvas 32x32, image = canvas, output 64x64.
    Canvas col 15 = 0.625 (3/8 weight on feature col 4), col 16 = 0.375; output col 31 samples
    canvas 15.25 -> 0.75*0.625 + 0.25*0.375 = 0.5625 > 0.5, col 32 -> 0.4375. So the mask is
    exactly output cols 0..31. chunk_size only changes the batching: 1 and 16 agree."""
    g = torch.Generator().manual_seed(0)
    soft = torch.rand(5, 8, 8, generator=g)
    soft[0] = 0.0
    soft[0, :, :4] = 1.0
    a = resize_masks(soft, (32, 32), (32, 32), (64, 64), 0.5, chunk_size=1)
    b = resize_masks(soft, (32, 32), (32, 32), (64, 64), 0.5, chunk_size=16)
    assert torch.equal(a, b)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:, :32] = True
    assert torch.equal(a[0], expected)


# --------------------------------------------------------------------------------------------
# solo_postprocess (SOLOv2-style masks: kernels on mask features)
# --------------------------------------------------------------------------------------------

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25

DEFAULTS = dict(
    score_threshold=0.1,
    mask_threshold=0.5,
    nms_pre=500,
    update_threshold=0.05,
    nms_type="matrix",
    nms_kernel="gaussian",
    nms_sigma=2.0,
    max_per_image=100,
    chunk_size=1000,
)


def constructed_case():
    """Mask features E=3, 8x8 (stride 4 -> canvas 32x32), channels +1 inside / -1 outside:
        ch0: R0 = cols 0..3 (left half, 32 px)   ch1: R1 = cols 4..7 (32 px)
        ch2: R2 = col 7 only (8 px)
    Five grid cells (G=5), C=3 classes:
        cell  kernel       mask (soft in/out)        stride  cate scores (cls 0, 1, 2)
        0     (20, 0, 0)   R0 (1.0 / ~0), area 32    8       (0, 0.6, 0.3)
        1     (0, ln3, 0)  R1 (0.75 / 0.25), area 32 8       (0.9, 0, 0)
        2     (0, 0, 20)   R2, area 8                8       (0, 0, 0.95)  area 8 !> 8: dropped
        3     (20, 0, 0)   R0 (duplicate of cell 0)  8       (0, 0.5, 0)
        4     (20, 0, 0)   R0, area 32               32      (0, 0, 0.99)  area 32 !> 32: dropped
    Maskness: cell 1 -> 0.75, R0 cells -> sigmoid(20) = 1.0 in float32."""
    cols = torch.arange(8)[None, :].expand(8, 8)
    regions = torch.stack([cols <= 3, cols >= 4, cols == 7])
    mask_feat = regions.float() * 2 - 1  # +1 inside, -1 outside
    kernels = torch.tensor([[20.0, 0, 0], [0, LN3, 0], [0, 0, 20.0], [20.0, 0, 0], [20.0, 0, 0]])
    cate = torch.tensor([[0, 0.6, 0.3], [0.9, 0, 0], [0, 0, 0.95], [0, 0.5, 0], [0, 0, 0.99]])
    strides = torch.tensor([8, 8, 8, 8, 32])
    return cate, kernels, strides, mask_feat


def run(cate, kernels, strides, mask_feat, image_hw=(32, 32), output_hw=(64, 64), **kw):
    args = {**DEFAULTS, **kw}
    e, hf, wf = mask_feat.shape

    def soft_masks(cells):
        return torch.sigmoid(kernels[cells] @ mask_feat.reshape(e, hf * wf)).reshape(-1, hf, wf)

    canvas_hw = (hf * 4, wf * 4)
    return solo_postprocess(cate, soft_masks, strides, canvas_hw, image_hw, output_hw, **args)


LEFT = torch.zeros(64, 64, dtype=torch.bool)
LEFT[:, :32] = True  # R0 at the 64x64 output (boundary worked out in the resize test)
RIGHT = ~LEFT  # R1: the 0.75/0.25 mask has the same boundary (0.53125 vs 0.46875 at cols 32/31)


def test_postprocess_constructed_case():
    """Candidates after the area filter, rescored by maskness:
        (cell 1, cls 0) 0.9 * 0.75 = 0.675; (cell 0, cls 1) 0.6; (cell 3, cls 1) 0.5;
        (cell 0, cls 2) 0.3.
    Matrix NMS (gaussian, sigma 2): only (cell 3, cls 1) has a same-class higher mask (cell 0,
    IoU 1, comp 0) -> 0.5 * exp(-2) = 0.0676676 >= 0.05, kept. (cell 0, cls 2) overlaps the
    class-1 masks fully but is another class -> 0.3.
    Final order [0.675, 0.6, 0.3, 0.0676676], classes [0, 1, 2, 1]; boxes from the masks:
    R1 -> (32, 0, 64, 64), R0 -> (0, 0, 32, 64)."""
    r = run(*constructed_case())
    assert r.image_size == (64, 64)
    assert len(r) == 4
    torch.testing.assert_close(r.scores, torch.tensor([0.675, 0.6, 0.3, 0.5 * math.exp(-2)]))
    assert r.pred_classes.dtype == torch.int64
    assert r.pred_classes.tolist() == [0, 1, 2, 1]
    assert r.pred_masks.dtype == torch.bool and r.pred_masks.shape == (4, 64, 64)
    assert torch.equal(r.pred_masks[0], RIGHT)
    for k in (1, 2, 3):
        assert torch.equal(r.pred_masks[k], LEFT)
    boxes = r.pred_boxes.tensor
    assert boxes.tolist() == [[32, 0, 64, 64]] + [[0, 0, 32, 64]] * 3
    assert torch.equal(boxes, masks_to_boxes(r.pred_masks))


def test_postprocess_one_soft_mask_per_cell():
    """Cell 0 passes in classes 1 and 2: 6 candidates from 5 cells, 5 soft masks computed for
    scoring (kept for the final masks, as 5 <= nms_pre), the same detections as before."""
    cate, kernels, strides, mask_feat = constructed_case()
    e, hf, wf = mask_feat.shape
    computed = []

    def soft_masks(cells):
        computed.extend(cells.tolist())
        return torch.sigmoid(kernels[cells] @ mask_feat.reshape(e, hf * wf)).reshape(-1, hf, wf)

    r = solo_postprocess(cate, soft_masks, strides, (32, 32), (32, 32), (64, 64), **DEFAULTS)
    assert computed == [0, 1, 2, 3, 4]
    assert r.pred_classes.tolist() == [0, 1, 2, 1]
    assert torch.equal(r.pred_masks[2], LEFT)  # (cell 0, class 2) reads cell 0's mask
    # nms_pre 2, chunks of 4 < 5 cells <= 4 * 2: binary masks kept, soft ones computed again for the
    # final detections only: (cell 1, class 0) 0.675 and (cell 0, class 1) 0.6
    computed.clear()
    args = {**DEFAULTS, "nms_pre": 2, "chunk_size": 4}
    r = solo_postprocess(cate, soft_masks, strides, (32, 32), (32, 32), (64, 64), **args)
    assert computed == [0, 1, 2, 3, 4, 1, 0]
    assert r.pred_classes.tolist() == [0, 1]
    assert torch.equal(r.pred_masks[0], RIGHT) and torch.equal(r.pred_masks[1], LEFT)


def test_postprocess_max_per_image_nms_pre_update_threshold():
    """max_per_image=2 keeps the best two (0.675, 0.6).
    nms_pre=3 cuts (cell 0, cls 2) 0.3 BEFORE NMS (after rescoring): [0.675, 0.6, 0.0677].
    update_threshold=0.1 removes the decayed duplicate: [0.675, 0.6, 0.3]."""
    r = run(*constructed_case(), max_per_image=2)
    torch.testing.assert_close(r.scores, torch.tensor([0.675, 0.6]))
    assert r.pred_classes.tolist() == [0, 1]
    r = run(*constructed_case(), nms_pre=3)
    torch.testing.assert_close(r.scores, torch.tensor([0.675, 0.6, 0.5 * math.exp(-2)]))
    assert r.pred_classes.tolist() == [0, 1, 1]
    r = run(*constructed_case(), update_threshold=0.1)
    torch.testing.assert_close(r.scores, torch.tensor([0.675, 0.6, 0.3]))
    assert r.pred_classes.tolist() == [0, 1, 2]


def test_postprocess_crop_to_image_region():
    """Image 32x24 inside the 32x32 canvas (image_hw = (h, w) = (32, 24)), output = image size:
    R1 (canvas cols 16..31) is cropped to cols 16..23 -> box (16, 0, 24, 32); R0 -> (0, 0, 16,
    32). Resizing the whole canvas to 32x24 instead would put R1 at cols 12..23."""
    r = run(*constructed_case(), image_hw=(32, 24), output_hw=(32, 24), max_per_image=2)
    assert r.pred_masks.shape == (2, 32, 24)
    assert r.pred_boxes.tensor.tolist() == [[16, 0, 24, 32], [0, 0, 16, 32]]


def test_postprocess_mask_nms():
    """nms_type="mask" (IoU threshold = mask_threshold 0.5): (cell 3, cls 1) has IoU 1 with
    (cell 0, cls 1) -> removed; the scores are not decayed: [0.675, 0.6, 0.3]."""
    r = run(*constructed_case(), nms_type="mask")
    torch.testing.assert_close(r.scores, torch.tensor([0.675, 0.6, 0.3]))
    assert r.pred_classes.tolist() == [0, 1, 2]
    assert r.pred_boxes.tensor.tolist() == [[32, 0, 64, 64], [0, 0, 32, 64], [0, 0, 32, 64]]


def test_postprocess_linear_kernel():
    """Linear Matrix NMS: the duplicate (IoU 1) decays to 0 < 0.05 -> removed."""
    r = run(*constructed_case(), nms_kernel="linear")
    torch.testing.assert_close(r.scores, torch.tensor([0.675, 0.6, 0.3]))


def test_postprocess_bad_nms_type_raises():
    with pytest.raises(ValueError):
        run(*constructed_case(), nms_type="soft")


def assert_empty(r, output_hw):
    assert r.image_size == output_hw
    assert len(r) == 0
    assert r.pred_masks.dtype == torch.bool and r.pred_masks.shape == (0, *output_hw)
    assert r.pred_classes.dtype == torch.int64 and r.pred_classes.shape == (0,)
    assert r.scores.shape == (0,) and r.scores.is_floating_point()
    assert len(r.pred_boxes) == 0 and r.pred_boxes.tensor.shape == (0, 4)


def test_postprocess_nothing_above_score_threshold():
    """(i) Every category score <= 0.1 -> empty Instances with properly shaped fields (§7.23)."""
    cate, kernels, strides, mask_feat = constructed_case()
    r = run(cate.clamp(max=0.1), kernels, strides, mask_feat, output_hw=(60, 70))
    assert_empty(r, (60, 70))


def test_postprocess_all_filtered_by_area_or_update_threshold():
    """Only cells 2 and 4 pass the score threshold 0.9 and both fail the area filter -> empty.
    With update_threshold 0.7 every rescored score (<= 0.675) is removed -> empty."""
    assert_empty(run(*constructed_case(), score_threshold=0.91), (64, 64))
    assert_empty(run(*constructed_case(), update_threshold=0.7), (64, 64))


def test_postprocess_chunk_size_invariance():
    """(iii) ~60 random candidates from 30 cells: chunk_size=1 (masks kept or recomputed) and
    chunk_size=1000 (one chunk, masks kept) give identical results."""
    g = torch.Generator().manual_seed(0)
    num_cells, num_classes, e = 30, 4, 4
    cate = torch.rand(num_cells, num_classes, generator=g) * 0.2  # about half above 0.1
    kernels = torch.randn(num_cells, e, generator=g) * 3
    strides = torch.tensor([8] * 20 + [32] * 10)
    mask_feat = torch.randn(e, 12, 12, generator=g)
    assert 40 <= int((cate > 0.1).sum()) <= 80
    # nms_pre 500: soft masks kept; 20: binary masks kept (<= 4 * 20 cells); 5: none kept
    for kw in (
        dict(nms_pre=500),
        dict(nms_pre=20),
        dict(nms_pre=5),
        dict(nms_type="mask", nms_pre=20),
    ):
        a = run(cate, kernels, strides, mask_feat, (40, 44), (50, 55), chunk_size=1, **kw)
        b = run(cate, kernels, strides, mask_feat, (40, 44), (50, 55), chunk_size=1000, **kw)
        assert len(a) > 1
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)
        assert torch.equal(a.pred_masks, b.pred_masks)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert (a.scores[:-1] >= a.scores[1:]).all()  # sorted descending


# --------------------------------------------------------------------------------------------
# exactness of the fast paths (blocked intersections, bool masks in Matrix NMS, boxes from masks)
# --------------------------------------------------------------------------------------------


def test_blocked_intersections_equal_float_products(monkeypatch):
    """Bool masks are multiplied a block of pixels at a time: the same counts as one product,
    with one block and with several (a small block size forces 1024-pixel blocks)."""
    from solo_d2.modeling import postprocessing
    from solo_d2.modeling.postprocessing import _intersections

    g = torch.Generator().manual_seed(0)
    for blocks in (2**22, 1):
        monkeypatch.setattr(postprocessing, "INTERSECTION_BLOCK_FLOATS", blocks)
        for n, h, w in [(0, 3, 5), (1, 3, 5), (7, 9, 13), (40, 30, 44), (5, 50, 70)]:
            masks = torch.rand(n, h, w, generator=g) > 0.4
            f = masks.flatten(1).float()
            assert torch.equal(_intersections(masks), f @ f.T)


def test_blocked_mask_scores_equal_unblocked(monkeypatch):
    """The CPU path scores cache-sized blocks of masks: the same areas (exact counts), the same
    soft sums within float rounding and the binary masks, whatever the block size."""
    from solo_d2.modeling import postprocessing
    from solo_d2.modeling.postprocessing import _score_masks

    soft = torch.rand(37, 12, 20, generator=torch.Generator().manual_seed(0))
    ref_area, ref_sum, none = _score_masks(soft, 0.5, False)
    assert none is None
    for floats in (2**20, 240, 1):  # one block, one mask a block, the 1-row rule
        monkeypatch.setattr(postprocessing, "SCORE_BLOCK_FLOATS", floats)
        area, soft_sum, hard = _score_masks(soft, 0.5, True)
        assert torch.equal(area, ref_area) and torch.equal(hard, soft > 0.5)
        torch.testing.assert_close(soft_sum, ref_sum, rtol=1e-6, atol=1e-5)


def test_matrix_nms_bool_and_float_masks_agree():
    from dev.benchmark.inputs import matrix_nms_inputs

    labels, masks, areas, scores = matrix_nms_inputs(60, 40, 56, seed=3)
    a = matrix_nms(labels, masks, areas, scores)
    b = matrix_nms(labels, masks.float(), areas, scores)
    assert torch.equal(a, b) and bool((a <= scores).all())


def test_masks_to_boxes_byte_max_path_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(12, 23, 31, generator=g) > 0.97
    masks[0] = False  # an empty mask gives a zero box
    expected = torch.zeros(12, 4)
    for i, m in enumerate(masks):
        ys, xs = m.nonzero(as_tuple=True)
        if len(xs):
            expected[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert torch.equal(masks_to_boxes(masks), expected)
