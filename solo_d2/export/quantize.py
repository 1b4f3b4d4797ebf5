"""Static int8 post-training quantization of an ONNX export with ONNX Runtime's tools.

The float32 ``model.onnx`` of :func:`.export_onnx` is optimised by ONNX Runtime
(``quant_pre_process``), calibrated on images that went through the model's test resize
(MinMax ranges), and rewritten in the QDQ format (QuantizeLinear / DequantizeLinear pairs around
the quantized ops), which ONNX Runtime's CPU provider fuses into int8 kernels (``QLinearConv``).
Choices, following ONNX Runtime's guide for x86 CPUs
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html):

* only ``Conv`` is quantized: uint8 activations (asymmetric), int8 weights per output channel;
  GroupNorm (exported as InstanceNormalization), the dynamic kernels' MatMul, sigmoid and all
  post-processing stay float32;
* every convolution is int8 by default (:data:`DEFAULT_KEEP_FLOAT`): the per-layer errors of
  :func:`layer_errors` single out none and keeping SOLO's prediction convolutions
  (:data:`PREDICTION_CONVS`) in float32 gained no mask AP on the quickstart model (docs/export.md);
  ``keep_float`` leaves chosen ones in float32;
* ``reduce_range`` (7-bit weights) by default: x86 CPUs without VNNI multiply uint8 x int8 with
  VPMADDUBSW, whose 16-bit sums can saturate with 8-bit weights (ONNX Runtime's guide, FAQ;
  microsoft/onnxruntime#28415); VNNI CPUs do not need it and an export made with it runs
  everywhere.

``onnxruntime`` is imported when used (an optional dependency, :class:`.OnnxNotInstalledError`).
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .exporter import OnnxNotInstalledError, _import_onnx

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_KEEP_FLOAT",
    "PREDICTION_CONVS",
    "QuantizationResult",
    "calibration_images",
    "calibration_reader",
    "conv_nodes",
    "layer_errors",
    "quantize_export",
]

# Conv nodes left in float32 by default: none. Measured on the quickstart model (docs/export.md):
# every Conv in int8 loses no mask AP (51.258 vs 51.259 for PyTorch), and keeping the
# prediction convs below in float32 gains none (51.305) but costs 19% of the int8 time of an
# R50-FPN. They are the first to try with ``keep_float`` when a model loses AP.
DEFAULT_KEEP_FLOAT: Tuple[str, ...] = ()
# the convs that produce SOLO's outputs: category logits (thresholded after a sigmoid), the
# predicted dynamic kernels (weights of the mask convolution) and the mask features
PREDICTION_CONVS = ("/ins_head/cate_pred", "/ins_head/kernel_pred", "/mask_head/conv_pred")


def _import_quantization():
    try:
        import onnxruntime.quantization as quantization
    except ImportError as e:
        raise OnnxNotInstalledError("onnxruntime", "int8 quantization") from e
    return quantization


def calibration_reader(images: Iterable[np.ndarray]):
    """An ``onnxruntime.quantization.CalibrationDataReader`` feeding ``images`` (float32
    (3, H, W) model inputs, any sizes) as the export's input ``image``; it can be rewound."""
    quantization = _import_quantization()
    arrays = [np.ascontiguousarray(x, dtype=np.float32) for x in images]
    if not arrays:
        raise ValueError("calibration needs at least one image")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.index = 0

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            if self.index >= len(arrays):
                return None
            self.index += 1
            return {"image": arrays[self.index - 1]}

        def rewind(self) -> None:
            self.index = 0

    return Reader()


def calibration_images(cfg, dataset_name: str, count: int) -> List[np.ndarray]:
    """``count`` images of the registered ``dataset_name``, spread evenly over it, as the model
    receives them at test time (the test mapper of ``cfg``: its input format and test resize).

    Returns:
        float32 (3, H, W) arrays, 0-255 (fewer than ``count`` when the dataset is smaller).
    Raises:
        ValueError: ``count`` < 1, or the dataset has no images.
    """
    from detectron2.data import DatasetCatalog

    from ..engine.trainer import build_mapper

    if count < 1:
        raise ValueError(f"the number of calibration images must be >= 1, got {count}")
    dicts = DatasetCatalog.get(dataset_name)
    if not dicts:
        raise ValueError(f"dataset {dataset_name!r} has no images to calibrate on")
    picks = sorted(set(np.linspace(0, len(dicts) - 1, min(count, len(dicts))).round().astype(int)))
    mapper = build_mapper(cfg, False)
    return [mapper(dict(dicts[i]))["image"].numpy().astype(np.float32) for i in picks]


