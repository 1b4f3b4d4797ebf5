"""Export of SOLO-family inference to TorchScript and ONNX, and an ONNX Runtime runner.

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
from .traceable import (
    SOLOExportable,
    matrix_nms_traceable,
    postprocess_traceable,
    soft_mask_function,
)

__all__ = [
    "DEFORM_CONV_OPSET",
    "MIN_OPSET",
    "OnnxNotInstalledError",
    "SOLOExportable",
    "check_standard_onnx",
    "export_onnx",
    "export_torchscript",
    "matrix_nms_traceable",
    "min_opset_for",
    "onnx_op_types",
    "postprocess_traceable",
    "soft_mask_function",
]
