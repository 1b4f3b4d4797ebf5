#!/usr/bin/env python3
"""Run a SOLOv2 model on images, a video or a webcam and draw (or save) its instances, or its
panoptic segmentation when the model gives one (MODEL.META_ARCHITECTURE "PanopticSOLO").

    python demo/demo.py --input photo.jpg                      # prints "photo.jpg: N instances ..."
    python demo/demo.py --config-file SOLOv2_R101_3x --input photo.jpg   # model zoo names work too
    python demo/demo.py --input images/ "more/*.png" --output out/ --json
    python demo/demo.py --input photo.jpg --output drawn.jpg --confidence-threshold 0.3
    python demo/demo.py --video-input clip.mp4 --output out/   # writes out/clip.mp4
    python demo/demo.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --input img.png --opts MODEL.WEIGHTS output/quickstart/model_final.pth
    python demo/demo.py --config-file configs/SOLOv2_R18_quickstart_shapes.yaml \
        --input img.png --onnx export/model.onnx   # ONNX Runtime (tools/export_model.py)
    python demo/demo.py --config-file configs/SOLOv2_R50_3x_panoptic.yaml \
        --input photo.jpg --output out/ --json --opts MODEL.WEIGHTS panoptic_model.pth

Panoptic models: images and video frames are drawn as panoptic segmentations (stuff, then the
thing segments), and --json adds a "panoptic" record (every segment's pixels as COCO RLE). The
thing segments are the instances the model's merge kept: those scoring at least
MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH and not mostly hidden by better ones (change it
with --opts); --confidence-threshold filters only the json's "instances" list, not the segments.
With --onnx, whose export holds the instance branch only, instances are drawn.

With the default config (the model zoo's SOLOv2_R50_3x) and no trained weights given, AdelaiDet's
published COCO model is downloaded. Exit status: 0 on success, 1 when some input image could not
be read (each is named with the reason), 2 on bad arguments, a bad config or unavailable or
unfitting weights (one "error: ..." line). Visualisations and json files are written atomically
(temporary file, then rename), so an interrupted run never leaves a truncated output.
"""

import argparse
import glob
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.structures import BoxMode, Instances
from pycocotools import mask as mask_util
from tqdm import tqdm

from solo_d2.atomic_io import atomic_write_json
from solo_d2.config import ConfigError, load_config, merge_config_opts
from solo_d2.data.images import read_image
from solo_d2.data.shapes import register_shapes
from solo_d2.data.shapes_panoptic import register_shapes_panoptic
from solo_d2.engine import BadWeightsError, SOLOPredictor, WeightsUnavailableError
from solo_d2.export.exporter import OnnxNotInstalledError
from solo_d2.export.runtime import ONNXModelError, ONNXRuntimePredictor
from solo_d2.model_zoo import published_checkpoint, resolve_config_file
from solo_d2.modeling import is_panoptic
from solo_d2.visualization.drawing import InstanceDrawer, Panoptic, class_names, stuff_class_names

# the default model: a model zoo config name, and its published COCO weights (AdelaiDet's), used
# when no trained weights are given
DEFAULT_CONFIG = "SOLOv2_R50_3x"
COCO_WEIGHTS_URL = published_checkpoint(DEFAULT_CONFIG, source="adelaidet").url
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
WINDOW_NAME = "SOLOv2"


def get_parser() -> argparse.ArgumentParser:
    """The command-line parser of the demo."""
    parser = argparse.ArgumentParser(description="SOLOv2 demo on images, a video or a webcam")
    parser.add_argument(
        "--config-file",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help="model config: a file, or a model zoo config name such as SOLOv2_R101_3x (default: "
        f"{DEFAULT_CONFIG}, with AdelaiDet's COCO weights)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="image files, glob patterns (quote them) or folders (their jpg/jpeg/png/bmp/webp/tif)",
    )
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="the first webcam, shown live")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="where to save visualisations: a file when there is exactly one input image "
        "(and the name has an image suffix), else a folder, created if needed. Without it, "
        "image results are only printed",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        metavar="SCORE",
        help="drop instances scoring below this from the visualisations and json (default 0.5); "
        "panoptic models draw the thing segments their merge kept (instances scoring at least "
        "MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH), which this does not filter",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="also write each image's instances (COCO RLE masks) to <stem>.json next to its "
        'visualisation; for a panoptic model, also its segments ("panoptic")',
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="images run through the model at once (image inputs; default 1)",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="run this ONNX export (tools/export_model.py) with ONNX Runtime on the CPU instead "
        "of the PyTorch model (needs: pip install onnxruntime); --config-file must be the config "
        "it was exported from (test size, input format, class names), MODEL.WEIGHTS is unused",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth MODEL.DEVICE cpu",
    )
    return parser


