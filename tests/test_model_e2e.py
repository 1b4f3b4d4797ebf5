"""End-to-end tests of a tiny SOLOv2 on CPU: training steps, inference, batching, copies."""

import copy

import pytest
import torch
from conftest import make_input, tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def train_step(model, inputs):
    model.train()
    model.zero_grad()
    with EventStorage():
        losses = model(inputs)
    total = sum(losses.values())
    total.backward()
    return losses


def test_train_step_mixed_sizes_and_empty_image(model):
    inputs = [
        make_input(96, 128, [(10, 10, 50, 40), (30, 20, 90, 90)], [0, 2]),
        make_input(64, 80, [], []),  # no annotations at all
        make_input(70, 64, [(2, 3, 9, 11)], [1], seed=1),  # a small object
    ]
    losses = train_step(model, inputs)
    assert set(losses) == {"loss_cls", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_batch_without_any_positive_trains(model):
    """No instance at all: the category loss still counts, the mask loss is 0 but in the graph."""
    losses = train_step(model, [make_input(64, 64), make_input(96, 64)])
    assert losses["loss_cls"] > 0
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    kernel_grad = model.ins_head.kernel_pred.weight.grad
    assert kernel_grad is not None and torch.count_nonzero(kernel_grad) == 0


def test_losses_decrease_when_overfitting_one_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    inputs = [make_input(96, 96, [(8, 8, 56, 56), (40, 50, 90, 92)], [0, 1])]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(30):
        losses = train_step(model, inputs)
        opt.step()
        total = sum(v.item() for v in losses.values())
        first = total if first is None else first
    assert total < 0.6 * first


def _inference(model, inputs):
    model.eval()
    with torch.no_grad():
        return [
            r["instances"]
            for r in model([{k: x[k] for k in ("image", "height", "width")} for x in inputs])
        ]


def test_inference_output_contract(model):
    # confident heads so that something is detected
    m = copy.deepcopy(model)
    torch.nn.init.constant_(m.ins_head.cate_pred.bias, 3.0)
    (inst,) = _inference(m, [dict(make_input(100, 120), height=200, width=240)])
    assert inst.image_size == (200, 240)
    assert len(inst) > 0
    assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (200, 240)
    assert inst.pred_classes.dtype == torch.int64
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_empty_inference_result_is_typed(model):
    m = copy.deepcopy(model)
    m.inference_args["score_threshold"] = 1.1
    (inst,) = _inference(m, [make_input(64, 96)])
    assert len(inst) == 0 and inst.image_size == (64, 96)
    assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape == (0, 64, 96)
    assert inst.pred_classes.dtype == torch.int64 and inst.scores.shape == (0,)
    assert inst.pred_boxes.tensor.shape == (0, 4)


def test_batched_inference_equals_single_image_results(model):
    m = copy.deepcopy(model)
    torch.nn.init.constant_(m.ins_head.cate_pred.bias, 3.0)
    inputs = [make_input(96, 128, seed=1), make_input(64, 64, seed=2), make_input(90, 120, seed=3)]
    batched = _inference(m, inputs)
    for x, b in zip(inputs, batched):
        (alone,) = _inference(m, [x])
        assert len(alone) == len(b) > 0
        assert torch.equal(alone.pred_classes, b.pred_classes)
        torch.testing.assert_close(alone.scores, b.scores, rtol=1e-4, atol=1e-5)
        agree = (alone.pred_masks == b.pred_masks).float().mean()
        assert agree > 0.999


def test_many_candidates_are_processed_in_chunks(model):
    """Every cell passes the threshold: thousands of candidates with a chunk of 64."""
    m = copy.deepcopy(model)
    torch.nn.init.constant_(m.ins_head.cate_pred.bias, 5.0)
    m.inference_args["chunk_size"] = 64
    (chunked,) = _inference(m, [make_input(96, 96, seed=4)])
    m.inference_args["chunk_size"] = 100000
    (whole,) = _inference(m, [make_input(96, 96, seed=4)])
    assert len(chunked) == len(whole) > 0
    torch.testing.assert_close(chunked.scores, whole.scores)
    assert torch.equal(chunked.pred_masks, whole.pred_masks)


def test_deepcopy_and_cpu(model):
    m = copy.deepcopy(model).cpu()
    assert m.device.type == "cpu"
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), m.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_bad_config_values_raise_clear_errors():
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.NMS_TYPE = "soft"
    with pytest.raises(ValueError, match="NMS_TYPE"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.NUM_GRIDS = [12, 10, 8]
    with pytest.raises(ValueError, match="same length"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.INSTANCE_IN_CHANNELS = 64
    with pytest.raises(AssertionError, match="INSTANCE_IN_CHANNELS"):
        build_model(cfg)


def test_channels_last_gives_the_same_losses_gradients_and_results():
    """MODEL.SOLO.CHANNELS_LAST only changes the weights' memory layout, also after loading."""
    torch.manual_seed(0)
    ref = build_model(tiny_cfg())
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.CHANNELS_LAST = True
    fast = build_model(cfg)
    conv_weights = [p for p in fast.parameters() if p.dim() == 4]
    assert conv_weights and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights
    )
    fast.load_state_dict(ref.state_dict())  # a checkpoint saved contiguous loads in place
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    torch.nn.init.constant_(ref.ins_head.cate_pred.bias, 2.0)  # confident, so masks are kept
    torch.nn.init.constant_(fast.ins_head.cate_pred.bias, 2.0)

    inputs = [make_input(96, 128, [(10, 10, 50, 40), (30, 20, 90, 90)], [0, 2])]
    losses_ref, losses_fast = train_step(ref, inputs), train_step(fast, inputs)
    for k in losses_ref:
        torch.testing.assert_close(losses_fast[k], losses_ref[k], rtol=1e-4, atol=1e-5)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)

    (a,), (b,) = _inference(ref, inputs), _inference(fast, inputs)
    assert len(a) > 0
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(b.pred_classes, a.pred_classes)
    assert (b.pred_masks != a.pred_masks).float().mean() < 1e-3
