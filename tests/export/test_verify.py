"""solo_d2.export.verify: sample inputs, loading an export and comparing it with PyTorch, on a
tiny SOLOv2 that detects (so that the comparisons compare something)."""

import cv2
import pytest
import torch
from conftest import confident_tiny_model, tiny_cfg

from solo_d2.export import (
    SOLOExportable,
    default_sample_size,
    export_onnx,
    export_torchscript,
    load_exported,
    sample_images,
    second_size,
    verify_export,
)


@pytest.fixture(scope="module")
def cfg():
    """The inputs' config: sample images of 96 x 128."""
    cfg = tiny_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 160
    return cfg


@pytest.fixture(scope="module")
def model():
    return confident_tiny_model()


@pytest.fixture(scope="module")
def torchscript_run(model, tmp_path_factory):
    wrapper = SOLOExportable(model)
    path = tmp_path_factory.mktemp("verify") / "model.ts"
    export_torchscript(wrapper, torch.zeros(3, 64, 64), path)
    return load_exported(path, wrapper.output_names)


def test_sample_images_noise_and_file(cfg, tmp_path):
    assert default_sample_size(cfg) == (96, 128)
    images = sample_images(cfg, None, 5)
    assert [tuple(x.shape) for x in images] == [(3, 96, 128)] * 5
    assert images[0].dtype == torch.float32 and 0 <= images[0].min() and images[0].max() <= 255
    assert torch.equal(images[1], images[0].flip(-1)) and torch.equal(images[4], images[0])
    assert torch.equal(sample_images(cfg, None, 1)[0], images[0])  # deterministic
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8).numpy())
    (image,) = sample_images(cfg, str(path), 1)
    assert tuple(image.shape) == (3, 96, 144)  # short side to MIN_SIZE_TEST, long side <= 160
    with pytest.raises(ValueError, match="no such file"):
        sample_images(cfg, str(tmp_path / "missing.png"), 1)


def test_second_size_is_smaller_and_odd():
    small = second_size([torch.zeros(3, 96, 128), torch.ones(3, 96, 128)])
    assert [tuple(x.shape) for x in small] == [(3, 73, 97)] * 2
    assert tuple(second_size([torch.zeros(3, 20, 20)])[0].shape) == (3, 33, 33)


def test_torchscript_export_agrees_at_two_sizes(cfg, model, torchscript_run):
    images = sample_images(cfg, None, 1)
    results = verify_export(model, torchscript_run, images, batched=False)
    results += verify_export(model, torchscript_run, second_size(images), batched=False)
    assert [r.size for r in results] == [(96, 128), (73, 97)]
    assert all(r.ok for r in results), "\n".join(map(str, results))
    assert all(r.agreement.num_reference > 0 for r in results)  # a real comparison
    assert str(results[0]).startswith("PASS image 0 (96x128): ")


def test_batched_onnx_export_agrees_image_by_image(cfg, model, tmp_path):
    pytest.importorskip("onnxruntime")
    wrapper = SOLOExportable(model, batch_size=2)
    images = sample_images(cfg, None, 2)
    export_onnx(wrapper, torch.stack(images), tmp_path / "model.onnx")
    run = load_exported(tmp_path / "model.onnx", wrapper.output_names, num_threads=1)
    results = verify_export(model, run, images, batched=True)
    assert [r.index for r in results] == [0, 1]
    assert all(r.ok and r.agreement.num_reference > 0 for r in results)


def test_a_differing_export_fails(cfg, model, torchscript_run):
    images = sample_images(cfg, None, 1)

    def shifted_scores(x):
        scores, classes, masks = torchscript_run(x)
        return [scores - 0.01, classes, masks]

    def one_detection_less(x):
        return [t[:-1] for t in torchscript_run(x)]

    def other_classes(x):
        scores, classes, masks = torchscript_run(x)
        return [scores, (classes + 1) % 3, masks]

    for run in (shifted_scores, one_detection_less, other_classes):
        (result,) = verify_export(model, run, images, batched=False)
        assert not result.ok, run.__name__
        assert str(result).startswith("FAIL image 0 (96x128): ")


def test_masks_of_another_size_are_an_error(cfg, model, torchscript_run):
    def cropped_masks(x):
        scores, classes, masks = torchscript_run(x)
        return [scores, classes, masks[:, :-1]]

    with pytest.raises(ValueError):
        verify_export(model, cropped_masks, sample_images(cfg, None, 1), batched=False)
