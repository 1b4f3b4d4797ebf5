"""Hand-checked tests of SOLO target assignment.

Grid arithmetic used throughout (reference rule): for a canvas of Hc x Wc and a grid S, a point
(x, y) falls in column floor(x / (Wc / S)) and row floor(y / (Hc / S)). Every expected cell below
is worked out in the comments; the coordinates are chosen away from cell boundaries.
"""

import cv2
import numpy as np
import pytest
import torch

from solo_d2.modeling.targets import (
    assign_grid_targets,
    center_of_mass,
    instance_targets,
    rescale_masks,
)

BG = 10  # num_classes in the assignment tests: background label


def assign(
    boxes,
    centers,
    labels,
    image_ids=None,
    *,
    num_images=1,
    canvas_hw=(64, 64),
    num_grids=(4,),
    scale_ranges=((1, 96),),
    sigma=0.2,
    num_classes=BG,
):
    """Call assign_grid_targets with python lists."""
    n = len(labels)
    return assign_grid_targets(
        torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        torch.tensor(centers, dtype=torch.float32).reshape(n, 2),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(image_ids if image_ids is not None else [0] * n, dtype=torch.int64),
        num_images,
        canvas_hw,
        list(num_grids),
        [tuple(r) for r in scale_ranges],
        sigma,
        num_classes,
    )


def expected_labels(s, cells, num_images=1, image=0):
    """(num_images, S, S) BG grid with {cell: label} written in image ``image``."""
    out = torch.full((num_images, s * s), BG, dtype=torch.int64)
    for cell, lab in cells.items():
        out[image, cell] = lab
    return out.view(num_images, s, s)


# --------------------------------------------------------------------------------------------
# center_of_mass
# --------------------------------------------------------------------------------------------


def test_center_of_mass_block_and_empty():
    """2x3 block at rows 1..2, cols 2..4: cx = (2+3+4)/3 = 3, cy = (1+2)/2 = 1.5 (no +0.5).
    An L of pixels (0,0), (0,1), (1,0) [(y,x)]: cx = (0+1+0)/3, cy = (0+0+1)/3.
    An empty mask: m00 is clamped to 1e-6, sums are 0 -> (0, 0)."""
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 0, 0] = masks[1, 0, 1] = masks[1, 1, 0] = True
    c = center_of_mass(masks)
    assert c.dtype == torch.float32 and c.shape == (3, 2)
    expected = torch.tensor([[3.0, 1.5], [1 / 3, 1 / 3], [0.0, 0.0]])
    torch.testing.assert_close(c, expected)


def test_center_of_mass_uint8_input():
    """{0,1} uint8 input is accepted: a single pixel at (y=4, x=2) has centre (2, 4)."""
    masks = torch.zeros(1, 6, 7, dtype=torch.uint8)
    masks[0, 4, 2] = 1
    torch.testing.assert_close(center_of_mass(masks), torch.tensor([[2.0, 4.0]]))


# --------------------------------------------------------------------------------------------
# rescale_masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, w, stride, out_hw",
    [
        (13, 10, 4, (3, 3)),  # int(3.25+.5)=3, int(2.5+.5)=3
        (6, 5, 4, (2, 1)),  # int(1.5+.5)=2 (half rounds up), int(1.25+.5)=1
        (9, 14, 8, (1, 2)),  # int(1.125+.5)=1, int(1.75+.5)=2
        (7, 7, 2, (4, 4)),  # int(3.5+.5)=4
    ],
)
def test_rescale_masks_size_and_full_mask(h, w, stride, out_hw):
    """Output size is (int(h/s+0.5), int(w/s+0.5)); an all-ones mask stays all ones, an empty
    one all zeros; dtype uint8."""
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0] = True
    out = rescale_masks(masks, stride)
    assert out.shape == (2, *out_hw) and out.dtype == np.uint8
    assert (out[0] == 1).all() and (out[1] == 0).all()


