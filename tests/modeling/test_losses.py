"""Hand-checked tests of the SOLO losses: dice loss and category focal loss."""

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from solo_d2.modeling.losses import category_loss, dice_loss

# --------------------------------------------------------------------------------------------
# dice_loss: 1 - 2*sum(p*t) / ((sum(p^2) + 0.001) + (sum(t^2) + 0.001))
# --------------------------------------------------------------------------------------------


def test_dice_perfect_prediction():
    """p = t = [1, 1]: 1 - 2*2 / (2 + 2 + 0.002) = 0.002 / 4.002 = 4.9975e-4 (the smoothing)."""
    loss = dice_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.002 / 4.002, abs=1e-6)  # float32: 1 - 0.9995 loses digits
    assert 0 < loss.item() < 0.002


def test_dice_disjoint_and_empty():
    """Disjoint: the intersection is 0 -> loss exactly 1. Empty p and t: 1 - 0/0.002 = 1."""
    probs = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(dice_loss(probs, targets), torch.tensor([1.0, 1.0]))


def test_dice_two_pixel_hand_value():
    """p = [0.5, 0.25], t = [1, 0]:
    sum(p*t) = 0.5; sum(p^2) = 0.25 + 0.0625 = 0.3125; sum(t^2) = 1
    d = 2*0.5 / (0.3125 + 0.001 + 1 + 0.001) = 1 / 1.3145 = 0.7607455
    loss = 0.2392545.
    Second row p = [0.5, 0.5], t = [1, 1]: 2*1 / (0.5 + 2 + 0.002) = 0.7993605, loss 0.2006395.
    Rows are independent samples; bool targets are accepted."""
    probs = torch.tensor([[0.5, 0.25], [0.5, 0.5]])
    targets = torch.tensor([[True, False], [True, True]])
    loss = dice_loss(probs, targets)
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(0.2392545, abs=1e-6)
    assert loss[1].item() == pytest.approx(0.2006395, abs=1e-6)


def test_dice_uint8_targets_and_gradient():
    """uint8 targets work and the loss is differentiable w.r.t. the probabilities.
    p = [0.5, 0.25], t = [1, 0]: d(loss)/dp0 = -(2*1.3145 - 2*0.5*2*0.5) / 1.3145^2
    = -(2.629 - 1) / 1.72791 = -0.942757."""
    probs = torch.tensor([[0.5, 0.25]], requires_grad=True)
    loss = dice_loss(probs, torch.tensor([[1, 0]], dtype=torch.uint8))
    loss.sum().backward()
    assert probs.grad[0, 0].item() == pytest.approx(-0.942757, abs=1e-5)


# --------------------------------------------------------------------------------------------
# category_loss: sum of sigmoid focal loss / (number of positive cells + 1)
# --------------------------------------------------------------------------------------------


def test_category_loss_all_background_confident():
    """Every cell background (label C) and logits -30: each term is
    0.75 * sigmoid(-30)^2 * log(1 + e^-30) ~ 1e-39 -> total ~ 0, divided by (0 + 1)."""
    logits = [torch.full((2, 3, 4, 4), -30.0), torch.full((2, 3, 2, 2), -30.0)]
    labels = [torch.full((2, 4, 4), 3), torch.full((2, 2, 2), 3)]
    loss = category_loss(logits, labels, alpha=0.25, gamma=2.0)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_category_loss_single_cell_hand_value():
    """One image, one 1x1 level, C = 2, logits [0, 0] (p = 0.5), label 0:
    class 0 positive: alpha * (1-p)^2 * -log(p) = 0.25 * 0.25 * ln 2 = 0.0433217
    class 1 negative: (1-alpha) * p^2 * -log(1-p) = 0.75 * 0.25 * ln 2 = 0.1299651
    sum 0.1732868, one positive cell -> / (1 + 1) = 0.0866434."""
    loss = category_loss(
        [torch.zeros(1, 2, 1, 1)], [torch.zeros(1, 1, 1, dtype=torch.int64)], alpha=0.25, gamma=2.0
    )
    assert loss.item() == pytest.approx(0.25 * math.log(2) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.0866434, abs=1e-6)


def test_category_loss_single_background_cell_hand_value():
    """Same logits, label 2 == C (background): both classes are negatives,
    2 * 0.1299651 = 0.2599302, no positive -> / (0 + 1)."""
    loss = category_loss(
        [torch.zeros(1, 2, 1, 1)], [torch.full((1, 1, 1), 2)], alpha=0.25, gamma=2.0
    )
    assert loss.item() == pytest.approx(0.75 * 0.25 * math.log(2) * 2, abs=1e-6)


def _reference_category_loss(logits, labels, num_classes, alpha, gamma):
    """Independent reference: torchvision focal loss on NCHW one-hot targets built per class,
    summed over levels, divided by (positive cells + 1)."""
    total, npos = 0.0, 0
    for x, lab in zip(logits, labels):
        target = torch.stack([(lab == c) for c in range(num_classes)], dim=1).to(x.dtype)
        total = total + tv_sigmoid_focal_loss(x, target, alpha=alpha, gamma=gamma, reduction="sum")
        npos += int((lab != num_classes).sum())
    return total / (npos + 1), npos


def test_category_loss_matches_torchvision_random():
    """Two levels (S=4, S=2), two images, C=3, random logits and labels in [0, 3] (3 = BG)."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 3, 4, 4, generator=g) * 2, torch.randn(2, 3, 2, 2, generator=g) * 2]
    labels = [
        torch.randint(0, 4, (2, 4, 4), generator=g),
        torch.randint(0, 4, (2, 2, 2), generator=g),
    ]
    ref, npos = _reference_category_loss(logits, labels, 3, 0.25, 2.0)
    assert 0 < npos < 2 * 16 + 2 * 4  # the case has both positives and background
    loss = category_loss(logits, labels, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_category_loss_other_alpha_gamma():
    """alpha/gamma are passed through: alpha=0.5, gamma=0 on the single-cell case gives
    0.5 * ln 2 (positive) + 0.5 * ln 2 (negative) = ln 2, / 2."""
    loss = category_loss(
        [torch.zeros(1, 2, 1, 1)], [torch.zeros(1, 1, 1, dtype=torch.int64)], alpha=0.5, gamma=0.0
    )
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-6)


def test_category_loss_background_label_is_not_positive():
    """Label C is background: with large positive logits everywhere the loss equals torchvision's
    with all-zero targets divided by 1 (no positive in the denominator), not by (cells + 1)."""
    logits = [torch.full((1, 2, 3, 3), 3.0)]
    labels = [torch.full((1, 3, 3), 2)]
    expected = tv_sigmoid_focal_loss(logits[0], torch.zeros_like(logits[0]), reduction="sum")
    loss = category_loss(logits, labels, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(loss, expected)
    # one term: 0.75 * sigmoid(3)^2 * softplus(3) = 0.75 * 0.9525741^2 * 3.0485874 = 2.0747
    assert loss.item() == pytest.approx(18 * 0.75 * 0.9525741**2 * 3.0485874, rel=1e-5)


def test_category_loss_gradient_flows():
    """The loss is differentiable w.r.t. every level's logits."""
    logits = [
        torch.zeros(1, 2, 2, 2, requires_grad=True),
        torch.zeros(1, 2, 1, 1, requires_grad=True),
    ]
    labels = [torch.tensor([[[0, 2], [1, 2]]]), torch.tensor([[[1]]])]
    category_loss(logits, labels, alpha=0.25, gamma=2.0).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in logits)
