"""Export of SOLO-family inference to TorchScript and ONNX, an ONNX Runtime runner, and the
verification of an export against the PyTorch model (:mod:`.verify`); int8 quantization of an
ONNX export (:mod:`.quantize`) and its evaluation on a dataset beside the PyTorch model
(:mod:`.evaluate`).

``onnx`` (ONNX export and graph checks) and ``onnxruntime`` (:mod:`.runtime`) are optional
dependencies, imported only when used; TorchScript export needs neither.
"""

from .exporter import (
    DEFORM_CONV_OPSET,
    MIN_OPSET,
    OnnxNotInstalledError,
    check_standard_onnx,
    export_onnx,
    export_torchscript,
    min_opset_for,
    onnx_op_types,
)
from .traceable import SOLOExportable
from .verify import (
    ExportedRun,
    ImageAgreement,
    default_sample_size,
    load_exported,
    sample_images,
    second_size,
    verify_export,
)

__all__ = [
    "DEFORM_CONV_OPSET",
    "ExportedRun",
    "ImageAgreement",
    "MIN_OPSET",
    "OnnxNotInstalledError",
    "SOLOExportable",
    "check_standard_onnx",
    "default_sample_size",
    "export_onnx",
    "export_torchscript",
    "load_exported",
    "min_opset_for",
    "onnx_op_types",
    "sample_images",
    "second_size",
    "verify_export",
]
