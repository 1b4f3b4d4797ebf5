"""Batched inference: images of several sizes in one call give each image its own result, with one
network pass per padded size."""

import copy

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model

from dev.benchmark.inputs import inference_inputs, synthetic_image


@pytest.fixture(scope="module")
def confident_model():
    """The tiny SOLOv2 with a classifier that passes the score threshold in many cells."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.SOLO.INFERENCE_CHUNK_SIZE = 16  # several chunks: the kept-soft-mask path
    model = build_model(cfg).eval()
    torch.nn.init.normal_(model.ins_head.cate_pred.weight, std=0.2)
    torch.nn.init.constant_(model.ins_head.cate_pred.bias, 1.0)
    return model


@pytest.mark.parametrize("nms_pre", [500, 12])  # candidates kept / recomputed after scoring
def test_batched_inference_is_batched_and_equals_single(confident_model, nms_pre):
    model = copy.deepcopy(confident_model)
    model.inference_args["nms_pre"] = nms_pre
    inputs = inference_inputs(2, 96, 128, seed=5)
    inputs.insert(1, {"image": synthetic_image(64, 80, seed=9), "height": 50, "width": 70})
    batch_sizes = []
    # a spy on the backbone: one entry per network pass, with its batch size
    model.backbone.register_forward_pre_hook(lambda m, args: batch_sizes.append(len(args[0])))
    with torch.no_grad():
        batched = [r["instances"] for r in model(inputs)]
        assert sorted(batch_sizes) == [1, 2]  # one network pass per padded size
        singles = [model([x])[0]["instances"] for x in inputs]
    for b, s in zip(batched, singles):  # a batched conv may round differently in the last bit
        assert len(b) > 0 and len(b) == len(s)
        assert torch.equal(b.pred_classes, s.pred_classes)
        torch.testing.assert_close(b.scores, s.scores, rtol=1e-4, atol=1e-5)
        assert (b.pred_masks == s.pred_masks).float().mean() > 0.999
    assert batched[1].image_size == (50, 70)
