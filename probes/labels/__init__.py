"""Pseudo-labelers: image batch -> per-pixel label maps. Import registers every built-in labeler."""
from probes.labels import classical, files, intrinsic, midas, toy, toy_exact, tracer  # noqa: F401  (registration side effects)
from probes.labels.base import Labeler, build_labeler, check_labeler, list_labelers, register_labeler

__all__ = ["Labeler", "build_labeler", "check_labeler", "list_labelers", "register_labeler"]
