"""6-DoF pose refinement of a known mesh through the soft rasterizer (see :mod:`.refine`)."""

from taichi_dr.pipelines.pose.refine import *  # noqa: F403
from taichi_dr.pipelines.pose.refine import __all__  # noqa: F401
