"""The config sections of the training strategies (read by `jaxtrain.config.load`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import named, option
from ..errors import JaxtrainError


def _check_positive(section: str, **values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise JaxtrainError(f"config key '{section}.{name}' must be > 0, got {value!r}")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD (`jaxtrain.strategies.privacy`): Poisson batches of expected size
    train.batch_size, per-example clipping, Gaussian noise; the run reports epsilon."""

    l2_norm_clip: float = option(1.0, "clip each example's gradient to this global L2 norm")
    noise_multiplier: float = option(1.0, "noise std per coordinate of the clipped sum, "
                                          "in units of l2_norm_clip")
    delta: float = option(1e-5, "the delta of the reported (epsilon, delta)")
    accountant: str = option("rdp", "rdp (Renyi DP, as TF Privacy and Opacus report) or pld "
                                    "(privacy loss distributions, tighter)",
                             choices=("rdp", "pld"))

    def __post_init__(self):
        _check_positive("privacy", l2_norm_clip=self.l2_norm_clip,
                        noise_multiplier=self.noise_multiplier)
        if not 0 < self.delta < 1:
            raise JaxtrainError(f"config key 'privacy.delta' must be in (0, 1), got "
                                f"{self.delta!r}")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (`jaxtrain.strategies.distill`): the student (the config's
    model) learns alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE(student, label)."""

    teacher: str = option(None, "checkpoint folder of a `jaxtrain train` run: the teacher, "
                                "rebuilt from the model config recorded there",
                          required=True)
    step: int | None = option(None, "the teacher checkpoint's step (null: the latest)")
    temperature: float = option(4.0, "softmax temperature T of both logits")
    alpha: float = option(0.9, "weight of the soft (teacher) term; 1 - alpha: the labels'")
    labelled: float = option(1.0, "fraction of the training examples that keep their "
                                  "labels; the rest learn from the teacher alone")
    transfer: dict | None = option(None, "{name, **kwargs}: a data set whose training "
                                         "inputs join, unlabelled (a transfer set)",
                                   parse=named, shorthand="name")

    def __post_init__(self):
        _check_positive("distill", temperature=self.temperature)
        for name in ("alpha", "labelled"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise JaxtrainError(f"config key 'distill.{name}' must be in [0, 1], got "
                                    f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class LocalSGDConfig:
    """Local SGD / DiLoCo (`jaxtrain.strategies.local_sgd`): each replica of the mesh's
    data axis takes sync_every steps of the config's optimizer alone, then the averaged
    param change feeds one step of the outer optimizer."""

    sync_every: int = option(8, "inner steps per round (H): one all-reduce per round",
                             positive=True)
    outer: dict = option({"optimizer": "sgd", "learning_rate": 1.0},
                         "the outer optimizer, a transforms spec (sgd 1.0: model "
                         "averaging; DiLoCo: nesterov sgd 0.7, momentum 0.9)",
                         shorthand="optimizer")
