"""Pseudo-labelers: image batch -> per-pixel label maps. Import registers every built-in labeler."""
from data.labelers.base import Labeler, build_labeler, list_labelers, register_labeler
from data.labelers import classical, files, intrinsic, midas, tracer  # noqa: F401  (registration side effects)

__all__ = ["Labeler", "build_labeler", "list_labelers", "register_labeler"]
