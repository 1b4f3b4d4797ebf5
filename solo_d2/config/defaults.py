"""``add_solo_config``: every SOLO-family config key, under ``MODEL.SOLO``.

Backbone deformable convs use detectron2's own keys (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``,
``DEFORM_MODULATED``, ``DEFORM_NUM_GROUPS``) with the backbone ``build_solo_resnet_fpn_backbone``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_solo_config", "DEFAULT_MAX_IMAGE_PIXELS"]

# Default of INPUT.MAX_IMAGE_PIXELS (solo_d2.data.images): 10000 x 10000, 0.3 GB decoded as RGB.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


def add_solo_config(cfg: CN) -> None:
    """Add the SOLO-family keys to a detectron2 config (in place). Safe to call twice."""
    if "SOLO" in cfg.MODEL:
        return
    _C = cfg
    _C.MODEL.SOLO = CN()
    # ---- variant ------------------------------------------------------------------------------
    # Instance head (solo_d2.modeling.SOLO_HEAD_REGISTRY), i.e. the family member:
    #   "SOLOv2InstanceHead"             SOLOv2 (dynamic kernels + mask-feature branch), light too
    #   "SOLOInstanceHead"               SOLO: S^2 mask maps per level
    #   "DecoupledSOLOInstanceHead"      Decoupled SOLO: S row + S column maps, two mask towers
    #   "DecoupledSOLOLightInstanceHead" Decoupled SOLO light: one shared mask tower
    _C.MODEL.SOLO.HEAD = "SOLOv2InstanceHead"
    # ---- instance branch (category tower + the head's mask/kernel towers), one entry per level --
    _C.MODEL.SOLO.NUM_CLASSES = 80  # foreground classes (contiguous ids 0..C-1; C is background)
    # Backbone features fed to the instance branch. The first is resized x0.5 and the last is
    # resized to the size of the one before it (SOLO's "split_feats"), giving strides 8,8,16,32,32.
    _C.MODEL.SOLO.INSTANCE_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    _C.MODEL.SOLO.FPN_INSTANCE_STRIDES = [8, 8, 16, 32, 32]  # effective stride of each level
    # Range of sqrt(box w * box h), in input pixels, that makes an instance positive on a level
    # (inclusive at both ends; ranges overlap, so an instance can be positive on two levels).
    _C.MODEL.SOLO.FPN_SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    _C.MODEL.SOLO.NUM_GRIDS = [40, 36, 24, 16, 12]  # S: the S x S category/kernel grid per level
    _C.MODEL.SOLO.SIGMA = 0.2  # epsilon of the paper: centre region = sigma * box size
    _C.MODEL.SOLO.INSTANCE_IN_CHANNELS = 256  # channels of the instance-branch input features
    _C.MODEL.SOLO.INSTANCE_CHANNELS = 512  # width of the category and kernel (or mask) towers
    _C.MODEL.SOLO.NUM_INSTANCE_CONVS = 4  # 3x3 convs in each tower
    _C.MODEL.SOLO.NUM_KERNELS = 256  # E (SOLOv2): dynamic 1x1 kernel length = mask-feature channels
    _C.MODEL.SOLO.NORM = "GN"  # norm in tower convs and mask-feature convs ("GN" or "" for none)
    _C.MODEL.SOLO.PRIOR_PROB = 0.01  # initial foreground probability of the category classifier
    # Deformable convs in the towers of the instance head: "" (none), "DCN" (v1) or "DCNv2"
    # (modulated). They run on detectron2's compiled ops on GPU when present, otherwise on
    # torchvision.ops.deform_conv2d (solo_d2/modeling/dcn.py).
    _C.MODEL.SOLO.TOWER_DCN = ""
    # Which tower convs are deformable when TOWER_DCN is set: "all" (SOLOv2-DCN) or "last" (the
    # official light heads: SOLOv2 light-512 DCN, Decoupled SOLO light DCN).
    _C.MODEL.SOLO.TOWER_DCN_CONVS = "all"
    # ---- mask-feature branch (SOLOv2) ------------------------------------------------------------
    _C.MODEL.SOLO.MASK_IN_FEATURES = ["p2", "p3", "p4", "p5"]  # fused to the stride of the first
    _C.MODEL.SOLO.MASK_IN_CHANNELS = 256  # channels of the mask-branch input features
    _C.MODEL.SOLO.MASK_CHANNELS = 128  # hidden width of the mask-feature branch
    # Deformable type of every mask-feature conv, the 1x1 output conv included: "" or "DCNv2"
    # (official SOLOv2 R101/X101-DCN); "DCN" (v1) is accepted too.
    _C.MODEL.SOLO.MASK_DCN = ""
    # ---- losses --------------------------------------------------------------------------------
    _C.MODEL.SOLO.LOSS = CN()
    _C.MODEL.SOLO.LOSS.FOCAL_ALPHA = 0.25  # sigmoid focal loss alpha (category branch)
    _C.MODEL.SOLO.LOSS.FOCAL_GAMMA = 2.0  # sigmoid focal loss gamma
    _C.MODEL.SOLO.LOSS.FOCAL_WEIGHT = 1.0  # weight of loss_cls (sum / (num positive cells + 1))
    _C.MODEL.SOLO.LOSS.DICE_WEIGHT = 3.0  # weight of loss_mask (dice, mean over positive samples)
    # ---- inference -----------------------------------------------------------------------------
    _C.MODEL.SOLO.SCORE_THRESH_TEST = 0.1  # category score a grid cell needs to be a candidate
    _C.MODEL.SOLO.MASK_THRESH_TEST = 0.5  # soft-mask binarisation threshold (also mask-NMS IoU)
    _C.MODEL.SOLO.NMS_PRE_TOPK = 500  # candidates kept (by maskness-rescored score) before NMS
    _C.MODEL.SOLO.UPDATE_THRESH_TEST = 0.05  # score a detection needs after Matrix NMS decay
    _C.MODEL.SOLO.NMS_TYPE = "matrix"  # "matrix" (Matrix NMS) or "mask" (sequential mask NMS)
    _C.MODEL.SOLO.NMS_KERNEL = "gaussian"  # Matrix NMS decay: "gaussian" or "linear"
    _C.MODEL.SOLO.NMS_SIGMA = 2.0  # Gaussian decay exp(-sigma * iou^2), the reference code's form
    # Candidates whose soft masks are computed at once; bounds inference memory however many
    # grid cells pass SCORE_THRESH_TEST (results do not depend on it).
    _C.MODEL.SOLO.INFERENCE_CHUNK_SIZE = 256
    # Final detections per image come from the standard key TEST.DETECTIONS_PER_IMAGE (100).
    # Images per batch of the evaluation loader. Images with the same padded size run through
    # the network together; each image's result is the same as alone.
    _C.TEST.IMS_PER_BATCH = 1
    # ---- panoptic segmentation (SOLOv2 paper, Sec. 5.3; solo_d2/modeling/panoptic.py) ----------
    # Used by MODEL.META_ARCHITECTURE "PanopticSOLO": the instance model plus a stuff branch,
    # trained on the semantic target of panoptic data (DATASETS from --dataset
    # NAME=panoptic:...); inference also returns "sem_seg" and "panoptic_seg". Things are the
    # instances (MODEL.SOLO.NUM_CLASSES thing classes).
    _C.MODEL.SOLO.PANOPTIC = CN()
    # Stuff categories (COCO: 53). The stuff branch predicts NUM_STUFF_CLASSES + 1 classes:
    # 0 is "things" (every thing pixel), 1..NUM_STUFF_CLASSES the stuff categories.
    _C.MODEL.SOLO.PANOPTIC.NUM_STUFF_CLASSES = 53
    # Backbone features fused to the stride of the first (as the mask-feature branch: FPN
    # P2-P5 to 1/4), then classified per pixel.
    _C.MODEL.SOLO.PANOPTIC.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    _C.MODEL.SOLO.PANOPTIC.CHANNELS = 128  # width of the stuff branch (Panoptic FPN: 128)
    # Weight of loss_sem_seg (per-pixel cross-entropy at input resolution; Panoptic FPN's COCO
    # recipe weighs its semantic loss 0.5).
    _C.MODEL.SOLO.PANOPTIC.LOSS_WEIGHT = 0.5
    # Merging things and stuff (Panoptic FPN's heuristic; detectron2's
    # MODEL.PANOPTIC_FPN.COMBINE.* defaults but the first): instances are pasted by descending
    # score down to INSTANCES_CONFIDENCE_THRESH. Matrix NMS decays SOLO's scores, so its correct
    # instances score lower than Mask R-CNN's, for which Panoptic FPN's 0.5 was chosen: on the
    # measured score distributions, recognition quality (the F1 that PQ multiplies) peaks at 0.2
    # and 0.5 drops most things (docs/your_data.md, "Panoptic paste threshold").
    _C.MODEL.SOLO.PANOPTIC.INSTANCES_CONFIDENCE_THRESH = 0.2
    # ...skipping one whose pixels already taken exceed this fraction of its mask,
    _C.MODEL.SOLO.PANOPTIC.OVERLAP_THRESH = 0.5
    # ...then each stuff class fills the pixels left to it if they are at least this many
    # (pixels of the output resolution).
    _C.MODEL.SOLO.PANOPTIC.STUFF_AREA_LIMIT = 4096

    # ---- speed ---------------------------------------------------------------------------------
    # Store the model's conv weights channels-last (NHWC) in eval mode: same results up to float
    # rounding, faster inference on CPU (measured in docs/benchmarks.md). The layout follows the
    # mode: train() makes the weights NCHW again unless CHANNELS_LAST_TRAIN, eval() channels-last.
    # Applied when MODEL.DEVICE is the CPU only: on CUDA the model keeps detectron2's layout
    # (NCHW), the lever not having been measured on a GPU. The model's constructor has the same
    # default.
    _C.MODEL.SOLO.CHANNELS_LAST = True
    # Channels-last in training too: True, False, or None ("auto"): on where the CPU has AVX-512
    # (torch.backends.cpu.get_cpu_capability()), off elsewhere. Measured (docs/benchmarks.md): a
    # training step channels-last takes 0.88x the time on an AVX-512 Intel Xeon, 1.22x on an
    # AVX2-only AMD EPYC. CPU only, as CHANNELS_LAST.
    _C.MODEL.SOLO.CHANNELS_LAST_TRAIN = None
    # At inference, run the backbone through a copy with its FrozenBatchNorm layers folded into
    # the convs before them (MODEL.RESNETS.NORM "FrozenBN", the default): same results up to
    # float rounding, one pass over the activations less per conv. Costs a second copy of the
    # backbone weights in memory (R50-FPN: ~110 MB); False runs the backbone as it is. The copy
    # is made again after train()/eval() and after loading weights. The constructor's default too.
    _C.MODEL.SOLO.FOLD_FROZEN_BN = True

    # ---- solver --------------------------------------------------------------------------------
    # "SGD" (detectron2's, the published recipes) or "ADAMW" (BASE_LR, WEIGHT_DECAY as usual).
    _C.SOLVER.OPTIMIZER = "SGD"

    # ---- plots (solo_d2/visualization/training_plots.py, docs/visualization.md) ---------------
    # True: after each evaluation the Trainer writes per_class_ap_<dataset>.png (mask and box AP
    # of every class) into OUTPUT_DIR, and after evaluations and at the end of training
    # loss_curve.png (every logged loss per iteration, from metrics.json). A failed plot only
    # logs a warning. False: no plots.
    _C.TEST.SAVE_PLOTS = True

    # ---- data checks (solo_d2/data/validation.py, docs/reliability.md) ------------------------
    # False: a training image or annotation that fails the checks (unreadable file, empty or
    # invalid mask, box outside the image, unknown category, ...) is skipped with a warning that
    # counts and names it. True: any such fault in the training data is an error.
    _C.DATASETS.STRICT = False
    # Images of more pixels (width x height) are refused from their header, before decoding
    # (a small file can declare billions of pixels): training skips them with a warning,
    # evaluation stops and the demo warns, naming the file. A --dataset whose annotation file
    # declares a larger image is refused at registration. Default 10^8 (10000 x 10000).
    _C.INPUT.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS

    # ---- tiles: small objects in large images (docs/your_data.md, "Small objects in large
    # images"; solo_d2/data/tiling.py trains on tiles, solo_d2/modeling/tiling.py infers) ------
    _C.INPUT.TILE = CN()
    # Train on tiles: each training image becomes a SIZE x SIZE crop of the full-resolution image
    # resized by SCALE, or, with probability WHOLE_IMAGE_PROB, the whole image resized as usual
    # (MIN_SIZE_TRAIN / MAX_SIZE_TRAIN); an image that fits in one tile is always used whole.
    _C.INPUT.TILE.TRAIN = False
    # Infer on tiles: overlapping SIZE x SIZE tiles of the full-resolution image, each resized by
    # SCALE, plus the whole image resized by MIN_SIZE_TEST / MAX_SIZE_TEST, merged by mask into
    # one set of instances at the image's size. The model then takes images at full resolution
    # (the test resize moves into the model); an image that fits in one tile runs untiled.
    _C.INPUT.TILE.TEST = False
    _C.INPUT.TILE.SIZE = 512  # tile side, in pixels of the original image (>= 32)
    _C.INPUT.TILE.SCALE = 1.0  # a tile's resize before the model: model input side SIZE * SCALE
    # Inference: share of a tile's side that neighbouring tiles overlap, in [0, 0.5]. An object
    # smaller than the overlap is whole in at least one tile.
    _C.INPUT.TILE.OVERLAP = 0.25
    _C.INPUT.TILE.BATCH_SIZE = 4  # inference: tiles run through the network together
    # Inference: two detections of one class from different passes (tiles, whole image) are one
    # object when their masks' intersection, over the smaller of their areas inside the window
    # both passes saw, is at least this (SAHI's IoS, on masks); merged: union, max score.
    _C.INPUT.TILE.MERGE_THRESH = 0.5
    _C.INPUT.TILE.WHOLE_IMAGE_TEST = True  # inference: also run the whole image (large objects)
    # Training: share of the images used whole (resized) instead of a tile, in [0, 1].
    _C.INPUT.TILE.WHOLE_IMAGE_PROB = 0.25
    # Training: share of the tiles placed to hold the centre of a random instance of the image
    # (the rest are placed uniformly), in [0, 1].
    _C.INPUT.TILE.INSTANCE_PROB = 0.75
    # Training: an object cut by the tile is kept when at least this share of its box is inside
    # the tile (SAHI drops under 0.1, DOTA's splitter under 0.7); the rest are dropped as slivers.
    _C.INPUT.TILE.MIN_VISIBLE = 0.3