def setup_cfg(config_file: str, opts: List[str], warn_untrained: bool = True) -> CfgNode:
    """Config from ``config_file`` (a file, else a model zoo name) and ``opts``, with COCO weights
    for the default recipe.

    When the config is ``SOLOv2_R50_3x.yaml``, its MODEL.WEIGHTS holds no trained model (empty
    or an ImageNet backbone) and ``opts`` sets no MODEL.WEIGHTS, AdelaiDet's COCO model is used.

    Raises:
        ConfigError: a missing or malformed config file, an unknown key, a value of a wrong type.
    """
    config_file = resolve_config_file(config_file)
    cfg = load_config(config_file)
    untrained = not cfg.MODEL.WEIGHTS or "ImageNetPretrained" in cfg.MODEL.WEIGHTS
    weights_given = "MODEL.WEIGHTS" in opts[::2]
    if untrained and not weights_given and Path(config_file).stem == DEFAULT_CONFIG:
        cfg.MODEL.WEIGHTS = COCO_WEIGHTS_URL
        cfg.MODEL.SOLO.NUM_CLASSES = 80
        cfg.DATASETS.TEST = ("coco_2017_val",)
    elif untrained and not weights_given and warn_untrained:
        print(
            f"warning: MODEL.WEIGHTS={cfg.MODEL.WEIGHTS!r} is no trained SOLOv2 model: the heads "
            "are randomly initialised (pass one with --opts MODEL.WEIGHTS /path/to/model.pth)",
            file=sys.stderr,
        )
    merge_config_opts(cfg, opts, source="--opts")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("warning: CUDA is not available, running on the CPU", file=sys.stderr)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def collect_images(patterns: List[str]) -> List[str]:
    """Image files named by ``patterns``: files, folders (sorted, not recursive) and globs.

    Raises:
        ValueError: a pattern names no file.
    """
    images = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
        if not found:
            raise ValueError(f"--input {pattern}: no such image file, folder or glob match")
        images += found
    return list(dict.fromkeys(images))


