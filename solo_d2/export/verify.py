"""Verify an export: run it and the PyTorch model on the same inputs and compare detections.

An exported model (:class:`.SOLOExportable` traced to TorchScript or ONNX) should give the PyTorch
model's detections, within the tolerances of :func:`.compare.compare_detections`.
:func:`verify_export` checks it on sample inputs; running it also at :func:`second_size` checks
that the export did not fix the input size it was traced at.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from torch import Tensor, nn

from .compare import Agreement, compare_detections

__all__ = [
    "ExportedRun",
    "ImageAgreement",
    "default_sample_size",
    "load_exported",
    "sample_images",
    "second_size",
    "verify_export",
]

# An exported model as a function: (3, H, W) or (B, 3, H, W) float32 -> its outputs on the CPU,
# (scores (N,), classes (N,), masks (N, H, W)) + (image_index (N,),) with a batch.
ExportedRun = Callable[[Tensor], List[Tensor]]


def default_sample_size(cfg: CfgNode) -> Tuple[int, int]:
    """(h, w): the config's test resize applied to a 3:4 landscape image."""
    short, longest = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    return short, min(int(round(short * 4 / 3)), longest)


def sample_images(cfg: CfgNode, path: Optional[str], count: int) -> List[Tensor]:
    """``count`` model inputs of one size: the image at ``path`` resized by the config's test size
    (with flipped / shifted copies for a batch), or deterministic noise of
    :func:`default_sample_size` when ``path`` is None.

    Returns:
        ``count`` float32 (3, h, w) tensors, in ``cfg.INPUT.FORMAT`` order, 0-255.
    Raises:
        ValueError: ``path`` does not exist.
    """
    import detectron2.data.transforms as T

    from ..data.images import read_image

    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--sample-image {path}: no such file")
        image = read_image(path, format=cfg.INPUT.FORMAT)  # BadImageError (a ValueError)
        aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        image = aug.get_transform(image).apply_image(image)
        base = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    else:
        h, w = default_sample_size(cfg)
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, 256, (3, h, w), generator=g).to(torch.float32)
    variants = [base, base.flip(-1), base.flip(-2), base.roll(base.shape[-1] // 3, -1)]
    return [variants[i % len(variants)] for i in range(count)]


def second_size(images: Sequence[Tensor]) -> List[Tensor]:
    """The (3, h, w) images resized to about 3/4 of their size, to odd dimensions (at least 33):
    another padding than the size traced at."""
    h, w = images[0].shape[-2:]
    size = (max(h * 3 // 4 | 1, 33), max(w * 3 // 4 | 1, 33))
    return [
        torch.nn.functional.interpolate(x[None], size=size, mode="bilinear")[0].round()
        for x in images
    ]


def load_exported(
    path: Union[str, Path],
    output_names: Sequence[str],
    device: Union[str, torch.device] = "cpu",
    num_threads: Optional[int] = None,
) -> ExportedRun:
    """Load ``model.ts`` (TorchScript, run on ``device``) or ``model.onnx`` (ONNX Runtime on the
    CPU with ``num_threads`` intra-op threads) as an :data:`ExportedRun`.

    Raises:
        OnnxNotInstalledError: an ``.onnx`` file without onnxruntime installed.
        ONNXModelError: an ``.onnx`` file ONNX Runtime cannot load or that is no solo_d2 export.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        from .runtime import ONNXRuntimeModel

        session = ONNXRuntimeModel(path, num_threads=num_threads)

        def run_onnx(x: Tensor) -> List[Tensor]:
            out = session.run(x)
            return [torch.from_numpy(np.asarray(out[name])) for name in output_names]

        return run_onnx
    loaded = torch.jit.load(str(path), map_location=device)

    def run_torchscript(x: Tensor) -> List[Tensor]:
        with torch.no_grad():
            return [t.cpu() for t in loaded(x.to(device))]

    return run_torchscript


@dataclass
class ImageAgreement:
    """How the export's detections on one image agree with the PyTorch model's."""

    index: int  # the image's index in its batch
    size: Tuple[int, int]  # (h, w) of the input
    agreement: Agreement

    @property
    def ok(self) -> bool:
        return self.agreement.ok

    def __str__(self) -> str:
        h, w = self.size
        return f"{'PASS' if self.ok else 'FAIL'} image {self.index} ({h}x{w}): {self.agreement}"


def verify_export(
    model: nn.Module, run: ExportedRun, images: Sequence[Tensor], batched: bool
) -> List[ImageAgreement]:
    """Run the PyTorch ``model`` (eval mode) and the export on ``images`` and compare.

    Args:
        model: the SOLO-family model that was exported.
        run: the export (:func:`load_exported`).
        images: float32 (3, H, W) inputs of one size; without ``batched`` only the first is used.
        batched: the export takes a (B, 3, H, W) batch of all ``images`` (B = len(images)) and
            returns an ``image_index`` output.
    Returns:
        one :class:`ImageAgreement` per image compared.
    Raises:
        ValueError: the export's masks are not at the input size.
    """
    device = model.pixel_mean.device
    images = list(images) if batched else list(images[:1])
    with torch.no_grad():
        refs = [model([{"image": x.to(device)}])[0]["instances"].to("cpu") for x in images]
    outputs = run(torch.stack(images) if batched else images[0])
    results = []
    for i, ref in enumerate(refs):
        scores, classes, masks = outputs[:3]
        if batched:
            sel = outputs[3] == i
            scores, classes, masks = scores[sel], classes[sel], masks[sel]
        agreement = compare_detections(ref, scores, classes, masks)
        results.append(ImageAgreement(i, tuple(images[i].shape[-2:]), agreement))
    return results
