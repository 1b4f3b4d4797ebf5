"""Trace a :class:`SOLOExportable` to TorchScript or ONNX and check the ONNX graph's ops.

Both formats come from the same ``torch.jit.trace`` of the wrapper: TorchScript saves the trace,
ONNX converts it with PyTorch's TorchScript-based exporter (``dynamo=False``). The newer
``torch.export``-based exporter specialises H and W for this model: its symbolic shapes cannot
prove that the FPN's stride-2 sizes line up after the in-graph padding to a multiple of 32.
"""

import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
from torch import Tensor

from .traceable import SOLOExportable

__all__ = [
    "METADATA_PREFIX",
    "MIN_OPSET",
    "DEFORM_CONV_OPSET",
    "OnnxNotInstalledError",
    "min_opset_for",
    "export_torchscript",
    "export_onnx",
    "onnx_op_types",
    "check_standard_onnx",
    "export_metadata",
    "read_metadata",
    "write_metadata",
]

# Prefix of the keys solo_d2 writes into an ONNX model's metadata (:func:`export_metadata`).
METADATA_PREFIX = "solo_d2."

# Oldest ONNX opset the export is made and tested for (the graph's Trilu alone needs 14).
MIN_OPSET = 17


class OnnxNotInstalledError(ImportError):
    """An optional package of the ONNX export (``onnx``, ``onnxruntime``) is not installed."""

    def __init__(self, package: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, an optional dependency of solo_d2: "
            f"pip install {package}"
        )
        self.package = package


def _import_onnx(purpose: str = "checking an exported ONNX model"):
    try:
        import onnx
    except ImportError as e:
        raise OnnxNotInstalledError("onnx", purpose) from e
    return onnx


# ONNX's DeformConv (deformable convolution, DCNv1 and modulated DCNv2) exists from opset 19.
DEFORM_CONV_OPSET = 19


def _deform_conv2d_symbolic(
    g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    n_weight_grps, n_offset_grps, use_mask,
):  # fmt: skip
    """``torchvision::deform_conv2d`` as the standard ONNX ``DeformConv`` (same offset layout:
    (dy, dx) per kernel point, per offset group; a missing mask means DCNv1)."""
    from torch.onnx import symbolic_helper as sh

    kh, kw = sh._get_tensor_sizes(weight)[-2:]
    ints = [sh._get_const(v, "i", name) for v, name in (
        (stride_h, "stride_h"), (stride_w, "stride_w"), (pad_h, "pad_h"), (pad_w, "pad_w"),
        (dil_h, "dil_h"), (dil_w, "dil_w"), (n_weight_grps, "groups"), (n_offset_grps, "og"),
    )]  # fmt: skip
    sh_, sw, ph, pw, dh, dw, groups, offset_groups = ints
    inputs = [input, weight, offset, bias]
    if sh._get_const(use_mask, "b", "use_mask"):
        inputs.append(mask)
    return g.op(
        "DeformConv",
        *inputs,
        kernel_shape_i=[kh, kw],
        strides_i=[sh_, sw],
        pads_i=[ph, pw, ph, pw],
        dilations_i=[dh, dw],
        group_i=groups,
        offset_group_i=offset_groups,
    )


def _uses_deform_conv(module: torch.nn.Module) -> bool:
    return any("Deform" in type(m).__name__ for m in module.modules())


def min_opset_for(module: torch.nn.Module) -> int:
    """The lowest opset ``module`` exports to: 19 with deformable convolutions, else 17."""
    return DEFORM_CONV_OPSET if _uses_deform_conv(module) else MIN_OPSET


