"""TrainState, step builders and the loop."""

from .callbacks import Callback, Checkpointer, EarlyStopping
from .config import (
    EarlyStoppingConfig,
    LoggingConfig,
    RunConfig,
    TrainConfig,
    TrainerConfig,
)
from .feeds import Batches
from .logs import JsonlLogger, TensorBoardLogger, plot_curves, plot_history
from .loop import evaluate, fit
from .metrics import classification_report, plot_confusion
from .precision import LossScale, Policy, get_policy
from .progress import Progress
from .state import TrainState, param_logical_axes
from .step import (
    classification_loss,
    classification_metrics,
    make_eval_step,
    make_multi_step,
    make_train_step,
)
from .trainer import NonFiniteError, Trainer

__all__ = [
    "Batches",
    "Callback",
    "Checkpointer",
    "EarlyStopping",
    "EarlyStoppingConfig",
    "JsonlLogger",
    "LoggingConfig",
    "LossScale",
    "NonFiniteError",
    "Policy",
    "Progress",
    "RunConfig",
    "TensorBoardLogger",
    "TrainConfig",
    "Trainer",
    "TrainerConfig",
    "TrainState",
    "classification_loss",
    "classification_metrics",
    "classification_report",
    "evaluate",
    "fit",
    "get_policy",
    "make_eval_step",
    "make_multi_step",
    "make_train_step",
    "param_logical_axes",
    "plot_confusion",
    "plot_curves",
    "plot_history",
]
