"""Pipeline parallelism over the mesh's `pipe` axis (`jaxtrain.sharding.pipeline`): the
GPipe schedule against a numpy loop, the pipelined GPT's loss and gradients against the
unpipelined model's, composed with data, fsdp and tensor axes; a run from a config whose
checkpoint restores under other pipe sizes; the refusals, before anything compiles."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain import sharding
from jaxtrain.checkpoint import CheckpointConfig, Manager
from jaxtrain.data import batch_at
from jaxtrain.errors import JaxtrainError
from jaxtrain.models import GPT, logical_axes
from jaxtrain.sharding import pipeline
from jaxtrain.sharding.config import MeshConfig, PipelineConfig, ShardingConfig
from jaxtrain.train import TrainConfig, Trainer, TrainerConfig, TrainState
from jaxtrain.train.config import LoggingConfig
from jaxtrain.train.language_model import lm_loss, lm_metrics

GPT_KW = dict(vocab_size=32, d_model=16, num_layers=4, num_heads=2, mlp_ratio=2, max_len=16,
              scan_layers=True)
SEQ, BATCH = 16, 16
LR = 0.5  # plain SGD: a step's update is the gradient times LR


def _gpt(seed=0, **kw):
    with nnx.use_eager_sharding(False):
        return GPT(**{**GPT_KW, **kw}, rngs=nnx.Rngs(seed))


def _tokens(seed=1):
    return jax.random.randint(jax.random.key(seed), (BATCH, SEQ + 1), 0, GPT_KW["vocab_size"])


def _loss(graphdef):
    def loss(params, tokens):
        return lm_loss(nnx.merge(graphdef, params), {"tokens": tokens}, None)[0]
    return loss


def _placed(tree, mesh, specs):
    return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                             is_leaf=lambda x: isinstance(x, PartitionSpec)))


def test_schedules_apply_every_layer_in_order_to_every_microbatch(devices):
    """A toy stack of 8 layers x -> tanh(x * w_l + b_l) on 4 stages x 2 data replicas:
    GPipe with 4 microbatches, circular (2 rounds of 1-layer chunks) with 4 and 8: equal to
    the plain numpy loop over the layers (so each example went through every layer once,
    in order, and came back to its own row); gradients equal the unpipelined scan's."""
    rng = np.random.default_rng(0)
    layers = {"w": rng.normal(size=(8, 3)).astype(np.float32),
              "b": rng.normal(size=(8, 3)).astype(np.float32)}
    x = rng.normal(size=(16, 3)).astype(np.float32)
    want = x
    for w, b in zip(layers["w"], layers["b"], strict=True):
        want = np.tanh(want * w + b)

    def stage(stage_layers, x):
        return jax.lax.scan(lambda x, k: (jnp.tanh(x * k["w"] + k["b"]), None), x,
                            stage_layers)[0]

    def objective(layers, x):
        out = pipeline.run(stage, layers, x)
        return jnp.sum(out ** 2), out

    mesh = sharding.make_mesh(pipe=4, data=2)
    placed = _placed(layers, mesh, {"w": PartitionSpec("pipe"), "b": PartitionSpec("pipe")})
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    unpiped = jax.grad(objective, has_aux=True)(layers, x)[0]  # no mesh: one call, all layers
    for count, repeats in ((4, 1), (4, 2), (8, 2)):
        with pipeline.schedule(count, repeats):
            run = jax.jit(sharding.under_mesh(jax.grad(objective, has_aux=True), mesh))
            grads, out = run(placed, xs)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
        for name in layers:
            np.testing.assert_allclose(grads[name], unpiped[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference():
    """The unpipelined GPT (one device, no mesh): its graph, params, their logical axes,
    its jitted `(params, tokens) -> (loss, grads)` and that on `_tokens()`."""
    graphdef, params = nnx.split(_gpt(), nnx.Param)
    axes, params = logical_axes(params), nnx.to_pure_dict(params)
    value_and_grad = jax.jit(jax.value_and_grad(_loss(graphdef)))
    return graphdef, params, axes, value_and_grad, value_and_grad(params, _tokens())


@pytest.mark.slow
@pytest.mark.parametrize("mesh_kw,preset,remat,repeats", [
    (dict(pipe=2, fsdp=2, tensor=2), "fsdp+tp", "none", 1),
    (dict(pipe=4, fsdp=2), "fsdp", "full", 1),
    (dict(pipe=2, data=4), "dp", "none", 2),
])
def test_pipelined_gpt_loss_and_gradients_equal_the_unpipelined(reference, mesh_kw, preset,
                                                                  remat, repeats):
    """4 layers on pipe stages with fsdp (and tensor) axes, each block recomputed in the
    backward pass or not, GPipe or circular (2 rounds): loss and every gradient within
    1e-5 of the unpipelined model's (no remat); under GPipe the layers' gradients stay
    split over `pipe`; the activations move between stages by collective permutes."""
    _, params, axes, _, (want_loss, want_grads) = reference
    graphdef = nnx.graphdef(_gpt(remat=remat))
    mesh = sharding.make_mesh(**mesh_kw)
    specs = sharding.param_specs(params, mesh, preset, axes)
    assert specs["blocks"]["mlp"]["up"]["kernel"][0] == "pipe"
    placed = _placed(params, mesh, specs)
    tokens = jax.device_put(_tokens(), sharding.batch_sharding(mesh))
    with pipeline.schedule(4, repeats):
        step = jax.jit(sharding.under_mesh(jax.value_and_grad(_loss(graphdef)), mesh))
        compiled = step.lower(placed, tokens).compile()
    loss, grads = compiled(placed, tokens)
    assert abs(float(loss) - float(want_loss)) < 1e-5
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(g, _at(want_grads, path), atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    if repeats == 1:  # circular: the layers move to their stages and back each step
        assert grads["blocks"]["mlp"]["up"]["kernel"].sharding.spec[0] == "pipe"
    assert re.search(r"collective-permute(-start)?\(", compiled.as_text())


def test_a_run_from_a_config_pipelines_and_its_checkpoint_restores_under_pipe_2_and_1(
        reference, tmp_path):
    """`sharding.mesh: {pipe: 4, data: 2}` with 4 pipeline microbatches trains the GPT
    through the Trainer: its first loss, and the gradient its first SGD step applied, are
    the unpipelined model's on that batch (to 1e-5); its held-out loss too; the checkpoint
    it writes holds the unpipelined param tree and restores onto meshes with pipe 2 and 1,
    every array equal."""
    _, params, _, value_and_grad, _ = reference
    model = _gpt()
    data = {"tokens": np.asarray(jax.random.randint(jax.random.key(3), (64, SEQ + 1), 0,
                                                    GPT_KW["vocab_size"]))}
    config = TrainerConfig(
        train=TrainConfig(batch_size=BATCH, steps=2, log_every=1, device_data=False,
                          nan_policy="none"),
        sharding=ShardingConfig(mesh=MeshConfig(pipe=4, data=2),
                                pipeline=PipelineConfig(microbatches=4)),
        checkpoint=CheckpointConfig(dir=str(tmp_path), async_=False),
        logging=LoggingConfig(progress=False), handle_signals=False)
    state = TrainState.create(model, optax.sgd(LR), jax.random.key(0))
    trainer = Trainer(state, lm_loss, config, metric_fn=lm_metrics)
    assert dict(trainer.mesh.shape) == {"pipe": 4, "data": 2, "fsdp": 1, "tensor": 1}
    trainer.fit(data, 1)
    want_loss, want_grads = value_and_grad(params, batch_at(data, BATCH, 0, 0)["tokens"])
    assert abs(trainer.history[0][1]["loss"] - float(want_loss)) < 1e-5
    applied = jax.tree.map(lambda a, b: (a - b) / LR, params,
                           jax.device_get(trainer.state.params))
    for path, g in jax.tree_util.tree_leaves_with_path(applied):
        np.testing.assert_allclose(g, _at(want_grads, path), atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    valid = {"tokens": data["tokens"][:BATCH]}
    trainer.fit(data, 2, eval_data=valid)
    held_out = value_and_grad(jax.device_get(trainer.state.params), valid["tokens"])[0]
    assert abs(trainer.last_eval["loss"] - float(held_out)) < 1e-5
    saved = Manager(tmp_path, read_only=True)
    assert saved.saved_shapes(2)["params/blocks/mlp/up/kernel"] == [4, 16, 32]
    final = jax.device_get(trainer.state.saveable())
    for pipe in (2, 1):
        mesh = sharding.make_mesh(pipe=pipe, data=8 // pipe)
        fresh = TrainState.create(_gpt(seed=5), optax.sgd(LR), jax.random.key(5))
        axes = logical_axes(nnx.state(_gpt(), nnx.Param))
        shardings = sharding.state_shardings(fresh, mesh, "dp", axes)
        like = sharding.place(fresh, shardings)
        restored = saved.restore(like)
        kernel = restored.params["blocks"]["mlp"]["up"]["kernel"]
        assert kernel.sharding.spec[0] == "pipe"
        assert kernel.sharding.mesh.shape["pipe"] == pipe
        for got, w in zip(jax.tree.leaves(restored.saveable()), jax.tree.leaves(final),
                          strict=True):
            np.testing.assert_array_equal(_plain(got), _plain(w))


def _at(tree, path):
    """The leaf of `tree` at key path `path`."""
    return dict(jax.tree_util.tree_leaves_with_path(tree))[path]


def _plain(x):
    """An array's values (a PRNG key's data)."""
    keys = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(x) if keys else x)


@pytest.mark.parametrize("mesh_kw,model_kw,train_kw,pipeline_kw,message", [
    (dict(pipe=4, data=2), dict(num_layers=6), {}, {},
     "the model's 6 layers do not split into 4 equal stages"),
    (dict(pipe=4, data=2), {}, dict(batch_size=12), dict(microbatches=4),
     "train.batch_size=12 is not divisible by sharding.pipeline.microbatches=4 x data "
     "parallelism 2 (data x fsdp) = 8"),
    (dict(pipe=2, data=4), {}, dict(batch_size=16, microbatches=2), dict(microbatches=4),
     "train.batch_size / train.microbatches=8 is not divisible by"),
    (dict(pipe=4, data=2), dict(scan_layers=False), {}, {},
     "sharding.mesh.pipe=4 needs a model whose layers are stacked"),
    (dict(pipe=2, data=4), {}, {}, dict(microbatches=2, repeats=4),
     "the model's 4 layers do not split into 2 equal stages x sharding.pipeline.repeats=4"),
    (dict(pipe=4, data=2), dict(num_layers=8), {}, dict(microbatches=2, repeats=2),
     "sharding.pipeline.repeats=2 (circular) needs sharding.pipeline.microbatches >= the 4 "
     "stages, got 2"),
])
def test_what_does_not_fit_the_pipeline_is_refused_in_one_line_before_compiling(
        mesh_kw, model_kw, train_kw, pipeline_kw, message):
    config = TrainerConfig(
        train=TrainConfig(**{"batch_size": BATCH, **train_kw}),
        sharding=ShardingConfig(mesh=MeshConfig(**mesh_kw),
                                pipeline=PipelineConfig(**pipeline_kw)),
        logging=LoggingConfig(progress=False), handle_signals=False)
    state = TrainState.create(_gpt(**model_kw), optax.sgd(0.1), jax.random.key(0))
    with pytest.raises(JaxtrainError) as err:
        Trainer(state, lm_loss, config)
    assert message in str(err.value) and "\n" not in str(err.value)
