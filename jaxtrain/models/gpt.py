"""A decoder-only transformer (GPT) with logical axis names on every param.

Pre-norm blocks (LayerNorm or RMSNorm), rotary or learned positions, causal attention
through `jax.nn.dot_product_attention` (the fused kernels on GPU), optional tied
embeddings, a selectable rematerialisation policy per block, and optionally the blocks
stacked on a leading `layers` axis and run by one `jax.lax.scan` (`scan_layers`). Param
paths: `embed/embedding`, `pos_embed/embedding` (learned positions), `blocks/<i>/{norm1,
attn,norm2,mlp}/...` (or, scanned, `blocks/{norm1,attn,norm2,mlp}/...` with a leading
layer dimension), `final_norm/*`, `lm_head/kernel` (untied).

Why scan: under `fsdp` the compiler gathers a sharded weight where it is used. Unrolled,
it schedules the gathers of every layer early and keeps them alive, so the step's peak
holds about the whole model; in a scan only the current layer's slice is gathered inside
the loop body (ZeRO-3's per-layer gathering), and the step compiles one block instead of
`num_layers`. `jaxtrain.checkpoint.layout` converts params between the two layouts.
Traced under a mesh whose `pipe` axis is larger than 1, the scanned blocks run as pipeline
stages (`jaxtrain.sharding.pipeline`; the params keep the same layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import JaxtrainError
from ..sharding import pipeline
from ..sharding.mesh import BATCH_AXES
from .annotate import kernel_init, ones_init, zeros_init
from .init import INITIALIZERS, gpt2_stds, initializer

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("rotary", "learned")
ATTENTION = ("auto", "xla", "cudnn")
# What each block keeps for the backward pass: everything (`none`: no remat), nothing
# (`full`: the block is recomputed), or only matmul outputs (`dots`), or only matmul
# outputs without batch dimensions, i.e. not attention scores (`dots_no_batch`).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LAYER_AXIS = pipeline.LAYERS  # the stacked layer dimension (presets: on the pipe stages)


def remat_policy_name(remat) -> str:
    """The canonical policy name for `remat` (a name above; True/False mean full/none)."""
    if remat is True or remat is False:
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise JaxtrainError(f"GPT remat={remat!r}: valid are {', '.join(REMAT_POLICIES)} "
                            "(or true/false for full/none)")
    return remat


def attention_implementation(choice: str, q: jax.Array) -> str:
    """The kernel for `jax.nn.dot_product_attention`: 'auto' takes cuDNN's fused (flash)
    attention where it applies (a GPU, 16-bit inputs, head size a multiple of 8 up to 128)
    and XLA's otherwise."""
    if choice != "auto":
        return choice
    head = q.shape[-1]
    fused = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
             and head % 8 == 0 and head <= 128)
    return "cudnn" if fused else "xla"


def attend(q, k, v, choice: str = "auto"):
    """Causal attention with the kernel `choice` names; under 'auto', shapes cuDNN refuses
    at trace time (it wants, say, even sequence lengths) fall back to XLA's kernel."""
    kernel = attention_implementation(choice, q)
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kernel)
    except NotImplementedError:
        if choice != "auto":
            raise
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _normal(axes: tuple, std: float = 0.02):
    return kernel_init(axes, nnx.initializers.normal(std))


def _kernel(init: str, axes: tuple, std: float = 0.02, in_axis=-2, out_axis=-1):
    """A projection kernel's init: GPT-2's N(0, std^2) under `init` 'gpt2', else the
    named variance-scaling rule (`jaxtrain.models.init`) with these fan axes."""
    if init == "gpt2":
        return _normal(axes, std)
    return kernel_init(axes, initializer(init, in_axis, out_axis))


