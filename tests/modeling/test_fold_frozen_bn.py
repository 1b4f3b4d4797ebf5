"""Inference through a backbone copy with FrozenBatchNorm folded into the convs: same results up
to float rounding, the model's own weights untouched, the copy made again on explicit signals
(train/eval switch, state-dict load, dtype or device), results independent of the grad mode."""

import copy

import pytest
import torch
from conftest import confident_tiny_model, eager
from detectron2.layers import Conv2d, FrozenBatchNorm2d

from solo_d2.modeling.backbone import fold_frozen_batchnorm


def _frozen_bn(channels: int, seed: int) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(channels, generator=g))
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def test_fold_hand_checked_one_channel():
    """1x1 conv, weight 2, no bias; FrozenBN weight 3, bias 1, mean 0.5, var 4 - eps:
    norm(conv(x)) = (2x - 0.5) / 2 * 3 + 1 = 3x + 0.25, i.e. folded weight 3, bias 0.25."""
    conv = Conv2d(1, 1, 1, bias=False, norm=FrozenBatchNorm2d(1))
    with torch.no_grad():
        conv.weight.fill_(2.0)
    bn = conv.norm
    bn.weight.fill_(3.0), bn.bias.fill_(1.0), bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0 - bn.eps)
    x = torch.tensor([[[[0.0, 1.0, -2.0]]]])
    expected = torch.tensor([[[[0.25, 3.25, -5.75]]]])
    torch.testing.assert_close(conv(x), expected)
    assert fold_frozen_batchnorm(conv) == 1
    assert conv.norm is None
    torch.testing.assert_close(conv.weight.flatten(), torch.tensor([3.0]))
    torch.testing.assert_close(conv.bias, torch.tensor([0.25]))
    torch.testing.assert_close(conv(x), expected)


def test_fold_keeps_other_norms_and_matches():
    """Convs with and without bias, channels-last weights, and a GroupNorm conv left alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=False, norm=_frozen_bn(8, 1)),
        Conv2d(8, 8, 3, padding=1, bias=True, norm=_frozen_bn(8, 2)),
        Conv2d(8, 8, 1, norm=torch.nn.GroupNorm(4, 8)),
    ).eval()
    net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 20)
    with torch.no_grad():
        ref = net(x)
        folded = copy.deepcopy(net)
        assert fold_frozen_batchnorm(folded) == 2
        out = folded(x)
    assert isinstance(folded[2].norm, torch.nn.GroupNorm)
    assert folded[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_model_inference_uses_a_folded_copy_made_again_on_explicit_signals():
    model = confident_tiny_model()
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert n_frozen > 0  # tiny_cfg keeps detectron2's default MODEL.RESNETS.NORM "FrozenBN"
    keys = set(model.state_dict())
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    unfolded = copy.deepcopy(model)
    unfolded.fold_frozen_bn = False

    got, ref = eager(model, image), eager(unfolded, image)
    assert len(got) == len(ref) > 0
    assert torch.equal(got.pred_classes, ref.pred_classes)
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-4, atol=1e-5)
    assert (got.pred_masks == ref.pred_masks).float().mean() > 0.999

    folded = model.inference_backbone()
    assert model.inference_backbone() is folded  # made once, kept until a signal
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules()) == n_frozen
    assert set(model.state_dict()) == keys  # the copy is not part of the model's state
    assert all(p.requires_grad for p in model.backbone.fpn_output2.parameters())

    # signal 1: train() / eval() (training steps change the weights in training mode)
    with torch.no_grad():
        model.backbone.bottom_up.stem.conv1.weight.mul_(0.5)
    assert model.inference_backbone() is folded  # no signal yet: weights are not watched
    model.train()
    model.eval()
    again = model.inference_backbone()
    assert again is not folded
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            again(x)["p2"], model.backbone(x)["p2"], rtol=1e-4, atol=1e-4
        )  # the edited weights are in the new copy
    # signal 2: loading a state dict (a hook on the model)
    model.load_state_dict(unfolded.state_dict())
    assert model.inference_backbone() is not again
    torch.testing.assert_close(eager(model, image).scores, ref.scores, rtol=1e-4, atol=1e-5)
    # signal 3: another dtype (or device) than the copy's
    loaded = model.inference_backbone()
    model.double()
    assert model.inference_backbone() is not loaded
    assert next(model.inference_backbone().parameters()).dtype == torch.float64


@pytest.mark.parametrize("head", ["SOLOv2InstanceHead", "DecoupledSOLOInstanceHead"])
def test_eval_results_do_not_depend_on_the_grad_mode(head):
    """The same detections, bit for bit, with and without torch.no_grad() (and in
    inference_mode): eval mode always runs the folded backbone; training mode the backbone."""
    model = confident_tiny_model(head)
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    model.eval()
    outputs = []
    for context in (torch.no_grad, torch.enable_grad, torch.inference_mode):
        with context():
            outputs.append(model([{"image": image}])[0]["instances"])
    assert len(outputs[0]) > 0
    for other in outputs[1:]:
        assert torch.equal(other.pred_classes, outputs[0].pred_classes)
        assert torch.equal(other.scores, outputs[0].scores)
        assert torch.equal(other.pred_masks, outputs[0].pred_masks)
    assert model._folded_backbone  # eval mode ran the folded copy
    model.train()
    assert not model._folded_backbone  # dropped: training changes the weights
    with torch.no_grad():
        model.predict(torch.randn(1, 3, 64, 64))  # training mode: the real backbone
    assert not model._folded_backbone


def test_a_backbone_without_frozen_bn_is_used_as_it_is():
    # BN everywhere: nothing frozen (FREEZE_AT 0 turns no stage into FrozenBN), as the quickstart
    model = confident_tiny_model(**{"MODEL.RESNETS.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": 0})
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert model.inference_backbone() is model.backbone
