"""6-DoF pose refinement of a known mesh through the soft rasterizer (see :mod:`.refine` for the overview)."""

from taichi_dr.pipelines.pose.refine import *  # noqa: F403
from taichi_dr.pipelines.pose.refine import PoseStepCallback
from taichi_dr.pipelines.pose.refine import __all__ as _refine_all

__all__ = [*_refine_all, "PoseStepCallback"]