def _norm(kind: str, d: int, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "layernorm":
        return nnx.LayerNorm(d, scale_init=ones_init(("norm",)), bias_init=zeros_init(("norm",)),
                             rngs=rngs)
    return nnx.RMSNorm(d, scale_init=ones_init(("norm",)), rngs=rngs)


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of `x` (batch, time, heads, head_dim): each pair of
    channels (i, i + head_dim/2) is rotated by the angle position * base^(-2i/head_dim)."""
    t, h = x.shape[1], x.shape[-1]
    freqs = base ** (-np.arange(0, h // 2, dtype=np.float32) * 2 / h)
    angles = np.arange(t, dtype=np.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.asarray(np.cos(angles))[:, None, :], jnp.asarray(np.sin(angles))[:, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head causal self-attention; q/k/v kernels (embed, heads, kv)."""

    def __init__(self, d: int, heads: int, head_dim: int, use_rotary: bool, out_std: float,
                 attention: str = "auto", init: str = "gpt2", *, rngs: nnx.Rngs):
        self.use_rotary, self.attention = use_rotary, attention
        shape_in = (d, heads, head_dim)
        # fans: q/k/v (embed, heads, kv) read embed and write heads x kv; out the reverse
        qkv = _kernel(init, ("embed", "heads", "kv"), in_axis=0, out_axis=(1, 2))
        self.query = nnx.Einsum("btd,dnh->btnh", shape_in, kernel_init=qkv, rngs=rngs)
        self.key = nnx.Einsum("btd,dnh->btnh", shape_in, kernel_init=qkv, rngs=rngs)
        self.value = nnx.Einsum("btd,dnh->btnh", shape_in, kernel_init=qkv, rngs=rngs)
        self.out = nnx.Einsum("btnh,nhd->btd", (heads, head_dim, d), rngs=rngs,
                              kernel_init=_kernel(init, ("heads", "kv", "embed"), out_std,
                                                  in_axis=(0, 1), out_axis=2))

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.use_rotary:
            q, k = rotary(q), rotary(k)
        return self.out(attend(q, k, v, self.attention))


class FeedForward(nnx.Module):
    """Two-layer GELU MLP, kernels (embed, mlp) and (mlp, embed), no biases."""

    def __init__(self, d: int, hidden: int, out_std: float, init: str = "gpt2", *,
                 rngs: nnx.Rngs):
        self.up = nnx.Linear(d, hidden, use_bias=False, rngs=rngs,
                             kernel_init=_kernel(init, ("embed", "mlp")))
        self.down = nnx.Linear(hidden, d, use_bias=False, rngs=rngs,
                               kernel_init=_kernel(init, ("mlp", "embed"), out_std))

    def __call__(self, x):
        # as 2-D (tokens, embed) matmuls: on (batch, time, embed) XLA:CPU wrote the GELU's
        # gradient transposed for the up kernel's gradient, a strided copy that took a
        # quarter of a char GPT step (benchmarks/RESULTS.md)
        tokens = x.reshape(-1, x.shape[-1])
        return self.down(jax.nn.gelu(self.up(tokens))).reshape(x.shape)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d, heads, head_dim, hidden, norm, use_rotary, out_std, attention,
                 init="gpt2", *, rngs):
        self.norm1 = _norm(norm, d, rngs)
        self.attn = Attention(d, heads, head_dim, use_rotary, out_std, attention, init,
                              rngs=rngs)
        self.norm2 = _norm(norm, d, rngs)
        self.mlp = FeedForward(d, hidden, out_std, init, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _block_call(block: Block, x):
    return block(x)


def batch_sharded(x):
    """`x` constrained to the step's batch split (its leading dim over the mesh's `data`
    and `fsdp` axes) when traced under a mesh (`sharding.compile_step` sets one); else `x`.

    Why: under `fsdp` a block's weights are split on their `embed` dim. Left free, XLA's
    partitioner may keep them split and instead gather the activations of the whole
    fsdp group (the batch over `data` only), computing partial sums it then all-reduces:
    it did for the default GPT (d_model 256, batch 16 x 128), whose 8-way fsdp step then
    held the whole batch's attention scores and MLP hidden on every device (temporaries
    55 MiB against 23 at 2-way). Pinning each block's input to the batch split makes it
    gather the (small) layer weights instead, as ZeRO-3 does (15.6 MiB at 8-way)."""
    mesh = jax.sharding.get_abstract_mesh()
    kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    # Only axes the partitioner places (inside shard_map/pmap they are Manual).
    axes = tuple(a for a in BATCH_AXES if kinds.get(a) == jax.sharding.AxisType.Auto)
    if mesh.empty or not axes:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def whole_rows(table):
    """`table` (rows, embed) constrained to unsplit rows (its `embed` dim replicated, the
    row dim left to the partitioner) when traced under a mesh; else `table`.

    Why: the lookup's gradient is a scatter-add of batch-split rows into the table. With
    the table split on `embed` (fsdp) and the batch also split over `data`, XLA's scatter
    partitioner tries moving the updates onto the table's `embed` split, a resharding it
    can only do through a full replicated copy, and logs "Involuntary full
    rematerialization" (unrolled and scanned GPT, fsdp and fsdp+tp with data > 1). With
    whole rows the scatter runs on each device's batch rows, then sums across devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return table  # inside shard_map/pmap (Manual axes) the split is the caller's
    free = jax.sharding.PartitionSpec.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(table, jax.sharding.PartitionSpec(free, None))


def stack_modules(modules: list[nnx.Module], axis_name: str = LAYER_AXIS) -> nnx.Module:
    """One module like `modules[0]` whose every variable is the stack of the modules'
    variables on a new leading axis, with `axis_name` prepended to its logical axis names.
    Built from modules made one by one, the stacked model's init equals the unstacked one's
    for the same seed."""
    graphdef = nnx.graphdef(modules[0])
    states = [nnx.state(m) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for _, var in nnx.to_flat_state(stacked):
        names = var.get_metadata().get("out_sharding")
        if names:
            var.set_metadata(out_sharding=(axis_name, *names))
    return nnx.merge(graphdef, stacked)


class GPT(nnx.Module):
    """Byte/token-level decoder-only transformer: tokens (batch, time) -> logits.

    `init` 'gpt2' (the default) is GPT-2's: every weight N(0, 0.02^2), the projections
    into the residual stream scaled by 1 / sqrt(2 num_layers) (`init.gpt2_stds`); a name
    of `jaxtrain.models.init` draws every projection kernel (attention, MLP, an untied
    head) by that rule instead, fans counted per projection (q/k/v: fan-in embed, fan-out
    heads x head_dim), embeddings staying N(0, 0.02^2)."""

    def __init__(self, vocab_size: int = 256, d_model: int = 128, num_layers: int = 4,
                 num_heads: int = 4, mlp_ratio: int = 4, max_len: int = 256,
                 positions: str = "rotary", norm: str = "layernorm",
                 tie_embeddings: bool = True, remat: str | bool = "none",
                 attention: str = "auto", scan_layers: bool = False, init: str = "gpt2", *,
                 rngs: nnx.Rngs):
        if positions not in POSITIONS:
            raise JaxtrainError(f"GPT positions={positions!r}: valid are {', '.join(POSITIONS)}")
        if norm not in NORMS:
            raise JaxtrainError(f"GPT norm={norm!r}: valid are {', '.join(NORMS)}")
        if attention not in ATTENTION:
            raise JaxtrainError(
                f"GPT attention={attention!r}: valid are {', '.join(ATTENTION)}")
        if init != "gpt2" and init not in INITIALIZERS:
            raise JaxtrainError(f"GPT init={init!r}: valid are gpt2, {', '.join(INITIALIZERS)}")
        remat = remat_policy_name(remat)
        if not isinstance(scan_layers, bool):
            raise JaxtrainError(f"GPT scan_layers={scan_layers!r}: must be true or false")
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise JaxtrainError(
                f"GPT d_model={d_model} must split into num_heads={num_heads} heads of an even "
                "size"
            )
        self.config = {"name": "GPT", "vocab_size": vocab_size, "d_model": d_model,
                       "num_layers": num_layers, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
                       "max_len": max_len, "positions": positions, "norm": norm,
                       "tie_embeddings": tie_embeddings, "remat": remat, "attention": attention,
                       "scan_layers": scan_layers}
        self.max_len, self.remat, self.tie_embeddings = max_len, remat, tie_embeddings
        self.scan_layers = scan_layers
        head_dim = d_model // num_heads
        out_std = gpt2_stds(num_layers)[1]  # GPT-2's scaled init of residual outputs
        self.embed = nnx.Embed(vocab_size, d_model, embedding_init=_normal(("vocab", "embed")),
                               rngs=rngs)
        self.pos_embed = (
            nnx.Embed(max_len, d_model, embedding_init=_normal(("pos", "embed")), rngs=rngs)
            if positions == "learned" else None
        )
        blocks = [Block(d_model, num_heads, head_dim, mlp_ratio * d_model, norm,
                        positions == "rotary", out_std, attention, init, rngs=rngs)
                  for _ in range(num_layers)]
        self.blocks = stack_modules(blocks) if scan_layers else nnx.List(blocks)
        self.final_norm = _norm(norm, d_model, rngs)
        self.lm_head = None if tie_embeddings else nnx.Linear(
            d_model, vocab_size, use_bias=False, kernel_init=_kernel(init, ("embed", "vocab")),
            rngs=rngs,
        )

    def __call__(self, tokens):
        t = tokens.shape[1]
        if t > self.max_len:
            raise JaxtrainError(f"GPT input has {t} positions, more than max_len={self.max_len}")
        # The table is used directly: nnx.Embed computes in the dtype it was built with
        # (float32), which would undo a bfloat16 compute policy's cast of the params.
        table = self.embed.embedding[...]
        x = jnp.take(whole_rows(table), tokens, axis=0)
        if self.pos_embed is not None:
            x = x + self.pos_embed.embedding[...][:t]
        x = self._run_blocks(x)
        x = self.final_norm(x)
        return x @ table.T if self.lm_head is None else self.lm_head(x)

    def _run_blocks(self, x):
        """The blocks in order: unrolled, or as one scan over the stacked layer axis whose
        body merges that layer's slice of the variables into a `Block` and applies it
        (under a mesh with `pipe` > 1: one such scan per pipeline stage, `_pipelined`)."""
        policy = REMAT_POLICIES[self.remat]
        if not self.scan_layers:
            if pipeline.stages() > 1:
                raise JaxtrainError("pipeline parallelism (mesh pipe > 1) needs the GPT's "
                                    "layers stacked: scan_layers=True")
            call = _block_call if self.remat == "none" else nnx.remat(_block_call,
                                                                      policy=policy)
            for block in self.blocks:
                x = call(block, batch_sharded(x))
            return x
        # Random-stream state (a LoRA adapter's dropout) has no layer axis: it is carried
        # through the layers, each drawing its own keys, and written back only if a layer
        # drew (as the unrolled blocks mutate it only then: not in eval mode, nor at rate 0).
        graphdef, streams, layers = nnx.split(self.blocks, nnx.RngState, ...)
        drew = []

        def body(carry, layer):
            x, streams = carry
            before = jax.tree.leaves(streams)
            block = nnx.merge(graphdef, streams, layer)
            x = block(batch_sharded(x))
            streams = nnx.state(block, nnx.RngState)
            if any(a is not b for a, b in zip(before, jax.tree.leaves(streams),
                                               strict=True)):
                drew.append(True)
            return (x, streams), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        if pipeline.stages() > 1:
            return self._pipelined(body, streams, layers, x)
        (x, streams), _ = jax.lax.scan(body, (x, streams), layers)
        if drew:
            nnx.update(self.blocks, streams)
        return x

    def _pipelined(self, body, streams, layers, x):
        """The scanned blocks as pipeline stages over the mesh's `pipe` axis
        (`jaxtrain.sharding.pipeline.run`): each stage scans its slice of the layers."""
        if jax.tree.leaves(streams):
            raise JaxtrainError("pipeline parallelism (mesh pipe > 1) does not run blocks "
                                "that draw random numbers (a LoRA adapter's dropout)")

        def stage(stage_layers, x):
            return jax.lax.scan(body, (x, streams), stage_layers)[0][0]

        return pipeline.run(stage, layers, x)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token at sequence length `seq_len` (2 per multiply-add): every
        weight matmul incl. the output projection, plus attention scores and values over
        the full seq_len x seq_len matrix (as computed; causal masking does not skip work).
        `training` counts forward + backward = 3x forward (the 6N rule)."""
        c = self.config
        d, layers, v = c["d_model"], c["num_layers"], c["vocab_size"]
        per_layer = 4 * d * d + 2 * d * c["mlp_ratio"] * d  # q, k, v, out + up, down
        forward = 2 * (layers * per_layer + d * v) + layers * 4 * seq_len * d
        return float(3 * forward if training else forward)


def generate(model: GPT, prompt, max_new_tokens: int, rng, temperature: float = 1.0,
             top_k: int | None = None) -> np.ndarray:
    """Sample `max_new_tokens` tokens after `prompt` ((time,) or (batch, time) ints).

    Each new token is drawn from the model's distribution at the last position, over a
    window of the last `max_len` tokens; `temperature` 0 is greedy, `top_k` keeps the k
    most likely tokens. Returns prompt and continuation as a numpy array.
    """
    prompt = np.asarray(prompt, np.int32)
    single = prompt.ndim == 1
    prompt = prompt[None] if single else prompt
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise JaxtrainError(f"generate: prompt must be a non-empty (batch, time) array, got "
                            f"shape {prompt.shape}")
    batch, start = prompt.shape
    total = start + max_new_tokens
    window = min(model.max_len, total)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompt, rng):
        buf = jnp.zeros((batch, total), jnp.int32).at[:, :start].set(prompt)

        def body(i, carry):
            buf, rng = carry
            lo = jnp.maximum(i - window, 0)
            ctx = jax.lax.dynamic_slice(buf, (0, lo), (batch, window))
            net = nnx.merge(graphdef, state)
            net.remat = "none"  # recomputation only pays off when differentiating
            logits = jnp.take(net(ctx), i - 1 - lo, axis=1).astype(jnp.float32)
            rng, key = jax.random.split(rng)
            if temperature == 0:
                token = jnp.argmax(logits, -1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
                    logits = jnp.where(logits < kth, -jnp.inf, logits)
                token = jax.random.categorical(key, logits)
            buf = jax.lax.dynamic_update_slice(buf, token[:, None].astype(jnp.int32), (0, i))
            return buf, rng

        return jax.lax.fori_loop(start, total, body, (buf, rng))[0]

    out = np.asarray(run(state, prompt, rng))
    return out[0] if single else out
