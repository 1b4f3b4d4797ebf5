"""Models: the SOLOv2 META_ARCH, its heads, target assignment, losses and post-processing."""

from .meta_arch import SOLOv2  # noqa: F401  (registers META_ARCH "SOLOv2")
