"""The benchmark harness: runs scripts, tags JSON lines, records the environment."""

import io
import json

import pytest

from jaxtrain.bench import BENCHMARKS, find_benchmarks, run
from jaxtrain.errors import JaxtrainError


def test_every_benchmark_script_exists():
    folder = find_benchmarks()
    for script, _ in BENCHMARKS.values():
        assert (folder / script).is_file(), script


def test_unknown_benchmark_is_named():
    with pytest.raises(JaxtrainError, match="unknown benchmark 'nope'.*valid: optimizer"):
        run(["nope"])


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(JaxtrainError, match="no benchmarks folder"):
        find_benchmarks(tmp_path)


@pytest.mark.slow
def test_quick_mfu_run_gives_tagged_json(tmp_path):
    out = io.StringIO()
    assert run(["mfu"], quick=True, as_json=True, out=out) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    import jax
    import optax

    env = records[0]
    assert env["bench"] == "environment"
    assert (env["jax"], env["optax"]) == (jax.__version__, optax.__version__)
    assert env["device_count"] == len(jax.devices())
    sides = [r["side"] for r in records[1:]]
    assert sorted(sides) == ["bare loop", "jaxtrain dp", "jaxtrain fsdp"]  # 1 rep each
    for r in records[1:]:
        assert r["benchmark"] == "mfu" and r["tokens_per_s"] > 0
        # a utilization: of the peak FLOP rate, so above 0 and below 1 (a wrong FLOP
        # count or peak would show here)
        assert 0 < r["mfu"] < 1, r