def test_rescale_masks_centre_pixels_rule():
    """At stride 4, INTER_LINEAR samples source x = 4*dx + 1.5, i.e. the mean of the 2x2 centre
    pixels (rows 4i+1..4i+2, cols 4j+1..4j+2) of each 4x4 block, rounded half up (§2).

    8x12 mask -> 2x3:
    block (0,0): ones in cols 0..1 -> centre pixels 1,0,1,0 -> mean 0.5 -> 1 (tie rounds up)
    block (0,1): empty -> 0
    block (0,2): only its 4 centre pixels set -> 1 (area averaging would give 4/16 -> 0)
    block (1,0): all but its 4 centre pixels set -> 0 (area averaging would give 12/16 -> 1)
    block (1,1): cols 4..6 set (centre cols 5,6 inside) -> 1
    block (1,2): empty -> 0
    """
    m = np.zeros((8, 12), dtype=np.uint8)
    m[0:4, 0:2] = 1
    m[1:3, 9:11] = 1
    m[4:8, 0:4] = 1
    m[5:7, 1:3] = 0
    m[4:8, 4:7] = 1
    out = rescale_masks(m[None], 4)
    np.testing.assert_array_equal(out[0], np.array([[1, 0, 1], [0, 1, 0]], dtype=np.uint8))


def test_rescale_masks_values_binary_bool_input():
    """Random bool masks give values in {0, 1} only."""
    rng = np.random.RandomState(0)
    masks = rng.rand(5, 23, 17) > 0.5
    out = rescale_masks(masks, 4)
    assert out.shape == (5, 6, 4)  # int(5.75+.5)=6, int(4.25+.5)=4
    assert set(np.unique(out).tolist()) <= {0, 1}


@pytest.mark.parametrize("n", [1, 128, 129, 300])
def test_rescale_masks_many_instances_match_per_instance(n):
    """OpenCV 5 resizes at most 128 channels per call (§7.9): >128 instances must still work and
    equal one cv2.resize(INTER_LINEAR) per instance."""
    rng = np.random.RandomState(n)
    h, w = 21, 30
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for k in range(n):  # random rectangles, so the rescale is not trivially all zeros
        y0, x0 = rng.randint(0, h - 4), rng.randint(0, w - 4)
        masks[k, y0 : y0 + rng.randint(3, 12), x0 : x0 + rng.randint(3, 12)] = 1
    out = rescale_masks(masks, 4)
    size = (int(w / 4 + 0.5), int(h / 4 + 0.5))  # (8, 5) as cv2 (width, height)
    ref = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in masks])
    assert out.shape == (n, 5, 8)
    np.testing.assert_array_equal(out, ref)


def test_rescale_masks_zero_instances():
    """No instance: an empty (0, h', w') array."""
    out = rescale_masks(np.zeros((0, 16, 20), dtype=np.uint8), 4)
    assert out.shape == (0, 4, 5)


# --------------------------------------------------------------------------------------------
# instance_targets
# --------------------------------------------------------------------------------------------


def test_instance_targets_valid_flag_and_outputs():
    """An empty mask is not valid (never positive); the others give centre and rescaled mask.
    Mask 1: rows 0..3, cols 4..11 (8x12 image): centre ((4+11)/2, (0+3)/2) = (7.5, 1.5); at
    stride 4 its small mask is row 0, cols 1..2 of a 2x3 grid."""
    masks = torch.zeros(2, 8, 12, dtype=torch.bool)
    masks[1, 0:4, 4:12] = True
    valid, centers, small = instance_targets(masks, 4)
    assert valid.tolist() == [False, True]
    torch.testing.assert_close(centers, torch.tensor([[0.0, 0.0], [7.5, 1.5]]))
    assert small.shape == (2, 2, 3) and small.dtype == torch.uint8
    assert small[0].sum() == 0
    assert small[1].tolist() == [[0, 1, 1], [0, 0, 0]]


def test_instance_targets_no_instances():
    """Zero instances: valid (0,), centers (0, 2), small (0, h', w')."""
    valid, centers, small = instance_targets(torch.zeros(0, 8, 12, dtype=torch.bool), 4)
    assert valid.shape == (0,) and valid.dtype == torch.bool
    assert centers.shape == (0, 2)
    assert small.shape == (0, 2, 3)


# --------------------------------------------------------------------------------------------
# assign_grid_targets
# --------------------------------------------------------------------------------------------


