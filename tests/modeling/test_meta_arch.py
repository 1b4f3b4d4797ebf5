"""End-to-end tests of a tiny SOLOv2 on CPU: training steps, inference, batching, chunking,
channels-last.

Results that must not change (batched or not, chunked or not, channels-last or not) are compared
as float32 results of different kernels are: detections paired by ``compare_detections`` (class,
score within 1e-3, mask IoU >= 0.99), on a model and inputs where float32 rounding decides
nothing (conftest's ``confident_tiny_model`` and ``assert_rounding_insensitive``); each such
test also shows that the comparison fails on a real discrepancy.
"""

import copy

import pytest
import torch
from conftest import (
    assert_rounding_insensitive,
    confident_tiny_model,
    eager,
    make_input,
    tiny_cfg,
    train_step,
)
from detectron2.modeling import build_model

from solo_d2.export.compare import compare_detections


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def agreement(reference, other):
    """``compare_detections`` of two Instances."""
    return compare_detections(reference, other.scores, other.pred_classes, other.pred_masks)


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


def test_batched_inference_equals_single_image_results():
    m = confident_tiny_model()
    # the first and last images share a padded size (96 x 128), so they run as one batch
    inputs = [make_input(96, 128, seed=1), make_input(64, 64, seed=2), make_input(90, 120, seed=3)]
    batched = _inference(m, inputs)
    for x, b in zip(inputs, batched):
        assert_rounding_insensitive(m, x["image"])
        (alone,) = _inference(m, [x])
        assert len(alone) > 0 and agreement(alone, b).ok, agreement(alone, b)
    # a real discrepancy is caught: the 90 x 120 image padded to the 128 x 160 canvas of a larger
    # image (what grouping the batch by padded size avoids) has other grid cells and detections
    larger = make_input(128, 160, seed=4)
    padded, _ = [r["instances"] for r in m._inference_same_size([inputs[2], larger])]
    assert not agreement(batched[2], padded).ok


def test_many_candidates_are_processed_in_chunks():
    """Every cell that survives points NMS is a candidate (339): chunked by 64 and with the 200
    best (NMS_PRE_TOPK) recomputed, or all at once with their masks kept, the same result."""
    m = confident_tiny_model()
    m.inference_args.update(score_threshold=0.0, nms_pre=200)
    image = make_input(96, 96, seed=4)["image"]
    assert_rounding_insensitive(m, image)
    m.inference_args["chunk_size"] = 64
    chunked = eager(m, image.float())
    m.inference_args["chunk_size"] = 100000
    whole = eager(m, image.float())
    assert len(chunked) == 100 and agreement(whole, chunked).ok, agreement(whole, chunked)
    # a real discrepancy is caught: NMS on the 100 best candidates instead of the 200 best
    m.inference_args["nms_pre"] = 100
    assert not agreement(whole, eager(m, image.float())).ok


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


def training_and_inference_differences(ref, other, inputs):
    """How ``other`` differs from ``ref`` on ``inputs``: the largest relative difference of a
    loss, the largest relative difference of a parameter's gradient (by the norm of the whole
    tensor: elementwise, gradients summed to near 0 carry the rounding of their terms), and the
    agreement of the detections on the first image."""
    losses_ref, losses = train_step(ref, inputs), train_step(other, inputs)
    loss_diff = max(abs(losses[k].item() / losses_ref[k].item() - 1) for k in losses_ref)
    grad_diff = max(
        ((p.grad - p_ref.grad).norm() / p_ref.grad.norm()).item()
        for p_ref, p in zip(ref.parameters(), other.parameters())
        if p_ref.grad is not None
    )
    image = inputs[0]["image"]
    return loss_diff, grad_diff, agreement(eager(ref, image), eager(other, image))


def test_channels_last_follows_the_mode():
    """CHANNELS_LAST without CHANNELS_LAST_TRAIN (the default on AVX2 CPUs): channels-last in
    eval mode, NCHW in training; the switch keeps the Parameter objects (optimizers hold them)
    and their values, and the folded backbone copy is made in the eval layout."""
    model = confident_tiny_model(**{"MODEL.SOLO.CHANNELS_LAST_TRAIN": False})  # eval mode
    weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    before = [p.detach().clone() for p in weights]
    cl = torch.channels_last
    assert weights and all(p.is_contiguous(memory_format=cl) for p in weights)
    assert all(
        p.is_contiguous(memory_format=cl)
        for p in model.inference_backbone().parameters()
        if p.dim() == 4 and p.shape[-1] > 1
    )
    model.train()
    assert list(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1) == weights
    assert all(p.is_contiguous() and not p.is_contiguous(memory_format=cl) for p in weights)
    model.eval()
    assert all(p.is_contiguous(memory_format=cl) for p in weights)
    assert all(torch.equal(p, b) for p, b in zip(weights, before))


def test_channels_last_gives_the_same_losses_gradients_and_results():
    """MODEL.SOLO.CHANNELS_LAST (and CHANNELS_LAST_TRAIN) only change the weights' memory
    layout, also after loading: float32 results of other kernels (losses within 1e-4, gradients
    within 1e-3 of their norm, the same detections)."""
    ref = confident_tiny_model(**{"MODEL.SOLO.CHANNELS_LAST": False})
    fast = confident_tiny_model(
        **{"MODEL.SOLO.CHANNELS_LAST": True, "MODEL.SOLO.CHANNELS_LAST_TRAIN": True}
    )
    assert not any(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in ref.parameters()
        if p.dim() == 4 and p.shape[-1] > 1
    )
    conv_weights = [p for p in fast.parameters() if p.dim() == 4]
    assert conv_weights and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights
    )
    fast.load_state_dict(ref.state_dict())  # a checkpoint saved contiguous loads in place
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    inputs = [make_input(96, 128, [(10, 10, 50, 40), (30, 20, 90, 90)], [0, 2])]
    assert_rounding_insensitive(ref, inputs[0]["image"])

    loss_diff, grad_diff, detections = training_and_inference_differences(ref, fast, inputs)
    assert loss_diff < 1e-4 and grad_diff < 1e-3, (loss_diff, grad_diff)
    assert len(detections.pairs) == 100 and detections.ok, detections
    # a real discrepancy is caught: one 3 x 3 conv of the classifier tower transposed (a layout
    # mistake) changes every check
    with torch.no_grad():
        tower_conv = fast.ins_head.cate_tower[0].weight
        tower_conv.copy_(tower_conv.transpose(-1, -2).clone())
    loss_diff, grad_diff, detections = training_and_inference_differences(ref, fast, inputs)
    assert loss_diff > 1e-4 and grad_diff > 1e-3 and not detections.ok


def test_channels_last_train_auto_follows_the_cpu(monkeypatch):
    """MODEL.SOLO.CHANNELS_LAST_TRAIN None / "auto": channels-last training where the CPU has
    AVX-512 (measured faster there), NCHW on AVX2; True/False as given; anything else an error."""
    from solo_d2.modeling.meta_arch import _channels_last_train

    for capability, expected in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert _channels_last_train(None) is expected and _channels_last_train("auto") is expected
        assert _channels_last_train(True) is True and _channels_last_train(False) is False
    with pytest.raises(ValueError, match="CHANNELS_LAST_TRAIN"):
        _channels_last_train("yes")
