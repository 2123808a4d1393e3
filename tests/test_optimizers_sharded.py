"""Muon, Shampoo and SOAP on params sharded with `fsdp` over 8 simulated devices (issue 20,
point 3): the same params as one device (1e-5); optimizer state sharded like the params
(per-device bytes within 1/8 + 10% of the whole, as benchmarks/sharding_memory.py counts
AdamW's); and whether the compiled update all-gathers whole matrices (read from its HLO).

Known and recorded as strict xfails (they fail the suite once fixed, so the mark gets
removed): all three gather whole matrices (Muon each (32, 128) kernel for Newton-Schulz;
Shampoo and SOAP (128, 128) statistics / bases), and Shampoo's and SOAP's per-dimension
statistics, bases and roots are replicated (`state_shardings` shards only the state leaves
shaped like a param), so their state is not 1/8 per device (Shampoo: 769,528 of 1,052,440 bytes per
device). Muon's state (momentum and the AdamW moments) is sharded like the params. SOAP
misses 1e-5 against one device (see SOAP_BASIS); Muon and Shampoo meet it."""

import re

import jax
import numpy as np
import optax
import pytest
from _sharding_models import build, train

from jaxtrain import sharding, transforms

# Blocks of 32 (the GPT's kernels are 32 x 32 to 32 x 128): 26 of them, stacked and padded
# to 32 so that each of the 8 devices holds and preconditions 4.
BLOCKS = dict(block_size=32, num_devices=8)
OPTIMIZERS = {
    "muon": lambda: transforms.muon(1e-2),
    "shampoo": lambda: transforms.shampoo(1e-3, precondition_every=2, **BLOCKS),
    "soap": lambda: transforms.soap(1e-3, precondition_frequency=2, eps=1e-6, **BLOCKS),
}
GATHERS = pytest.mark.xfail(strict=True, reason="gathers whole matrices for the preconditioner")
REPLICATED = pytest.mark.xfail(strict=True, reason="preconditioner state is replicated")
FSDP = dict(data=1, fsdp=8)
# SOAP rotates by the eigenvectors (eigh) of statistics of rank <= the steps taken: the basis
# inside their repeated (zero) eigenvalues is arbitrary, and 8 devices summing in another
# order pick another one. Measured after 3 steps: losses 1.1e-5 relative apart, params up to
# 1.4e-4 absolute (lr 1e-3), so SOAP misses 1e-5.
SOAP_BASIS = pytest.mark.xfail(strict=True, reason="degenerate eigenbasis differs (1.4e-4)")


def _state(name, devices):
    tx = OPTIMIZERS[name]() if name in OPTIMIZERS else optax.adamw(1e-3)
    state, axes = build("gpt", tx)
    mesh = sharding.make_mesh(**FSDP, devices=devices)
    return tx, state, sharding.state_shardings(state, mesh, "fsdp", axes), mesh


def largest_all_gather(hlo: str) -> int:
    """Elements of the largest all-gather result in compiled HLO text (0 if none)."""
    sizes = [int(np.prod([int(d) for d in m.group(1).split(",") if d]))
             for m in re.finditer(r"= \(?\w+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo)]
    return max(sizes, default=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["muon", "shampoo", "soap"])
def test_fsdp_matches_one_device(devices, name):
    tx = OPTIMIZERS[name]()
    one, losses1, _ = train("gpt", "dp", steps=3, tx=tx, devices=devices[:1])
    eight, losses8, _ = train("gpt", "fsdp", FSDP, steps=3, tx=tx)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(eight.params))
    for a, b in zip(jax.tree.leaves(jax.device_get(one.params)),
                    jax.tree.leaves(jax.device_get(eight.params)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "muon", "shampoo", "soap"])
def test_state_is_sharded_like_the_params(devices, name):
    _, state, shardings, _ = _state(name, devices)
    mine = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(state.opt_state),
                               jax.tree.leaves(shardings.opt_state), strict=True))
    full = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    assert mine <= full * (1 / 8 + 0.10), f"{name}: {mine} of {full} state bytes per device"


@pytest.mark.parametrize("name", ["adamw", "muon", "shampoo", "soap"])
def test_update_gathers_no_whole_matrix(devices, name):
    """The optimizer update alone (grads, state and params sharded in and out): no device
    all-gathers a tensor as large as a whole kernel (AdamW, elementwise, gathers nothing)."""
    tx, state, sh, mesh = _state(name, devices)
    update = jax.jit(tx.update, in_shardings=(sh.params, sh.opt_state, sh.params),
                     out_shardings=(sh.params, sh.opt_state))
    with jax.set_mesh(mesh):  # the transforms spread their blocks over the mesh in use
        hlo = update.lower(state.params, state.opt_state, state.params).compile().as_text()
    whole = min(x.size for x in jax.tree.leaves(state.params) if x.ndim == 2)
    assert largest_all_gather(hlo) < whole, f"{name} all-gathers whole matrices"