def test_assign_single_instance_3x3_clamp():
    """(a) S=5 on a 64x64 canvas: cells are 12.8 px. Box (2,6,62,58): w=60, h=52,
    sqrt(3120)=55.9 in (1,96). sigma=1: half_w=30, half_h=26. Centre (cx, cy) = (33, 30).
    centre cell: col floor(33/12.8)=floor(2.58)=2, row floor(30/12.8)=floor(2.34)=2
    sigma box: left floor(3/12.8)=0, right floor(63/12.8)=floor(4.92)=4,
               top floor(4/12.8)=0, down floor(56/12.8)=floor(4.375)=4  -> a 5x5 region
    3x3 clamp around (2,2): rows 1..3, cols 1..3 -> cells 6,7,8, 11,12,13, 16,17,18."""
    cate, pos = assign([2, 6, 62, 58], [33, 30], [4], num_grids=(5,), sigma=1.0)
    cells = [6, 7, 8, 11, 12, 13, 16, 17, 18]
    assert len(cate) == 1 and len(pos) == 1
    assert cate[0].dtype == torch.int64
    assert torch.equal(cate[0], expected_labels(5, {c: 4 for c in cells}))
    assert pos[0].dtype == torch.int64
    assert pos[0].tolist() == [[0, c, 0] for c in cells]


def test_assign_single_instance_small_sigma_region():
    """S=4 on 64x64 (16 px cells). Box (10,0,50,40): w=h=40, sigma=0.2 -> half 4. Centre (30,21):
    cols floor(26/16)=1 .. floor(34/16)=2, centre col floor(30/16)=1 -> clamp [0,2] keeps 1..2;
    rows floor(17/16)=1 .. floor(25/16)=1 -> row 1 only. Cells 1*4+1=5 and 6."""
    cate, pos = assign([10, 0, 50, 40], [30, 21], [2])
    assert torch.equal(cate[0], expected_labels(4, {5: 2, 6: 2}))
    assert pos[0].tolist() == [[0, 5, 0], [0, 6, 0]]


def test_assign_wide_box_sigma_region_per_axis():
    """S=4, 64x64. Box (0,20,80,40): w=80, h=20, sqrt(1600)=40; sigma 0.2 -> half_w=8, half_h=2.
    Centre (29, 29): cols floor(21/16)=1 .. floor(37/16)=2; rows floor(27/16)=1 .. floor(31/16)=1
    -> cells 5, 6. (With half_w and half_h swapped it would be col 1, rows 1..2: cells 5, 9.)"""
    cate, pos = assign([0, 20, 80, 40], [29, 29], [0])
    assert torch.equal(cate[0], expected_labels(4, {5: 0, 6: 0}))
    assert pos[0].tolist() == [[0, 5, 0], [0, 6, 0]]


def test_assign_near_border_clamps_to_grid():
    """(b) S=4, 64x64, 16 px cells, sigma=1, boxes 30x30 -> half 15.
    Inst 0, centre (5, 58): cols floor(-10/16)=-1 -> 0 .. floor(20/16)=1; centre col 0 -> 0..1;
      rows floor(43/16)=2 .. floor(73/16)=4 -> 3; centre row floor(58/16)=3 -> 2..3.
      Cells 8, 9, 12, 13.
    Inst 1, centre (60, 3): cols floor(45/16)=2 .. floor(75/16)=4 -> 3; centre col 3 -> 2..3;
      rows floor(-12/16)=-1 -> 0 .. floor(18/16)=1; centre row 0 -> 0..1. Cells 2, 3, 6, 7."""
    cate, pos = assign([[0, 34, 30, 64], [34, 0, 64, 30]], [[5, 58], [60, 3]], [1, 5], sigma=1.0)
    exp = expected_labels(4, {8: 1, 9: 1, 12: 1, 13: 1, 2: 5, 3: 5, 6: 5, 7: 5})
    assert torch.equal(cate[0], exp)
    expected_pos = [[0, c, 0] for c in (8, 9, 12, 13)] + [[0, c, 1] for c in (2, 3, 6, 7)]
    assert pos[0].tolist() == expected_pos


