"""A parameter server on Ray actors: one server actor holds the params and the state of
any Optax / jaxtrain transform and applies gradients as they arrive; 1-N worker actors
each pull the params, compute a gradient with jaxtrain's train step on their own share of
the data, and push it back.

- **data**: worker i of W owns the examples i, i+W, i+2W, ... of the training set; its
  k-th gradient is of `jaxtrain.data.batch_at(share_i, batch_size, seed, k)` (epochs of
  its share, reshuffled each epoch). The gradient is `make_train_step(loss_fn)`'s, run
  with an optimizer that only keeps the gradient, so precision policies and
  microbatches behave as in any jaxtrain run.
- **sync** (`mode="sync"`): every worker reads version v, the server waits for all live
  workers' gradients, applies their mean as one step, and the version becomes v + 1:
  data-parallel training with a global batch of W x batch_size (equal, to float
  tolerance, to the single-process step on the concatenated batches).
- **async** (`mode="async"`, `max_staleness=d`): each gradient is applied on its own as
  soon as the bound allows. Its staleness is the server's version when it is applied
  minus the version the worker read. The bound is kept by waiting, never by discarding
  work: every unapplied gradient has a deadline (read version + d); a worker may read
  only while fewer than d + 1 gradients are unapplied, and an arrived gradient is applied
  only if the others can still all meet their deadlines when applied in deadline order
  (earliest-deadline-first scheduling of unit jobs), so none is ever applied staler
  than d and the wait cannot deadlock. With d >= W - 1 workers of equal speed the bound
  rarely binds: each gradient is about W - 1 versions stale. d = 0 is serial SGD.
- **a dead worker** (its actor killed, its process gone): the driver sees its task fail,
  the server drops it, and training continues with the others. Lost: the gradient it
  was computing (or had computed but not yet delivered; one already received is still
  applied), and its share of the data, which no other worker takes over: from then on
  the run sees only the live workers' examples, each in its own order. In sync mode the
  step it died in averages the live workers' gradients only (a smaller batch). If every
  worker dies the run fails; the server itself is a single point of failure.

Model state (BatchNorm statistics) is not trained: the server keeps the initial one.
Transforms taking extra args get the gradient's loss as `value=` (the mean loss of a
sync step) and `grad=`; a line search needing `value_fn=` cannot run here (the server
holds no data). Ray is an optional dependency: `pip install "jaxtrain[ray]"`.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data import batch_at, eval_batches
from ..errors import JaxtrainError
from ..train.metrics import summarize_eval
from ..train.state import TrainState
from ..train.step import make_eval_step, make_train_step

MODES = ("sync", "async")


@dataclass
class ParamServerResult:
    """What a run did. `staleness`: of every applied gradient, in order (all 0 in sync
    mode); `evals`: `{version, examples, seconds, **metrics}` at every `eval_every`
    versions and at the end; `examples`: examples whose gradients were applied (gradient
    evaluations); `lost`: gradients computed but never applied (dead workers');
    `dropped`: `(worker, version)` for each worker that died."""

    state: TrainState
    mode: str
    max_staleness: int | None
    workers: int
    steps: int
    examples: int
    seconds: float
    staleness: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    lost: int = 0
    dropped: list = field(default_factory=list)

    def staleness_summary(self) -> dict:
        """Max, mean and counts of the observed staleness."""
        seen = self.staleness or [0]
        return {"max": max(seen), "mean": float(np.mean(seen)),
                "counts": dict(sorted(Counter(seen).items()))}


def _keep_gradient() -> optax.GradientTransformation:
    """A worker's optimizer: its state is the step's gradient; it changes no param."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _shares(data: dict, workers: int) -> list[dict]:
    return [{k: np.asarray(v)[i::workers] for k, v in data.items()} for i in range(workers)]


class Worker:
    """A worker actor: pulls params, computes a gradient, pushes it, until the server
    has applied enough (see the module doc)."""

    def pid(self) -> int:
        return os.getpid()

    def prepare(self, index: int, state: TrainState, job: dict) -> None:
        """Become worker `index` of a run from `state` (its params are replaced by the
        pulled ones) and compile the step on the first batch, before the run's clock."""
        keep = _keep_gradient()
        self.index, self.job = index, job
        self.state = state.replace(tx=keep, opt_state=keep.init(state.params),
                                   ema_params=None, rng=jax.random.fold_in(state.rng, index))
        self.step = jax.jit(make_train_step(job["loss_fn"], precision=job["precision"],
                                            microbatches=job["microbatches"]))
        self.step.lower(self.state, self._batch(0)).compile()

    def _batch(self, k: int) -> dict:
        return batch_at(self.job["share"], self.job["batch_size"], self.job["seed"], k)

    def run(self, server) -> int:
        """Pull, compute, push until the server needs no more gradients; returns the
        number of gradients computed."""
        import ray

        computed, size = 0, self.job["batch_size"]
        while (got := ray.get(server.pull.remote(self.index))) is not None:
            version, params = got
            state = self.state.replace(params=params, step=jnp.int32(version))
            new, metrics = self.step(state, self._batch(computed))
            grads, loss = jax.device_get((new.opt_state, metrics["loss"]))
            computed += 1
            ray.get(server.push.remote(self.index, version, grads, float(loss), size))
        return computed


class Server:
    """The server actor (asyncio: pulls and pushes wait on one condition; applying and
    evaluating run in its event loop, one at a time)."""

    def pid(self) -> int:
        return os.getpid()

    def start(self, state: TrainState, job: dict) -> None:
        """Begin a run from `state` (see `ParamServerPool.train` for `job`'s keys)."""
        self.state, self.mode, self.d = state, job["mode"], job["max_staleness"]
        self.total, self.live = job["steps"], set(range(job["workers"]))
        self.valid, self.eval_every = job["valid"], job["eval_every"]
        self.eval_batch_size = job["eval_batch_size"]
        self.reads: dict[int, int] = {}  # worker -> version read, gradient not yet applied
        self.sent: set[int] = set()  # async: workers whose gradient waits to be applied
        self.arrived: dict[int, tuple] = {}  # sync: worker -> (grads, loss, examples)
        self.version, self.examples = 0, 0
        self.staleness, self.evals, self.losses, self.lost, self.dropped = [], [], [], 0, []
        self.cond = asyncio.Condition()
        extra = isinstance(state.tx, optax.GradientTransformationExtraArgs)
        self.params = jax.device_get(state.params)
        # compiled before the clock starts: the apply, the sync mean, the evaluation
        self.apply = jax.jit(lambda s, g, v: s.apply_gradients(
            g, **({"value": v, "grad": g} if extra else {})), donate_argnums=0).lower(
            state, self.params, jnp.float32(0)).compile()
        self.mean = jax.jit(lambda trees: jax.tree.map(lambda *g: sum(g) / len(g), *trees))
        if self.mode == "sync":
            self.mean([self.params] * len(self.live))
        self.evaluate = None
        if self.valid is not None:
            self.evaluate = jax.jit(make_eval_step(job["metric_fn"]))
            self.metric_fn = job["metric_fn"]
        self.began = time.perf_counter()
        self._record_eval()
        self.began = time.perf_counter()  # the clock counts training only from here

    def version_now(self) -> int:
        return self.version

    async def pull(self, worker: int):
        """`(version, params)` to compute on, once the bound allows a read; None when
        the run needs no more gradients."""
        async with self.cond:
            await self.cond.wait_for(lambda: self._done() or self._may_read())
            if self._done() or worker not in self.live:
                return None
            self.reads[worker] = self.version
            return self.version, self.params

    async def push(self, worker: int, read: int, grads, loss: float, examples: int) -> None:
        """Deliver a gradient computed on version `read`; returns once it is applied."""
        async with self.cond:
            if self.mode == "sync":
                self.arrived[worker] = (grads, loss, examples)
                await self.cond.wait_for(lambda: self.version > read or self._step_ready())
                if self.version == read:
                    self._apply_sync()
            else:
                self.sent.add(worker)
                await self.cond.wait_for(lambda: self._may_apply(worker))
                self._apply(read, grads, loss, examples)
                self.sent.discard(worker)
                del self.reads[worker]
            self.cond.notify_all()

    async def drop(self, worker: int) -> None:
        """Forget a dead worker: its unsent gradient is lost (see the module doc)."""
        async with self.cond:
            self.live.discard(worker)
            self.dropped.append((worker, self.version))
            if worker in self.reads and worker not in self.sent | set(self.arrived):
                self.lost += 1
                del self.reads[worker]
            self.cond.notify_all()

    def result(self) -> dict:
        self._record_eval(final=True)
        return {"saved": jax.device_get(self.state.saveable()), "steps": self.version,
                "examples": self.examples, "seconds": time.perf_counter() - self.began,
                "staleness": self.staleness, "evals": self.evals, "losses": self.losses,
                "lost": self.lost, "dropped": self.dropped}

    # --- scheduling -------------------------------------------------------------
    def _done(self) -> bool:
        return self.version >= self.total or not self.live

    def _may_read(self) -> bool:
        if self.mode == "sync":
            return True  # every worker reads the current version; push is the barrier
        unapplied = len(self.reads)
        return unapplied <= self.d and self.version + unapplied < self.total

    def _may_apply(self, worker: int) -> bool:
        """EDF feasibility after applying `worker`'s gradient now: the k-th earliest of
        the others' deadlines must be >= version + k."""
        others = sorted(r + self.d for w, r in self.reads.items() if w != worker)
        return all(deadline >= self.version + k for k, deadline in enumerate(others, 1))

    def _step_ready(self) -> bool:
        return bool(self.arrived) and set(self.arrived) >= self.live

    # --- applying ---------------------------------------------------------------
    def _apply_sync(self) -> None:
        grads, losses, examples = zip(*self.arrived.values(), strict=True)
        for worker in self.arrived:
            self.reads.pop(worker, None)
        self.arrived = {}
        self._apply(self.version, self.mean(list(grads)), float(np.mean(losses)),
                    sum(examples))

    def _apply(self, read: int, grads, loss: float, examples: int) -> None:
        stale = self.version - read
        if self.mode == "async" and stale > self.d:  # the scheduler's invariant
            raise AssertionError(f"staleness {stale} > bound {self.d}")
        self.state = self.apply(self.state, grads, jnp.float32(loss))
        self.params = jax.device_get(self.state.params)
        self.version += 1
        self.examples += examples
        self.staleness.append(stale)
        self.losses.append(loss)
        if self.version % self.eval_every == 0:
            self._record_eval()

    def _record_eval(self, final: bool = False) -> None:
        if self.evaluate is None or (final and self.evals
                                     and self.evals[-1]["version"] == self.version):
            return
        totals: dict = {}
        for batch in eval_batches(self.valid, self.eval_batch_size):
            for k, v in jax.device_get(self.evaluate(self.state, batch)).items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        metrics, _ = summarize_eval(self.metric_fn, totals)
        self.evals.append({"version": self.version, "examples": self.examples,
                           "seconds": time.perf_counter() - self.began,
                           **{k: v for k, v in metrics.items() if math.isfinite(v)}})


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_run(workers: int, data: dict, *, steps: int, batch_size: int, mode: str = "sync",
              max_staleness: int | None = None, eval_every: int | None = None,
              valid: dict | None = None, metric_fn=None, **_) -> None:
    """Refuse, in one line, arguments of a run (`ParamServerPool.train`'s) that cannot
    work, before any actor starts."""
    if mode not in MODES:
        raise JaxtrainError(f"param server mode must be one of {', '.join(MODES)}, got "
                            f"{mode!r}")
    counts = {"workers": workers, "steps": steps, "batch_size": batch_size,
              "eval_every": steps if eval_every is None else eval_every}
    for name, value in counts.items():
        if not _is_int(value, 1):
            raise JaxtrainError(f"param server {name} must be a positive integer, got "
                                f"{value!r}")
    if mode == "async" and not _is_int(max_staleness, 0):
        raise JaxtrainError(f"param server max_staleness must be an integer >= 0 in mode "
                            f"'async', got {max_staleness!r}")
    if mode == "sync" and max_staleness not in (None, 0):
        raise JaxtrainError(f"param server max_staleness is for mode 'async' (sync steps "
                            f"have none), got {max_staleness!r}")
    if valid is not None and metric_fn is None:
        raise JaxtrainError("param server valid= needs a metric_fn= to evaluate")
    sizes = {k: len(v) for k, v in data.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise JaxtrainError(f"param server data must be a dict of arrays of one length, "
                            f"got lengths {sizes}")
    smallest = next(iter(sizes.values())) // workers
    if batch_size > smallest:
        raise JaxtrainError(f"param server batch_size {batch_size} exceeds the smallest "
                            f"worker's share ({smallest} examples of {workers} workers)")


class ParamServerPool:
    """A server actor and `workers` worker actors, kept for several runs (their processes
    start once: a few seconds each). A worker that died is replaced at the next run.
    `actor_options`: Ray's `.options(...)` for every actor (num_cpus, resources, ...)."""

    def __init__(self, workers: int, *, actor_options: dict | None = None):
        try:
            import ray
        except ImportError as err:
            raise JaxtrainError(f"the parameter server needs Ray ({err}): "
                                "pip install 'jaxtrain[ray]'") from None
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise JaxtrainError(f"param server workers must be a positive integer, got "
                                f"{workers!r}")
        if not ray.is_initialized():
            ray.init()
        self._options = dict(actor_options or {})
        self.server = ray.remote(Server).options(**self._options).remote()
        self.workers = [self._new_worker() for _ in range(workers)]
        self.pids = ray.get([w.pid.remote() for w in self.workers])

    def _new_worker(self):
        import ray

        return ray.remote(Worker).options(**self._options).remote()

    def replace_dead(self) -> None:
        """Start a new actor for the server and each worker whose process is gone."""
        import ray

        def alive(actor) -> bool:
            try:
                ray.get(actor.pid.remote())
                return True
            except ray.exceptions.RayActorError:
                return False

        if not alive(self.server):
            self.server = ray.remote(Server).options(**self._options).remote()
        for i, worker in enumerate(self.workers):
            if not alive(worker):
                self.workers[i] = self._new_worker()
                self.pids[i] = ray.get(self.workers[i].pid.remote())

    def train(self, state: TrainState, loss_fn, data: dict, *, steps: int,
              batch_size: int, mode: str = "sync", max_staleness: int | None = None,
              seed: int = 0, valid: dict | None = None, metric_fn=None,
              eval_every: int | None = None, eval_batch_size: int = 512,
              precision=None, microbatches: int = 1,
              timeout: float | None = None) -> ParamServerResult:
        """Train `state` (its `tx` runs on the server) for `steps` server versions with
        `loss_fn(model, batch, rng) -> (loss, aux)` on `data` (a dict of equal-length
        arrays, split over the workers; see the module doc). `valid` and `metric_fn`
        (per-example metrics, as `make_eval_step` takes): evaluated on the server every
        `eval_every` versions (default: only at the start and end). `timeout`: seconds
        before the run is abandoned with an error."""
        import ray

        workers = len(self.workers)
        check_run(workers, data, steps=steps, batch_size=batch_size, mode=mode,
                  max_staleness=max_staleness, eval_every=eval_every, valid=valid,
                  metric_fn=metric_fn)
        eval_every = steps if eval_every is None else eval_every
        self.replace_dead()
        job = {"mode": mode, "max_staleness": max_staleness, "steps": steps,
               "workers": workers, "valid": valid, "eval_every": eval_every,
               "metric_fn": metric_fn, "eval_batch_size": eval_batch_size}
        shared = ray.put(state)
        try:
            ray.get([self.workers[i].prepare.remote(i, shared, {
                "loss_fn": loss_fn, "share": share, "batch_size": batch_size, "seed": seed,
                "precision": precision, "microbatches": microbatches})
                for i, share in enumerate(_shares(data, workers))])
            ray.get(self.server.start.remote(shared, job))
            runs = {w.run.remote(self.server): i for i, w in enumerate(self.workers)}
            self._watch(runs, timeout)
        except BaseException:  # the actors may wait forever: stop them (replaced next run)
            self.shutdown()
            raise
        got = ray.get(self.server.result.remote())
        if got["steps"] < steps:
            raise JaxtrainError(f"param server: all {workers} workers died; the server "
                                f"reached version {got['steps']} of {steps}")
        return ParamServerResult(
            state=state.with_saved(got.pop("saved")), mode=mode, workers=workers,
            max_staleness=max_staleness if mode == "async" else 0, **got)

    def _watch(self, runs: dict, timeout: float | None) -> None:
        """Wait for every worker's run; drop each one that dies (see the module doc)."""
        import ray

        end = None if timeout is None else time.monotonic() + timeout
        pending = list(runs)
        while pending:
            left = None if end is None else max(0.0, end - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise JaxtrainError(f"param server: the run did not end within {timeout} s")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError:
                ray.get(self.server.drop.remote(runs[ready[0]]))

    def shutdown(self) -> None:
        """Kill the actors (a later `train` starts new ones)."""
        import ray

        for actor in [self.server, *self.workers]:
            ray.kill(actor)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def train_param_server(state: TrainState, loss_fn, data: dict, *, workers: int = 2,
                       actor_options: dict | None = None, **kwargs) -> ParamServerResult:
    """One run on a fresh `ParamServerPool` of `workers` (the Ray cluster `ray.init()`
    finds, unless this process already joined one); `kwargs` as `ParamServerPool.train`.
    Bad arguments are refused before Ray starts."""
    check_run(workers, data, **kwargs)
    with ParamServerPool(workers, actor_options=actor_options) as pool:
        return pool.train(state, loss_fn, data, **kwargs)


__all__ = ["MODES", "check_run", "ParamServerPool", "ParamServerResult", "Server", "Worker",
           "train_param_server"]
