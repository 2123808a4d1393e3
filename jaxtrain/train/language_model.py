"""The language-model task: next-token cross-entropy in nats, per-token held-out metrics,
and a generated sample at the end of a run.

Batches hold `tokens` (batch, seq_len + 1): the model reads `[:, :-1]` and predicts
`[:, 1:]` (see `jaxtrain.data.text.windows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data.text import decode
from ..models.gpt import generate


def _token_losses(model, tokens):
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return losses, (jnp.argmax(logits, -1) == targets).astype(jnp.float32)


def lm_loss(model, batch, rng):
    """Mean next-token cross-entropy (nats per token), with next-token accuracy as aux."""
    del rng
    losses, correct = _token_losses(model, batch["tokens"])
    return losses.mean(), {"accuracy": correct.mean()}


def lm_metrics(model, batch):
    """Per-sequence mean token loss and accuracy; all sequences have the same length, so
    their mean over the data is the per-token mean."""
    losses, correct = _token_losses(model, batch["tokens"])
    return {"loss": losses.mean(-1), "accuracy": correct.mean(-1)}


def lm_sample(model, data: dict, length: int = 400, prompt_len: int = 32, seed: int = 0,
              temperature: float = 0.8) -> str:
    """Text generated after the first `prompt_len` tokens of the first validation window
    (decoded by the data's `info['decode']`, bytes by default)."""
    prompt = np.asarray(data["valid"]["tokens"][0, :prompt_len])
    tokens = generate(model, prompt, length, jax.random.key(seed), temperature=temperature)
    return data.get("info", {}).get("decode", decode)(tokens)
