"""Run an exported SOLOv2 ``.onnx`` with ONNX Runtime and get what the PyTorch model returns.

``onnxruntime`` is an optional dependency (``pip install onnxruntime``); it is imported when a
model is loaded and a missing install raises :class:`OnnxNotInstalledError` saying so.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.structures import Boxes, Instances

from ..modeling.postprocessing import masks_to_boxes, resize_masks
from ..modeling.tiling import TileSettings, tile_settings, tiled_inference
from .exporter import METADATA_PREFIX, OnnxNotInstalledError

__all__ = ["ONNXModelError", "ONNXRuntimeModel", "ONNXRuntimePredictor"]

_OUTPUTS = ("scores", "classes", "masks")


class ONNXModelError(RuntimeError):
    """An ONNX model file that is missing, unreadable or not a solo_d2 export."""


class ONNXRuntimeModel:
    """An exported SOLOv2 model in an ONNX Runtime session, called like the PyTorch model.

    ``model([{"image": (3, H, W) tensor, "height": ..., "width": ...}])`` returns
    ``[{"instances": Instances}]`` with pred_masks (bool, at height x width), pred_boxes (from the
    masks), scores and int64 pred_classes, as :class:`solo_d2.modeling.SOLOv2` in eval mode does.
    The exported graph returns masks at the input size; when another output size is asked for,
    the graph's ``soft_masks`` output (``tools/export_model.py`` writes it) is resized and
    thresholded here as the PyTorch model does (:func:`resize_masks`). An export without it
    (``SOLOExportable(model)`` exported from Python) has its binary masks resized instead
    (bilinear, threshold 0.5): mask borders may then differ by about a pixel, which costs
    ~0.2 mask AP on ``shapes_val_large`` (docs/export.md).

    Int8 exports (``tools/export_model.py --quantize int8``) load and run the same way. With
    ``tiling`` (:mod:`solo_d2.modeling.tiling`), images are given at full resolution and tiled
    around the exported per-tile model, as the PyTorch model does with ``INPUT.TILE.TEST``.
    """

    def __init__(
        self,
        path: Union[str, Path],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        num_threads: Optional[int] = None,
        tiling: Optional[TileSettings] = None,
        max_per_image: int = 100,
    ):
        """
        Args:
            path: ``.onnx`` file written by ``tools/export_model.py --format onnx``.
            providers: ONNX Runtime execution providers, in order of preference.
            num_threads: intra-op threads (None: ONNX Runtime's default, one per core).
            tiling: tiled inference around the model; None: one pass per image.
            max_per_image: with ``tiling``, detections kept per image after merging.
        Raises:
            OnnxNotInstalledError: onnxruntime is not installed.
            ONNXModelError: ``path`` does not exist, ONNX Runtime cannot load it, or it is not a
                solo_d2 export (inputs/outputs named differently).
        """
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise OnnxNotInstalledError("onnxruntime", "running an ONNX model") from e
        path = Path(path)
        if not path.is_file():
            raise ONNXModelError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ONNXModelError(f"ONNX Runtime cannot load {path}: {e}") from e
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if [i.name for i in inputs] != ["image"] or tuple(outputs[:3]) != _OUTPUTS:
            raise ONNXModelError(
                f"{path}: expected input 'image' and outputs {list(_OUTPUTS)} of a SOLOv2 export, "
                f"got inputs {[i.name for i in inputs]} and outputs {outputs}"
            )
        self.path = path
        self.output_names = outputs
        self.batched = len(inputs[0].shape) == 4
        self.tiling, self.max_per_image = tiling, max_per_image
        meta = self.session.get_modelmeta().custom_metadata_map
        self.size_divisibility = int(meta.get(METADATA_PREFIX + "size_divisibility", 0))
        self.mask_threshold = float(meta.get(METADATA_PREFIX + "mask_threshold", 0.5))
        # the soft masks are resized only with the padding multiple that places them on the input
        self.resizes_soft_masks = "soft_masks" in outputs and self.size_divisibility > 0

    def run(self, image: Union[np.ndarray, torch.Tensor]) -> Dict[str, np.ndarray]:
        """The raw outputs of the graph.

        Args:
            image: float32 (3, H, W), or (B, 3, H, W) for a model exported with a batch size:
                BGR 0-255, what the PyTorch model gets as "image".
        Returns:
            {"scores": (N,), "classes": (N,), "masks": (N, H, W) bool} (+ "image_index" (N,)
            for a batched model, + "soft_masks" (N, Hf, Wf) float32 when the export has them).
        """
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        image = np.ascontiguousarray(image, dtype=np.float32)
        if image.ndim != (4 if self.batched else 3) or image.shape[-3] != 3:
            raise ValueError(
                f"{self.path} takes a float32 {'(B, 3, H, W)' if self.batched else '(3, H, W)'} "
                f"image, got shape {image.shape}"
            )
        return dict(zip(self.output_names, self.session.run(None, {"image": image})))

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        if self.tiling is not None:
            return tiled_inference(batched_inputs, self._untiled, self.tiling, self.max_per_image)
        return [{"instances": r} for r in self._untiled(batched_inputs)]

    def _untiled(self, batched_inputs: List[Dict]) -> List[Instances]:
        if self.batched:
            raise ValueError(
                f"{self.path} was exported with a batch dimension: call .run() with a "
                "(B, 3, H, W) array, or export without --batch-size for this interface"
            )
        results = []
        for x in batched_inputs:
            out = self.run(x["image"])
            masks = torch.from_numpy(out["masks"]).to(torch.bool)
            image_hw = tuple(x["image"].shape[-2:])
            output_hw = (x.get("height", image_hw[0]), x.get("width", image_hw[1]))
            if output_hw != image_hw and self.resizes_soft_masks:
                div = self.size_divisibility
                canvas_hw = tuple(-(-s // div) * div for s in image_hw)
                soft = torch.from_numpy(out["soft_masks"])
                masks = resize_masks(soft, canvas_hw, image_hw, output_hw, self.mask_threshold)
            elif output_hw != image_hw:
                masks = resize_masks(masks.to(torch.float32), image_hw, image_hw, output_hw, 0.5)
            result = Instances(output_hw)
            result.pred_masks = masks
            result.pred_boxes = Boxes(masks_to_boxes(masks))
            result.scores = torch.from_numpy(out["scores"]).to(torch.float32)
            result.pred_classes = torch.from_numpy(out["classes"]).to(torch.int64)
            results.append(result)
        return results


class ONNXRuntimePredictor:
    """The demo's predictor interface (:class:`solo_d2.engine.SOLOPredictor`) on an ONNX model.

    Images are resized by ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` of ``cfg`` as for
    the PyTorch model, run through ONNX Runtime one at a time, and the instances come back at each
    image's own size. ``cfg`` must describe the exported model (its input format and test size);
    its MODEL.WEIGHTS is not used. With ``INPUT.TILE.TEST`` the images are tiled around the
    exported model (:mod:`solo_d2.modeling.tiling`), as the PyTorch model tiles them.
    """

    def __init__(self, cfg: CfgNode, path: Union[str, Path], num_threads: Optional[int] = None):
        import detectron2.data.transforms as T

        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {cfg.INPUT.FORMAT!r}")
        self.tiling = tile_settings(cfg)
        self.model = ONNXRuntimeModel(
            path,
            num_threads=num_threads,
            tiling=self.tiling,
            max_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )

    def __call__(self, images: Sequence[np.ndarray]) -> List[Instances]:
        """
        Args:
            images: (H, W, 3) uint8 images in ``cfg.INPUT.FORMAT``.
        Returns:
            per image, Instances at the image's own size (see :class:`ONNXRuntimeModel`).
        """
        inputs = []
        for image in images:
            if self.tiling is not None:  # full resolution, uint8: resized by the tiling as here
                tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            else:
                resized = self.aug.get_transform(image).apply_image(image)
                tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": image.shape[0], "width": image.shape[1]})
        return [out["instances"] for out in self.model(inputs)]