def instances_to_json(instances: Instances, names: List[str]) -> List[Dict]:
    """COCO-style records of ``instances`` (CPU): class, score, XYWH box and RLE mask."""
    boxes = BoxMode.convert(instances.pred_boxes.tensor, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
    masks = instances.pred_masks.numpy().astype(np.uint8)
    records = []
    for box, mask, score, cls in zip(
        boxes.tolist(), masks, instances.scores.tolist(), instances.pred_classes.tolist()
    ):
        rle = mask_util.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        records.append(
            {
                "class_id": cls,
                "class_name": names[cls],
                "score": score,
                "bbox": box,
                "segmentation": rle,
            }
        )
    return records


def panoptic_to_json(
    panoptic: Panoptic, names: List[str], stuff_names: List[str]
) -> Dict[str, object]:
    """The "panoptic" record of one image's panoptic segmentation (CPU).

    Args:
        panoptic: (H, W) int32 segment ids (0: no segment) and segments_info, as the model gives.
        names: thing class names (``category_id`` of thing segments).
        stuff_names: stuff class names, 0 being "things" (``category_id`` of stuff segments).
    Returns:
        ``{"height", "width", "segments"}``, per segment "id", "isthing", "category_id" (a thing
        class 0..C-1 or a stuff class 1..K), "category" (its name), "area" (its pixels in the
        segment map) and "segmentation" (those pixels as COCO RLE, counts a str), plus "score"
        for things; in the model's order.
    """
    seg, segments_info = panoptic
    ids = seg.numpy()
    segments = []
    for info in segments_info:
        mask = np.asfortranarray(ids == info["id"], dtype=np.uint8)
        rle = mask_util.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        thing = bool(info["isthing"])
        record = {
            "id": int(info["id"]),
            "isthing": thing,
            "category_id": int(info["category_id"]),
            "category": (names if thing else stuff_names)[info["category_id"]],
            "area": int(mask_util.area(rle)),
            "segmentation": rle,
        }
        if thing:
            record["score"] = float(info["score"])
        segments.append(record)
    return {"height": int(ids.shape[0]), "width": int(ids.shape[1]), "segments": segments}


def describe(num_instances: int, panoptic: Optional[Panoptic]) -> str:
    """The count printed for an image: its instances, and its thing and stuff segments when it
    has a panoptic segmentation."""
    text = f"{num_instances} instances"
    if panoptic is not None:
        things = sum(bool(s["isthing"]) for s in panoptic[1])
        text += f", {things} thing and {len(panoptic[1]) - things} stuff segments"
    return text


class ImageOutputs:
    """Where the visualisation and json of each input image go."""

    def __init__(self, output: str, images: List[str], with_json: bool):
        """
        Raises:
            ValueError: ``output`` names one file for several images, or two images would be
                written to the same file.
        """
        out = Path(output)
        self.single_file = out.suffix.lower() in IMAGE_EXTENSIONS and not out.is_dir()
        if self.single_file and len(images) != 1:
            raise ValueError(
                f"--output {output} is a file name but there are {len(images)} input images; "
                "give a folder"
            )
        self.out = out
        if not self.single_file:
            keys = [Path(p).stem if with_json else Path(p).name for p in images]
            duplicates = sorted({k for k in keys if keys.count(k) > 1})
            if duplicates:
                raise ValueError(
                    f"input images share the file name(s) {duplicates}: their outputs in "
                    f"{output} would overwrite each other"
                )

    def visualisation_file(self, image: str) -> Path:
        """The visualisation file of input ``image``."""
        return self.out if self.single_file else self.out / Path(image).name

    def json_file(self, image: str) -> Path:
        """The json file of input ``image``, next to its visualisation."""
        return self.visualisation_file(image).with_suffix(".json")

    def create_folder(self) -> None:
        """Create the output folder (the file's parent in single-file mode)."""
        (self.out.parent if self.single_file else self.out).mkdir(parents=True, exist_ok=True)


def filter_by_score(instances: Instances, threshold: float) -> Instances:
    """The instances scoring at least ``threshold``."""
    return instances[instances.scores >= threshold]


def run_on_images(
    args: argparse.Namespace,
    cfg: CfgNode,
    images: List[str],
    outputs: Optional[ImageOutputs],
) -> int:
    """Predict, print and save every image; return 1 if some could not be read, else 0."""
    predictor = build_predictor(cfg, args)
    drawer = InstanceDrawer.from_config(cfg)
    names = class_names(cfg)
    stuff_names = stuff_class_names(cfg)  # used for predictions with "panoptic_seg"
    if outputs is not None:
        outputs.create_folder()
    failed = []
    with tqdm(total=len(images), unit="image", file=sys.stderr) as progress:
        for start in range(0, len(images), args.batch_size):
            batch, arrays = [], []
            for path in images[start : start + args.batch_size]:
                try:
                    arrays.append(read_image(path, cfg.INPUT.FORMAT, cfg.INPUT.MAX_IMAGE_PIXELS))
                    batch.append(path)
                except ValueError as e:  # BadImageError: names the file and the problem
                    tqdm.write(f"warning: could not read {e}", file=sys.stderr)
                    failed.append(path)
                    progress.update()
            if not batch:
                continue
            tic = time.perf_counter()
            predictions = predict(predictor, arrays)
            seconds = (time.perf_counter() - tic) / len(batch)  # a batch's time, shared
            for path, array, prediction in zip(batch, arrays, predictions):
                instances = filter_by_score(prediction["instances"], args.confidence_threshold)
                panoptic = prediction.get("panoptic_seg")
                tqdm.write(f"{path}: {describe(len(instances), panoptic)} in {seconds:.2f} s")
                if outputs is not None:
                    drawer.save(str(outputs.visualisation_file(path)), array, instances, panoptic)
                    if args.json:
                        record = {
                            "file_name": path,
                            "height": array.shape[0],
                            "width": array.shape[1],
                            "instances": instances_to_json(instances, names),
                        }
                        if panoptic is not None:
                            record["panoptic"] = panoptic_to_json(panoptic, names, stuff_names)
                        atomic_write_json(str(outputs.json_file(path)), record)
                progress.update()
    if failed:
        print(f"{len(failed)} of {len(images)} images could not be read", file=sys.stderr)
        return 1
    return 0


def build_predictor(cfg: CfgNode, args: argparse.Namespace):
    """The PyTorch predictor, or the ONNX Runtime one with --onnx (same call interface)."""
    if not args.onnx:
        return SOLOPredictor(cfg)
    if is_panoptic(cfg):
        print(
            "warning: the ONNX export holds the instance branch only: instances are drawn, "
            "no panoptic segmentation",
            file=sys.stderr,
        )
    return ONNXRuntimePredictor(cfg, args.onnx)


def predict(predictor, images: List[np.ndarray]) -> List[Dict]:
    """Per image, {"instances"} and, from a panoptic PyTorch model, "panoptic_seg" (see
    ``SOLOPredictor.predict``); the ONNX Runtime predictor gives instances only."""
    if isinstance(predictor, SOLOPredictor):
        return predictor.predict(images)
    return [{"instances": instances} for instances in predictor(images)]


def to_input_format(frame: np.ndarray, input_format: str) -> np.ndarray:
    """A BGR OpenCV frame in the model's ``input_format``."""
    return frame[:, :, ::-1] if input_format == "RGB" else frame


def predict_frames(capture, predictor, cfg: CfgNode, args: argparse.Namespace, progress):
    """Yield (image, thresholded Instances, panoptic segmentation or None) for each frame of an
    opened cv2.VideoCapture."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        image = to_input_format(frame, cfg.INPUT.FORMAT)
        prediction = predict(predictor, [image])[0]
        instances = filter_by_score(prediction["instances"], args.confidence_threshold)
        yield image, instances, prediction.get("panoptic_seg")
        progress.update()


def run_on_video(args: argparse.Namespace, cfg: CfgNode) -> int:
    """Predict every frame of ``args.video_input``; write an mp4 to ``args.output`` if given."""
    capture = cv2.VideoCapture(args.video_input)
    if not capture.isOpened():
        print(f"error: cannot open video {args.video_input}", file=sys.stderr)
        return 2
    predictor = build_predictor(cfg, args)
    drawer = InstanceDrawer.from_config(cfg)
    writer = None
    if args.output:
        out = Path(args.output)
        if out.is_dir() or not out.suffix:
            out = out / (Path(args.video_input).stem + ".mp4")
        out.parent.mkdir(parents=True, exist_ok=True)
        size = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    frames = num_instances = 0
    tic = time.perf_counter()
    with tqdm(total=total, unit="frame", file=sys.stderr) as progress:
        for image, instances, panoptic in predict_frames(capture, predictor, cfg, args, progress):
            if writer is not None:
                writer.write(drawer.draw(image, instances, panoptic))
            frames += 1
            num_instances += len(instances)
    capture.release()
    if writer is not None:
        writer.release()
    seconds = time.perf_counter() - tic
    print(f"{args.video_input}: {frames} frames, {num_instances} instances in {seconds:.2f} s")
    return 0


def run_on_webcam(args: argparse.Namespace, cfg: CfgNode) -> int:
    """Show predictions on the first webcam's frames until Esc is pressed."""
    capture = cv2.VideoCapture(0)
    if not capture.isOpened():
        print("error: cannot open the webcam", file=sys.stderr)
        return 2
    predictor = build_predictor(cfg, args)
    drawer = InstanceDrawer.from_config(cfg)
    with tqdm(unit="frame", file=sys.stderr) as progress:
        for image, instances, panoptic in predict_frames(capture, predictor, cfg, args, progress):
            cv2.imshow(WINDOW_NAME, drawer.draw(image, instances, panoptic))
            if cv2.waitKey(1) == 27:  # Esc
                break
    capture.release()
    cv2.destroyAllWindows()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv``, run the demo and return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # a failed weights download is reported below, with its reason, in one line
    logging.getLogger("iopath.common.download").setLevel(logging.CRITICAL)
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.json and (args.input is None or args.output is None):
        parser.error("--json needs --input images and an --output")
    if args.webcam and args.output is not None:
        parser.error("--webcam shows its frames and saves nothing: drop --output")
    if len(args.opts) % 2:
        parser.error(f"--opts needs KEY VALUE pairs, got {args.opts}")
    outputs = images = None
    if args.input is not None:
        try:
            images = collect_images(args.input)
            if args.output is not None:
                outputs = ImageOutputs(args.output, images, args.json)
        except ValueError as e:
            parser.error(str(e))

    register_shapes()  # metadata (class names, colours) of the shapes configs
    register_shapes_panoptic()  # and of the panoptic shapes config (stuff names too)
    try:
        cfg = setup_cfg(args.config_file, args.opts, warn_untrained=not args.onnx)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if images is not None:
            return run_on_images(args, cfg, images, outputs)
        if args.video_input:
            return run_on_video(args, cfg)
        return run_on_webcam(args, cfg)
    except WeightsUnavailableError as e:
        if e.remote:
            print(
                f"error: the weights could not be downloaded from {e.path} ({e.reason}); pass a "
                "local checkpoint with --opts MODEL.WEIGHTS /path/to/model.pth",
                file=sys.stderr,
            )
        else:
            print(f"error: weights file not found: {e.path} (MODEL.WEIGHTS)", file=sys.stderr)
        return 2
    except (BadWeightsError, OnnxNotInstalledError, ONNXModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