def _trace(wrapper: SOLOExportable, image: Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        # tensor-to-int conversions of sizes are recorded symbolically (aten::size), not frozen
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(wrapper.eval(), (image,), check_trace=False)


def export_torchscript(
    wrapper: SOLOExportable, image: Tensor, path: Union[str, Path]
) -> torch.jit.ScriptModule:
    """Trace ``wrapper`` on ``image`` and save it with ``torch.jit.save``.

    The trace runs on ``image``'s device and the saved module runs on that device (it records
    device-bound constants such as CoordConv's coordinates).

    Args:
        wrapper: the model to export.
        image: a sample input of the wrapper's input shape; any size works for later calls.
        path: output file (``.ts`` / ``.pt``).
    Returns:
        the traced module.
    """
    traced = _trace(wrapper, image)
    torch.jit.save(traced, str(path))
    return traced


def export_onnx(
    wrapper: SOLOExportable, image: Tensor, path: Union[str, Path], opset: int = MIN_OPSET
) -> None:
    """Export ``wrapper`` to ONNX with dynamic height and width and a dynamic detection count.

    Args:
        wrapper: the model to export (on the CPU).
        image: a sample input of the wrapper's input shape.
        path: output ``.onnx`` file.
        opset: ONNX opset version, at least :data:`MIN_OPSET`.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    _import_onnx("exporting to ONNX")  # torch.onnx writes the file with it
    if _uses_deform_conv(wrapper):
        if opset < DEFORM_CONV_OPSET:
            raise ValueError(
                f"the model has deformable convolutions: ONNX DeformConv needs opset >= "
                f"{DEFORM_CONV_OPSET}, got {opset}"
            )
        torch.onnx.register_custom_op_symbolic(
            "torchvision::deform_conv2d", _deform_conv2d_symbolic, DEFORM_CONV_OPSET
        )
    h_axis = image.dim() - 2
    dynamic: Dict[str, Dict[int, str]] = {"image": {h_axis: "height", h_axis + 1: "width"}}
    for name in wrapper.output_names:
        dynamic[name] = {0: "detections"}
    dynamic["masks"].update({1: "height", 2: "width"})
    if "soft_masks" in dynamic:
        dynamic["soft_masks"].update({1: "mask_height", 2: "mask_width"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # dynamo=False
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        torch.onnx.export(
            wrapper.eval(),
            (image,),
            str(path),
            input_names=["image"],
            output_names=wrapper.output_names,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    write_metadata(path, export_metadata(wrapper))


def export_metadata(wrapper: SOLOExportable) -> Dict[str, str]:
    """What a runtime needs beside the graph to post-process as the PyTorch model does: the
    padding multiple of the input and the mask threshold (ONNX metadata, strings)."""
    return {
        METADATA_PREFIX + "size_divisibility": str(wrapper.size_divisibility),
        METADATA_PREFIX + "mask_threshold": repr(float(wrapper.postprocess_args["mask_threshold"])),
    }


def write_metadata(path: Union[str, Path], metadata: Dict[str, str]) -> None:
    """Set ``metadata`` in the ``metadata_props`` of the ONNX model at ``path`` (rewritten)."""
    onnx = _import_onnx()
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def read_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The ``metadata_props`` of the ONNX model at ``path``."""
    onnx = _import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_op_types(path: Union[str, Path]) -> Dict[str, List[str]]:
    """``{domain: sorted op types}`` of every node of an ONNX model, subgraphs included
    (the standard domain is ``"ai.onnx"``, written ``""`` in the file)."""
    onnx = _import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    ops: Dict[str, set] = {}

    def visit(graph):
        for node in graph.node:
            ops.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
            for attr in node.attribute:
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(g)

    visit(model.graph)
    return {domain: sorted(types) for domain, types in ops.items()}


def check_standard_onnx(path: Union[str, Path], min_opset: int = MIN_OPSET) -> Sequence[str]:
    """Validate an exported model: ONNX checker, opset >= ``min_opset``, only standard ops.

    Returns:
        the sorted op types it uses.
    Raises:
        ValueError: naming the file and what is wrong.
    """
    onnx = _import_onnx()
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"{path}: the ONNX checker rejects the model: {e}") from e
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx", 0) < min_opset:
        raise ValueError(f"{path}: opset {opsets.get('ai.onnx')} < {min_opset}")
    ops = onnx_op_types(path)
    custom = {d: t for d, t in ops.items() if d != "ai.onnx"}
    if custom or set(opsets) != {"ai.onnx"}:
        raise ValueError(f"{path}: non-standard ops or opset domains: {custom}, {opsets}")
    schemas = [o for o in ops.get("ai.onnx", []) if not onnx.defs.has(o)]
    if schemas:
        raise ValueError(f"{path}: ops unknown to the ONNX standard: {schemas}")
    return ops.get("ai.onnx", [])
