"""The Trainer compiles one train call per step count, whether or not the call is a log
point: a metric-free twin of each call doubled the start-up compile (about 5 s of the char
GPT's time to its first loss on the CPU) for no measurable gain per step.

Counted with `jax.log_compiles` over a second Trainer's `fit`: the first one has compiled
every small array op it shares (copies, slices), so what the second compiles is its own
train calls."""

import logging

import jax
import optax
import pytest

from jaxtrain.data import digits_split
from jaxtrain.models import registry
from jaxtrain.train import Trainer, TrainerConfig, TrainState, classification_loss
from jaxtrain.train.config import TrainConfig


def compiles_during_fit(caplog, steps: int, **train) -> list[str]:
    data, _ = digits_split(range(10))
    model = registry.build("mlp", 0, in_features=64, out_features=10, hidden=(16,))
    config = TrainerConfig(train=TrainConfig(steps=steps, batch_size=32, log_every=4,
                                             **train), handle_signals=False)
    make = lambda: Trainer(TrainState.create(model, optax.adam(1e-3), jax.random.key(0)),
                           classification_loss, config)
    make().fit(data, steps)
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        make().fit(data, steps)
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("Finished XLA compilation")]


@pytest.mark.parametrize("device_data", ["auto", False], ids=["on devices", "from host"])
def test_log_points_and_the_steps_between_share_one_compiled_call(caplog, device_data):
    compiled = compiles_during_fit(caplog, 8, device_data=device_data)
    assert len(compiled) == 1, compiled


def test_multi_step_calls_compile_once_per_step_count(caplog):
    # 7 steps, 2 per call: three 2-step calls (one a log point), then one single step
    compiled = compiles_during_fit(caplog, 7, steps_per_call=2, device_data=False)
    assert len(compiled) == 2, compiled