@pytest.mark.parametrize("labels", [(3, 7), (7, 3)])
def test_assign_overlap_later_instance_wins_class_and_duplicates(labels):
    """(c) S=4, 64x64, sigma=0.2.
    Inst 0: box (8,8,56,40) w=48 h=32 -> half_w 4.8, half_h 3.2; centre (30,22):
      cols floor(25.2/16)=1 .. floor(34.8/16)=2, rows floor(18.8/16)=1 .. floor(25.2/16)=1
      -> cells 5, 6.
    Inst 1: box (20,10,60,50) w=h=40 -> half 4; centre (37,30):
      cols floor(33/16)=2 .. floor(41/16)=2, rows floor(26/16)=1 .. floor(34/16)=2 -> cells 6, 10.
    Shared cell 6 takes the LATER instance's class (whatever its value: both label orders), and
    both instances keep cell 6 among their positives."""
    a, b = labels
    cate, pos = assign([[8, 8, 56, 40], [20, 10, 60, 50]], [[30, 22], [37, 30]], [a, b])
    assert torch.equal(cate[0], expected_labels(4, {5: a, 6: b, 10: b}))
    assert pos[0].tolist() == [[0, 5, 0], [0, 6, 0], [0, 6, 1], [0, 10, 1]]


def test_assign_overlapping_scale_ranges_two_levels():
    """(d) ranges (1,48) and (32,96), grids S=5 (12.8 px cells) and S=4 (16 px), 64x64, sigma 0.2.
    Inst 0: 40x40 box, sqrt=40 in both ranges; half 4, centre (30,30).
      level 0: floor(26/12.8)=2 .. floor(34/12.8)=2 -> cell 2*5+2=12
      level 1: floor(26/16)=1 .. floor(34/16)=2 (both axes), centre 1 -> cells 5, 6, 9, 10
    Inst 1: 48x48 box, sqrt=48 exactly: ranges are inclusive -> both levels. half 4.8,
      centre (52, 10): level 0 cols floor(47.2/12.8)=3 .. floor(56.8/12.8)=4, rows
      floor(5.2/12.8)=0 .. floor(14.8/12.8)=1 -> cells 3, 4, 8, 9;
      level 1 cols floor(47.2/16)=2 .. floor(56.8/16)=3, rows 0 .. 0 -> cells 2, 3.
    Inst 2: 20x20 box (level 0 only), centre (10, 54): level 0 cols floor(8/12.8)=0 ..
      floor(12/12.8)=0, rows floor(52/12.8)=4 .. floor(56/12.8)=4 -> cell 20.
    Inst 3: 60x60 box (level 1 only), half 6, centre (11, 55): level 1 cols floor(5/16)=0 ..
      floor(17/16)=1, centre col 0; rows floor(49/16)=3 .. floor(61/16)=3 -> cells 12, 13."""
    boxes = [[10, 10, 50, 50], [28, 0, 76, 48], [0, 44, 20, 64], [0, 4, 60, 64]]
    centers = [[30, 30], [52, 10], [10, 54], [11, 55]]
    cate, pos = assign(
        boxes, centers, [1, 2, 3, 4], num_grids=(5, 4), scale_ranges=((1, 48), (32, 96))
    )
    assert torch.equal(cate[0], expected_labels(5, {12: 1, 3: 2, 4: 2, 8: 2, 9: 2, 20: 3}))
    exp1 = expected_labels(4, {5: 1, 6: 1, 9: 1, 10: 1, 2: 2, 3: 2, 12: 4, 13: 4})
    assert torch.equal(cate[1], exp1)
    assert pos[0].tolist() == [[0, 12, 0]] + [[0, c, 1] for c in (3, 4, 8, 9)] + [[0, 20, 2]]
    pos1 = [[0, c, 0] for c in (5, 6, 9, 10)] + [[0, 2, 1], [0, 3, 1], [0, 12, 3], [0, 13, 3]]
    assert pos[1].tolist() == pos1


