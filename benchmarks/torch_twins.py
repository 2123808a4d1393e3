"""PyTorch twins of jaxtrain's digits CNN and GPT, and the map of Flax NNX params onto them.

What a PyTorch user would write for the same networks (NCHW convolutions, a fused q/k/v
projection and `F.scaled_dot_product_attention` as in nanoGPT), computing the same
function as `jaxtrain.models.cnn.CNN` and `jaxtrain.models.gpt.GPT` (LayerNorm, rotary
positions, tied embeddings, GELU tanh approximation: the config of `configs/char_gpt.yaml`)
once `load_params` has copied a jaxtrain model's params in. Used by `vs_torch_train.py`.

The layouts: a Flax conv kernel is (h, w, in, out), torch's (out, in, h, w); a Flax dense
kernel is (in, out), torch's Linear weight (out, in); the CNN's dense layer reads a
flattened (h, w, c) map in Flax and a (c, h, w) one in torch, so its rows are reordered;
the attention kernels (embed, heads, head_dim) are concatenated into one (3 embed, embed)
weight and the output kernel (heads, head_dim, embed) is flattened.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchCNN(nn.Module):
    """jaxtrain's `CNN`: conv 3x3 -> relu -> conv 3x3 -> relu -> avg pool 2 -> dense ->
    relu -> head, on (batch, 8, 8) images."""

    def __init__(self, num_classes: int = 10, channels: int = 16, features: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.dense = nn.Linear(2 * channels * 16, features)
        self.head = nn.Linear(features, num_classes)

    def forward(self, images):
        x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.avg_pool2d(x, 2)
        x = F.relu(self.dense(x.flatten(1)))
        return self.head(x)


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """jaxtrain's `gpt.rotary` on (batch, heads, time, head_dim): channel pairs (i,
    i + head_dim/2) rotated by position * base^(-2i/head_dim)."""
    t, h = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, h // 2, dtype=torch.float32) * 2 / h)
    angles = torch.arange(t, dtype=torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """jaxtrain's `GPT` with rotary positions, LayerNorm and tied embeddings: tokens
    (batch, time) -> logits."""

    def __init__(self, vocab_size: int = 256, d_model: int = 128, num_layers: int = 4,
                 num_heads: int = 4, mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, mlp_ratio * d_model, eps)
                                    for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.embed.weight.T


def cnn_state_dict(params: dict) -> dict:
    """A `TorchCNN` state dict from the pure-dict params of a jaxtrain `CNN`."""
    bb = params["backbone"]
    conv = lambda k: np.transpose(k, (3, 2, 0, 1))  # (h, w, in, out) -> (out, in, h, w)
    dense = bb["dense"]["kernel"]  # rows (h, w, c) -> (c, h, w)
    channels = bb["conv2"]["kernel"].shape[-1]
    side = int(round((dense.shape[0] // channels) ** 0.5))
    dense = dense.reshape(side, side, channels, -1).transpose(2, 0, 1, 3).reshape(
        dense.shape[0], -1)
    return {"conv1.weight": conv(bb["conv1"]["kernel"]), "conv1.bias": bb["conv1"]["bias"],
            "conv2.weight": conv(bb["conv2"]["kernel"]), "conv2.bias": bb["conv2"]["bias"],
            "dense.weight": dense.T, "dense.bias": bb["dense"]["bias"],
            "head.weight": params["head"]["kernel"].T, "head.bias": params["head"]["bias"]}


def gpt_state_dict(params: dict) -> dict:
    """A `TorchGPT` state dict from the pure-dict params of a jaxtrain `GPT` (rotary,
    layernorm, tied embeddings, blocks unrolled)."""
    out = {"embed.weight": params["embed"]["embedding"],
           "final_norm.weight": params["final_norm"]["scale"],
           "final_norm.bias": params["final_norm"]["bias"]}
    for i, block in sorted(params["blocks"].items(), key=lambda kv: int(kv[0])):
        attn = block["attn"]
        d = attn["query"]["kernel"].shape[0]
        qkv = [attn[n]["kernel"].reshape(d, d) for n in ("query", "key", "value")]
        out.update({
            f"blocks.{i}.norm1.weight": block["norm1"]["scale"],
            f"blocks.{i}.norm1.bias": block["norm1"]["bias"],
            f"blocks.{i}.qkv.weight": np.concatenate(qkv, axis=1).T,
            f"blocks.{i}.out.weight": attn["out"]["kernel"].reshape(d, d).T,
            f"blocks.{i}.norm2.weight": block["norm2"]["scale"],
            f"blocks.{i}.norm2.bias": block["norm2"]["bias"],
            f"blocks.{i}.up.weight": block["mlp"]["up"]["kernel"].T,
            f"blocks.{i}.down.weight": block["mlp"]["down"]["kernel"].T,
        })
    return out


def load_params(module: nn.Module, state_dict: dict) -> nn.Module:
    """Copy `state_dict` (numpy arrays) into `module`; every entry must be used and fit."""
    tensors = {k: torch.from_numpy(np.array(v, np.float32, order="C", copy=True))
               for k, v in state_dict.items()}
    module.load_state_dict(tensors, strict=True)
    return module
