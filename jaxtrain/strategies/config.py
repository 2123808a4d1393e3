"""The config sections of the training strategies (read by `jaxtrain.config.load`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
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
