"""Orbax save/restore of a TrainState, plain-Orbax readability, model checks, fine-tune load."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxtrain import transforms
from jaxtrain.checkpoint import Manager, check_same_model, model_signature
from jaxtrain.errors import JaxtrainError
from jaxtrain.finetune import load_pretrained
from jaxtrain.models import CNN
from jaxtrain.train import TrainState


def _state(seed=0, classes=5, channels=16):
    with nnx.use_eager_sharding(False):
        model = CNN(classes, channels=channels, rngs=nnx.Rngs(seed))
    state = TrainState.create(model, transforms.adam(1e-3), jax.random.PRNGKey(seed))
    return state, model_signature(model.config, state.params)


def test_roundtrip_is_exact(tmp_path):
    state, sig = _state()
    mngr = Manager(tmp_path / "ck")
    mngr.save(7, state, sig, metrics={"accuracy": 0.5})
    mngr.wait()
    fresh, _ = _state(seed=1)
    restored = mngr.restore(fresh, sig)
    jax.tree.map(np.testing.assert_array_equal, restored.saveable(), state.saveable())
    assert mngr.meta()["metrics"] == {"accuracy": 0.5}
    mngr.close()


def test_plain_orbax_restores_it(tmp_path):
    state, sig = _state()
    mngr = Manager(tmp_path)
    mngr.save(3, state, sig)
    mngr.close()
    raw = ocp.StandardCheckpointer().restore(tmp_path / "3" / "state")
    np.testing.assert_array_equal(raw["params"]["head"]["kernel"], state.params["head"]["kernel"])


def test_other_model_is_refused_and_nothing_touched(tmp_path):
    state, sig = _state()
    mngr = Manager(tmp_path)
    mngr.save(1, state, sig)
    mngr.close()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    other, other_sig = _state(channels=8)
    with pytest.raises(JaxtrainError, match="mis-shaped backbone/conv1/bias"):
        check_same_model(tmp_path, other_sig)
    with pytest.raises(JaxtrainError, match="another model"):
        Manager(tmp_path, read_only=True).restore(other, other_sig)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_missing_folder_and_step_are_named(tmp_path):
    with pytest.raises(JaxtrainError, match="does not exist"):
        Manager(tmp_path / "nope", read_only=True)
    assert not (tmp_path / "nope").exists()
    state, sig = _state()
    mngr = Manager(tmp_path)
    mngr.save(2, state, sig)
    with pytest.raises(JaxtrainError, match="no checkpoint at step 5.*steps: \\[2\\]"):
        mngr.restore(state, sig, step=5)


def test_load_pretrained_by_path_with_report(tmp_path):
    state, sig = _state(seed=0)
    mngr = Manager(tmp_path)
    mngr.save(1, state, sig)
    mngr.close()
    target, _ = _state(seed=1, classes=3)  # new head shape
    params, report = load_pretrained(target.params, tmp_path)
    np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"],
                                  state.params["backbone"]["conv1"]["kernel"])
    np.testing.assert_array_equal(params["head"]["kernel"], target.params["head"]["kernel"])
    assert report.new == ["head/bias", "head/kernel"]
    assert "shape" in report.skipped["head/kernel"]
    params, report = load_pretrained(target.params, tmp_path, exclude=["backbone/dense/*"])
    assert report.skipped["backbone/dense/kernel"] == "not selected"
    renamed, report = load_pretrained({"trunk": target.params["backbone"]}, tmp_path,
                                      mapping={"backbone/": "trunk/"})
    assert "trunk/conv1/kernel" in report.loaded