def test_assign_two_images_padded_non_square_canvas():
    """(e) Padded canvas (Hc, Wc) = (64, 96), S=4: cells are 16 px high and 24 px wide.
    Image 0 (64x96), inst 0: 30x30 box, half 3, centre (10, 50): cols floor(7/24)=0 ..
      floor(13/24)=0; rows floor(47/16)=2 .. floor(53/16)=3, centre row 3 -> cells 8, 12.
    Image 1 (40x60, padded), inst 1: 20x20 box, half 2, centre (50, 29):
      cols floor(48/24)=2 .. floor(52/24)=2, rows floor(27/16)=1 .. floor(31/16)=1 -> cell 6.
      (Measured on the 40x60 image instead, cells would be 10x15 px: col floor(50/15)=3,
      row floor(29/10)=2; with x measured on Hc: col floor(50/16)=3.)"""
    cate, pos = assign(
        [[0, 35, 30, 64], [40, 19, 60, 39]],
        [[10, 50], [50, 29]],
        [1, 2],
        [0, 1],
        num_images=2,
        canvas_hw=(64, 96),
    )
    exp = torch.full((2, 16), BG, dtype=torch.int64)
    exp[0, 8] = exp[0, 12] = 1
    exp[1, 6] = 2
    assert torch.equal(cate[0], exp.view(2, 4, 4))
    assert pos[0].tolist() == [[0, 8, 0], [0, 12, 0], [1, 6, 1]]


def test_assign_clamp_centre_cell_uses_canvas_axes():
    """Canvas (64, 96), S=4 (16 px high, 24 px wide cells), sigma=1 so the 3x3 clamp decides.
    Box (0,10,90,70): w=90, h=60, sqrt(5400)=73.5; half_w=45, half_h=30. Centre (40, 40):
    cols floor(-5/24)=-1 -> 0 .. floor(85/24)=3; centre col floor(40/24)=1 -> 0..2
      (measured on Hc it would be floor(40/16)=2 -> 1..3)
    rows floor(10/16)=0 .. floor(70/16)=4 -> 3; centre row floor(40/16)=2 -> 1..3
      (measured on Wc it would be floor(40/24)=1 -> 0..2)
    Cells 4,5,6, 8,9,10, 12,13,14."""
    cate, pos = assign([0, 10, 90, 70], [40, 40], [6], canvas_hw=(64, 96), sigma=1.0)
    cells = [4, 5, 6, 8, 9, 10, 12, 13, 14]
    assert torch.equal(cate[0], expected_labels(4, {c: 6 for c in cells}))
    assert pos[0].tolist() == [[0, c, 0] for c in cells]


def test_assign_image_without_instances_in_the_middle():
    """Three images, instances only in images 0 and 2: image 1 stays all background, and the
    positives name images 0 and 2. Same geometry as the single instance case (cells 5, 6)."""
    cate, pos = assign(
        [[10, 0, 50, 40], [10, 0, 50, 40]], [[30, 21], [30, 21]], [2, 8], [0, 2], num_images=3
    )
    assert cate[0].shape == (3, 4, 4)
    assert torch.equal(cate[0][0], expected_labels(4, {5: 2, 6: 2})[0])
    assert (cate[0][1] == BG).all()
    assert torch.equal(cate[0][2], expected_labels(4, {5: 8, 6: 8})[0])
    assert pos[0].tolist() == [[0, 5, 0], [0, 6, 0], [2, 5, 1], [2, 6, 1]]


def test_assign_zero_instances():
    """(f) No instance at all: every level all background, positives (0, 3) int64."""
    cate, pos = assign(
        [], [], [], [], num_images=2, num_grids=(5, 4), scale_ranges=((1, 48), (32, 96))
    )
    assert [c.shape for c in cate] == [(2, 5, 5), (2, 4, 4)]
    assert all((c == BG).all() for c in cate)
    assert [p.shape for p in pos] == [(0, 3), (0, 3)]
    assert all(p.dtype == torch.int64 for p in pos)


def test_assign_instance_outside_every_range():
    """(g) sqrt(area) = 200 > 96 and sqrt(0.5*0.5) = 0.5 < 1: neither is positive anywhere."""
    cate, pos = assign(
        [[0, 0, 200, 200], [10, 10, 10.5, 10.5]],
        [[30, 30], [10, 10]],
        [1, 2],
        num_grids=(5, 4),
        scale_ranges=((1, 48), (32, 96)),
    )
    assert all((c == BG).all() for c in cate)
    assert [p.shape for p in pos] == [(0, 3), (0, 3)]
