"""The criterion (target assignment and losses) outside the META_ARCH: its target policy comes from
the head variant, it holds no state of its own, and the model's losses are its losses."""

import pytest
import torch
from conftest import make_input, tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from solo_d2.modeling import SOLO_HEAD_REGISTRY, SOLOCriterion

# the reference codes' policies for a cell covered by several instances
POLICY = {
    "SOLOv2InstanceHead": False,  # every covering instance trains the cell
    "SOLOInstanceHead": True,  # dense per-cell targets: the last instance wins
    "DecoupledSOLOInstanceHead": True,
    "DecoupledSOLOLightInstanceHead": True,
}


@pytest.mark.parametrize("head", sorted(POLICY))
def test_target_policy_is_the_head_variants(head):
    assert SOLO_HEAD_REGISTRY.get(head).last_instance_wins is POLICY[head]
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.HEAD = head
    model = build_model(cfg)
    assert isinstance(model.criterion, SOLOCriterion)
    assert model.criterion.last_instance_wins is POLICY[head]
    assert not any(k.startswith("criterion.") for k in model.state_dict())


def test_model_losses_are_the_criterions():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    x = make_input(96, 96, [(10, 10, 50, 40), (30, 20, 90, 90)], [0, 2])
    with EventStorage():
        losses = model([x])
        images = model.preprocess_image([x])
        outputs = model.predict(images.tensor)
        direct = model.criterion(
            *outputs,
            [x["instances"]],
            tuple(images.tensor.shape[-2:]),
            model.ins_head.positive_masks,
        )
    assert set(losses) == set(direct) == {"loss_cls", "loss_mask"}
    for k in losses:
        torch.testing.assert_close(losses[k], direct[k])
