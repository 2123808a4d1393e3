"""TrainState, step builders and the loop."""

from .logs import JsonlLogger, plot_curves
from .loop import evaluate, fit
from .progress import Progress
from .state import TrainState, param_logical_axes
from .step import classification_loss, classification_metrics, make_eval_step, make_train_step

__all__ = [
    "JsonlLogger",
    "Progress",
    "TrainState",
    "classification_loss",
    "classification_metrics",
    "evaluate",
    "fit",
    "make_eval_step",
    "make_train_step",
    "param_logical_axes",
    "plot_curves",
]
