"""Training methods and the engine they share."""

# The shared training engine (engine.py, config.py, checkpoint.py, callbacks.py): importing it loads no method.
from taichi_dr.pipelines.callbacks import Callback, MetricsLog, ProgressCallback, Validation
from taichi_dr.pipelines.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from taichi_dr.pipelines.config import OptimizerConfig, TrainConfig, lr_factor
from taichi_dr.pipelines.engine import (
    Interrupted,
    Method,
    NonFiniteError,
    Trainer,
    TrainingViews,
    TrainResult,
    TrainState,
    clip_gradients,
)

__all__ = [
    "Callback", "MetricsLog", "ProgressCallback", "Validation", "CheckpointError", "load_checkpoint",
    "save_checkpoint", "Interrupted", "Method", "NonFiniteError", "OptimizerConfig", "TrainConfig", "Trainer",
    "TrainingViews", "TrainResult", "TrainState", "clip_gradients", "lr_factor",
]
