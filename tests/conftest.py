"""Test setup: 8 simulated CPU devices, compiled for speed (`_multiprocess.xla_flags`), and
one compilation cache for the session (the processes the tests start share it: many tests
compile the same small programs), set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile

from _multiprocess import xla_flags  # imports no JAX

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LAPACK calls (eigh, solve, svd) go to scipy's OpenBLAS, whose threads spin while they
# wait: 8 simulated devices each running one on 2 cores took an eigh from 0.2 s to 15 s.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxtrain-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    """The 8 simulated CPU devices."""
    found = jax.devices()
    assert len(found) == 8, f"expected 8 simulated devices, got {len(found)}"
    return found