def conv_nodes(path: Union[str, Path]) -> List[str]:
    """Names of the Conv nodes of an ONNX model, in graph order."""
    onnx = _import_onnx()
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


@dataclass
class QuantizationResult:
    """What :func:`quantize_export` quantized and what it left in float32."""

    quantized: List[str]  # Conv nodes in int8
    kept_float: List[str]  # Conv nodes left in float32
    calibration_images: int
    reduce_range: bool


def _preprocess(float_path: Path, out_path: Path) -> None:
    """ONNX Runtime's optimisation before quantization (constant folding, fusions), so that the
    float and QDQ models have the same nodes. Symbolic shape inference is skipped: it cannot
    follow the data-dependent shapes (NonZero, TopK) of the post-processing."""
    quantization = _import_quantization()
    quantization.quant_pre_process(str(float_path), str(out_path), skip_symbolic_shape=True)


def quantize_export(
    float_path: Union[str, Path],
    out_path: Union[str, Path],
    images: Sequence[np.ndarray],
    *,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
    reduce_range: bool = True,
) -> QuantizationResult:
    """Quantize a float32 export statically to int8 (QDQ) with ONNX Runtime.

    Args:
        float_path: the float32 ``model.onnx``.
        out_path: the int8 model to write.
        images: calibration inputs, float32 (3, H, W) as the export takes them (already resized
            by the model's test resize).
        keep_float: Conv nodes to leave in float32: a node whose name contains one of these
            strings is not quantized.
        reduce_range: 7-bit weights (no saturation on x86 CPUs without VNNI).
    Returns:
        the quantized and the float Conv nodes.
    Raises:
        OnnxNotInstalledError: onnxruntime is missing.
        ValueError: no images, or a ``keep_float`` entry that names no Conv node.
    """
    quantization = _import_quantization()
    reader = calibration_reader(images)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        _preprocess(Path(float_path), pre)
        convs = conv_nodes(pre)
        unknown = [k for k in keep_float if not any(k in name for name in convs)]
        if unknown:
            raise ValueError(f"keep-float {unknown} match no Conv node of {float_path}")
        kept = [name for name in convs if any(k in name for k in keep_float)]
        quantization.quantize_static(
            str(pre),
            str(out_path),
            reader,
            quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            nodes_to_exclude=kept,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
    return QuantizationResult(
        quantized=[name for name in convs if name not in kept],
        kept_float=kept,
        calibration_images=len(images),
        reduce_range=reduce_range,
    )


def layer_errors(
    float_path: Union[str, Path], qdq_path: Union[str, Path], images: Sequence[np.ndarray]
) -> Dict[str, Dict[str, float]]:
    """Per quantized Conv node, the signal-to-quantization-noise ratios (dB, higher is better)
    measured with ``onnxruntime.quantization.qdq_loss_debug`` on ``images``:

    * ``output``: its output before against after its own QuantizeLinear/DequantizeLinear (the
      noise of quantizing this activation);
    * ``vs_float``: its output in the int8 model against the float32 model's (the noise
      accumulated up to here);
    * ``weight``: its weight against the dequantized int8 weight.

    The float model is preprocessed as :func:`quantize_export` does, so that tensor names match.
    Every intermediate tensor of every image is held in memory: use a few small images.
    """
    _import_quantization()  # a clear error without onnxruntime
    from onnxruntime.quantization import qdq_loss_debug as debug

    onnx = _import_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        _preprocess(Path(float_path), pre)
        activations = {}
        for name, path in (("float", pre), ("qdq", Path(qdq_path))):
            augmented = Path(tmp) / f"{name}_augmented.onnx"
            debug.modify_model_output_intermediate_tensors(str(path), str(augmented))
            activations[name] = debug.collect_activations(
                str(augmented), calibration_reader(images)
            )
        matching = debug.create_activation_matching(activations["qdq"], activations["float"])
        activation_err = debug.compute_activation_error(matching)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.CRITICAL)  # it logs an error for each float Conv's weight
        try:
            matches = debug.create_weight_matching(str(pre), str(qdq_path))
        finally:
            root.setLevel(level)
        weight_err = debug.compute_weight_error(matches)
    errors = {}
    for node in onnx.load(str(qdq_path)).graph.node:
        if node.op_type != "Conv":
            continue
        weight = node.input[1]
        weight_name = weight[: -len("_DequantizeLinear_Output")]
        if weight_name not in weight_err:
            continue  # a float Conv
        out = activation_err.get(node.output[0], {})
        errors[node.name] = {
            "output": float(out.get("qdq_err", float("nan"))),
            "vs_float": float(out.get("xmodel_err", float("nan"))),
            "weight": float(weight_err[weight_name]),
        }
    return errors
