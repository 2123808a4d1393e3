"""`Trainer(...).fit(train_data, steps)`: the loop long runs can trust.

The hot path only dispatches compiled calls and puts the next batch on the devices;
calls that reach a log point return metrics, which are copied to the host asynchronously
and read once computed (the others skip the metric work). The data order is a pure
function of (seed, position) and the position is part of the state, so a run resumed from
a checkpoint continues bit for bit. SIGTERM and SIGINT save a checkpoint and end `fit`
cleanly (`trainer.interrupted` names the signal).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import sharding
from ..checkpoint import model_signature
from ..config import checked, to_dict
from ..data import eval_batches
from ..errors import JaxtrainError
from ..transforms.paths import path_list
from .adapters import NnxAdapter
from .callbacks import Checkpointer, EarlyStopping, better, check_mode, crossed
from .config import TrainerConfig
from .feeds import Batches, DeviceFeed, HostFeed, fits_on_devices
from .metrics import summarize_eval
from .precision import LossScale, get_policy
from .run_logs import RunLogs
from .signals import StopSignals
from .state import param_logical_axes
from .step import make_eval_step, make_train_step
from .tracking import make_trackers

# Log points whose metrics may wait to be read before the loop blocks on the oldest (a
# bound on memory when the devices fall far behind; XLA's own queue is shorter on CPU).
MAX_PENDING_LOGS = 64
# Under nan_policy='skip', a run stops once this many steps in a row were skipped (counted
# over whole log intervals in which every step was skipped): it is no longer training.
MAX_SKIPPED_IN_A_ROW = 10


class NonFiniteError(JaxtrainError):
    """A step produced a non-finite loss or gradient under `nan_policy='raise'`."""


class Trainer:
    """Train a `TrainState` with `loss_fn(model_or_params, batch, rng) -> (loss, aux)`, as
    `config` (a `TrainerConfig`: the train, sharding, checkpoint, early stopping and logging
    sections of a run config, and the monitored metric) says.

    `metric_fn(model, batch) -> per-example values` is evaluated on `eval_data`;
    `config.monitor`/`mode` name the held-out metric "best" refers to. `callbacks` run
    between compiled calls (an `EarlyStopping` among them takes the place of
    `config.early_stopping`). The state is placed on `mesh` (default: the one
    `config.sharding.mesh` describes over all devices) by the sharding preset and, for an
    NNX model, its params' logical axis annotations (see
    `jaxtrain.sharding.state_shardings`). Checkpoints go to
    `config.checkpoint.dir` (a folder that already holds checkpoints is resumed from its
    latest); logs (JSONL, TensorBoard, `curves.png`) to `config.log_dir`, and to the
    experiment trackers `config.logging` selects (`jaxtrain.train.tracking`: MLflow,
    Weights & Biases) and any given as `trackers`, one tracker run per `fit` named after
    `log_dir`.

    Launched as several processes (SLURM, mpirun, torchrun, a TPU pod...), call
    `jaxtrain.sharding.start_from_env()` before creating any array; the Trainer refuses to
    run when its launcher says there are several processes but none was joined. Then each
    process feeds its own rows of every batch, all take part in checkpoint saves, and only
    process 0 writes logs, plots and progress.

    `train_step`: a prebuilt `(state, batch) -> (state, metrics)` step (a strategy's, such
    as `jaxtrain.strategies.make_dp_train_step`) instead of `make_train_step(loss_fn, ...)`;
    `train.precision` then only sets the params' dtype; `train.microbatches` is unused;
    `train.nan_policy` is the step's own (the Trainer reads the record a step following
    `apply_nan_policy` leaves, as the DP step does).
    """

    def __init__(self, state, loss_fn, config: TrainerConfig | None = None, *,
                 metric_fn=None, callbacks=(), mesh=None, trackers=(), train_step=None):
        config = checked(config if config is not None else TrainerConfig())
        sharding.check_started()
        self.config, train, ckpt = config, config.train, config.checkpoint
        if train.compilation_cache is not None:
            sharding.use_compilation_cache(train.compilation_cache)
        self.policy = get_policy(train.precision)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(
            **to_dict(config.sharding.mesh))
        self.loss_fn, self.metric_fn = loss_fn, metric_fn
        self.batch_size, self.seed = train.batch_size, config.seed
        self.steps_per_call, self.log_every = train.steps_per_call, train.log_every
        self.monitor, self.mode = config.monitor, check_mode(config.mode)
        self.run, self.progress = config.run, config.logging.progress
        self.plots, self.tensorboard = config.logging.plots, config.logging.tensorboard
        self.trackers = [*make_trackers(config.logging), *trackers]
        self.eval_batch_size, self.handle_signals = train.eval_batch_size, config.handle_signals
        self.device_data, self._device_feed = train.device_data, None
        self._shown_batch = None
        self.log_dir = None if config.log_dir is None else Path(config.log_dir)
        self.run_config = config.run_config or {}
        self.data_identity: dict | None = None  # of fit's train_data
        self.signature = model_signature(config.model_config or {}, state.params)
        self.early_stopping, callbacks = _early_stopping(config, callbacks)
        self.checkpointer = None if ckpt.dir is None else Checkpointer(
            ckpt.dir, ckpt.every, ckpt.best, ckpt.at_end, ckpt.max_to_keep, ckpt.async_,
            monitor=self.monitor, mode=self.mode)
        # the checkpointer last: a checkpoint taken at an evaluation records the decisions
        # of early stopping and of the other callbacks (and the state one returned)
        self.callbacks = [c for c in (self.early_stopping, *callbacks, self.checkpointer)
                          if c is not None]
        self.rules, self.logical_axes = config.sharding.preset, _logical_axes(state)
        self._nan_raise = train.nan_policy == "raise"
        self._nan_skip = train.nan_policy == "skip"
        self.pipeline_microbatches = _pipeline_microbatches(config, self.mesh, state,
                                                            self.logical_axes)
        step_fn = train_step or make_train_step(loss_fn, precision=self.policy,
                                                microbatches=train.microbatches,
                                                nan_policy=train.nan_policy)
        step_fn = sharding.pipeline.with_schedule(step_fn, self.pipeline_microbatches,
                                                  config.sharding.pipeline.repeats)
        self.state = self._prepare(state)
        self.step_fn = step_fn
        self._compile(step_fn, metric_fn, config.eval_ema)
        self.history: list[tuple[int, dict]] = []
        self.eval_history: list[tuple[int, dict]] = []
        self.interrupted: str | None = None
        self.stop_reason: str | None = None
        self.last_train: dict | None = None  # the last logged training metrics
        self.last_eval: dict | None = None
        self.last_eval_arrays: dict = {}  # per-class values, confusion matrix
        self.last_eval_step: int | None = None
        self.improved, self.best = False, None
        self.step = int(self.state.step)

    # -- set-up --------------------------------------------------------------------------

    def _prepare(self, state):
        """Apply the precision policy to a fresh state and place it on the mesh."""
        dtype = jnp.dtype(self.policy.param_dtype)
        floats = [x for x in jax.tree.leaves(state.params) if jnp.issubdtype(x.dtype,
                                                                             jnp.floating)]
        if floats and floats[0].dtype != dtype:
            if int(state.step) != 0:
                raise JaxtrainError(f"precision wants {dtype.name} params but the state, at "
                                    f"step {int(state.step)}, holds {floats[0].dtype.name}")
            params = jax.tree.map(
                lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                state.params)
            state = state.replace(params=params, opt_state=state.tx.init(params))
        if self.policy.needs_loss_scale and state.loss_scale is None:
            state = state.replace(loss_scale=LossScale.create())
        self.state_shardings = sharding.state_shardings(state, self.mesh, self.rules,
                                                         self.logical_axes)
        # A copy: placing may reuse the caller's buffers, which the donated steps consume.
        return sharding.place(jax.tree.map(jnp.copy, state), self.state_shardings)

    def _compile(self, step_fn, metric_fn, eval_ema: bool):
        self.host_calls = HostFeed.compile(step_fn, self.mesh, self.state_shardings,
                                           self.steps_per_call)
        self.eval_fn = None
        if metric_fn is not None:
            self.eval_fn = sharding.compile_eval(
                sharding.pipeline.with_schedule(
                    make_eval_step(metric_fn, precision=self.policy, use_ema=eval_ema),
                    self.pipeline_microbatches, self.config.sharding.pipeline.repeats),
                self.mesh, self.state_shardings)

    # -- the loop ------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Ask the loop to end after the current call (callbacks use this)."""
        self.stop_reason = reason

    def fit(self, train_data, steps: int, eval_data=None, eval_every: int | None = None):
        """Train until the state's step reaches `steps` and return the final state.

        `steps` is a total, as in `jaxtrain.train.fit`: a run resumed from a checkpoint at
        step 300 with `steps=500` takes 200 more steps, ending where an uninterrupted run
        would (one already at or past `steps` takes none)."""
        if not isinstance(steps, int) or steps < 1:
            raise JaxtrainError(f"steps must be a positive integer, got {steps!r}")
        if eval_data is not None and self.eval_fn is None:
            raise JaxtrainError("eval_data needs a metric_fn")
        feed = self._feed(train_data)
        # prepared records say what they are: recorded with checkpoints, checked on resume
        self.data_identity = getattr(train_data, "identity", None)
        state = self.state
        self.state = None  # donated below: only the returned state is valid
        self.stop_reason, self.interrupted = None, None
        if self.checkpointer is not None:
            restored = self.checkpointer.restore_latest(state, self)
            state = restored if restored is not None else state
        step, position = int(state.step), int(state.data_position)
        self.step, self.start_step = step, step
        self._skipped, self._skipped_at, self._in_a_row = int(state.nonfinite[2]), step, 0
        self._open_logs(steps)
        for cb in self.callbacks:
            cb.on_fit_start(self, state)
        self._signals = StopSignals(self.handle_signals)
        self._signals.install()
        try:
            state = self._loop(state, feed, step, position, steps, eval_data, eval_every)
            for cb in self.callbacks:  # the final checkpoint, before the logs are closed
                cb.on_fit_end(self, state)
        except BaseException:
            if self.checkpointer is not None:
                self.checkpointer.close()
            self._finish_trackers("failed")
            raise
        finally:
            self._signals.restore()
            self._close_logs()
        self._finish_trackers("killed" if self.interrupted else "finished")
        if self.early_stopping is not None and self.early_stopping.restore_best:
            state = self.early_stopping.restore(state)
        self.state = state
        return state

    def _feed(self, train_data):
        """A `DeviceFeed` for a small dict data set (kept across `fit` calls with the same
        data), else a `HostFeed`."""
        batches = Batches(train_data, self.batch_size, self.seed)
        # examples per step, for the progress bar (a `position -> batch` function sets it)
        self._shown_batch = getattr(batches, "batch_size", None)
        if not fits_on_devices(batches, self.steps_per_call, self.device_data):
            return HostFeed(batches, self.mesh, self.host_calls)
        key = (id(train_data), self.batch_size, self.seed)
        if self._device_feed is None or self._device_feed[0] != key:
            self._device_feed = (key, DeviceFeed(batches, self.mesh, self.step_fn,
                                                 self.state_shardings, self.steps_per_call))
        return self._device_feed[1]

    def _count(self, step: int, steps: int) -> int:
        return self.steps_per_call if steps - step >= self.steps_per_call else 1

    def _loop(self, state, feed, step, position, steps, eval_data, eval_every):
        count = self._count(step, steps)
        args = feed.args(position, count) if step < steps else None
        in_flight = sharding.InFlight(self.mesh)
        while step < steps and self.stop_reason is None:
            log = crossed(step, step + count, self.log_every) or step + count == steps
            state, metrics = self._call(feed.fn(count), state, args, feed, position)
            in_flight.add(metrics)
            before, step, position = step, step + count, position + count
            self.step = step
            if step < steps:  # prefetch: the host prepares the next batch meanwhile
                count = self._count(step, steps)
                args = feed.args(position, count)
            if log:
                self._log(step, metrics)
            if eval_data is not None and (crossed(before, step, eval_every) or step == steps):
                state = self._evaluate(state, eval_data, step)
            for cb in self.callbacks:
                cb.on_step_end(self, before, step, state)
            # several processes agree at log steps (all reach them) to stop at the same one
            stop = self._signals.agreed(log)
            if stop is not None:
                self.interrupted = stop
                break
            if self.stop_reason is not None:
                break
        self._drain()
        return state

    def _call(self, fn, state, args, feed, position):
        """One compiled call. The first call of each kind traces the loss on a batch: an
        error there comes from the model, the loss and the data not fitting together (a
        batch key the loss reads but the data lacks, images too small for the model), so
        it is reported in one line with the batch's keys and shapes."""
        try:
            return fn(state, *args)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            if isinstance(err, JaxtrainError):
                raise
            try:
                shapes = _describe(feed.batches.share(position))
            except Exception:  # the batch itself cannot be built: the error says why
                shapes = "?"
            raise JaxtrainError(
                f"the model and loss cannot run on the training batches ({shapes}): "
                f"{type(err).__name__}: "
                f"{(str(err).strip().splitlines() or [''])[0][:300]}") from err

    # -- what a checkpoint keeps besides the state ----------------------------------------

    def resume_record(self) -> tuple[dict, dict | None]:
        """The loop's progress a checkpoint keeps (best held-out value, last logged training
        metrics, last evaluation with its per-class arrays, early stopping's progress) as
        JSON, and early stopping's best weights. A run resumed or rerun from it reports
        and draws what the run it continues had (a rerun of a finished run lost the
        summary's train metrics and confusion matrix)."""
        record = {"best": self.best, "last_train": self.last_train, "last_eval": self.last_eval,
                  "last_eval_step": self.last_eval_step,
                  "last_eval_arrays": {k: v.tolist() for k, v in self.last_eval_arrays.items()}}
        arrays = None
        if self.early_stopping is not None:
            record["early_stopping"], arrays = self.early_stopping.record()
        return record, arrays

    def load_resume_record(self, record: dict, arrays: dict | None) -> None:
        """Continue from a checkpoint's `resume_record()`; stop at once if early stopping
        had already decided to."""
        self.best, self.last_eval = record.get("best"), record.get("last_eval")
        self.last_train, self.last_eval_step = record.get("last_train"), record.get(
            "last_eval_step")
        self.last_eval_arrays = {k: np.asarray(v) for k, v in
                                 (record.get("last_eval_arrays") or {}).items()}
        es = self.early_stopping
        if es is not None and record.get("early_stopping") is not None:
            es.load(record["early_stopping"], arrays)
            if es.exhausted():
                self.stop(es.reason())

    # -- metrics -------------------------------------------------------------------------

    def flush_logs(self) -> None:
        """Write every pending log record (blocks until their steps are computed)."""
        self._drain()

    def _log(self, step: int, metrics: dict) -> None:
        for leaf in jax.tree.leaves(metrics):
            leaf.copy_to_host_async()
        self._pending.append((step, metrics, time.perf_counter()))
        self._drain(wait=False)

    def _drain(self, wait: bool = True) -> None:
        """Read the metrics copied to the host at earlier log points (and raise on a
        non-finite step). `wait=False` reads only those already computed, oldest first,
        unless more than `MAX_PENDING_LOGS` wait: blocking on them stalls the dispatch of
        the next steps (on CPU a blocked read costs ~0.7 ms; benchmarks/loop_overhead.py)."""
        while self._pending:
            step, metrics, stamp = self._pending[0]
            if not wait and len(self._pending) <= MAX_PENDING_LOGS and not all(
                    leaf.is_ready() for leaf in jax.tree.leaves(metrics)):
                return
            self._pending.pop(0)
            values = jax.device_get(metrics)
            record = values.pop("nonfinite", None)
            self._raise_if_nonfinite(record)
            values = {k: float(v) for k, v in values.items()}
            if self._nan_skip and record is not None:
                values["skipped_steps"] = float(self._skipped_by(step, record))
            elapsed = stamp - self._last_stamp
            if elapsed > 0:
                values["steps_per_second"] = (step - self._last_step) / elapsed
            self._last_step, self._last_stamp = step, stamp
            self.history.append((step, values))
            self.last_train = values
            self._write(self.run, step, values)
            self.logs.progress(step, _shown(values, self._shown_batch))
            for cb in self.callbacks:
                cb.on_log(self, step, values)

    def _skipped_by(self, step: int, record) -> int:
        """Under nan_policy='skip': the count of skipped steps by `step`; warns when it
        grew since the last log point and stops the run (`NonFiniteError`) after
        `MAX_SKIPPED_IN_A_ROW` in a row."""
        count = int(record[2])
        new, interval = count - self._skipped, step - self._skipped_at
        self._skipped, self._skipped_at = count, step
        if new <= 0:
            self._in_a_row = 0
            return count
        self._in_a_row = self._in_a_row + new if new == interval else 0
        warnings.warn(f"nan_policy='skip': {new} of the {interval} step(s) to step {step} had "
                      f"non-finite values and were skipped ({count} in all)", stacklevel=2)
        if self._in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteError(f"nan_policy='skip': the last {self._in_a_row} steps were "
                                 f"all skipped; {self._nonfinite_message(record)}")
        return count

    def check_finite(self, state) -> None:
        """Raise `NonFiniteError` if, under nan_policy='raise', `state` has seen a
        non-finite step (reads one small array from the devices)."""
        if self._nan_raise:
            self._raise_if_nonfinite(jax.device_get(state.nonfinite))

    def _raise_if_nonfinite(self, record) -> None:
        if self._nan_raise and record is not None and record[0] >= 0:
            raise NonFiniteError(self._nonfinite_message(record))

    def _nonfinite_message(self, record) -> str:
        first_step, leaf, count = (int(x) for x in record)
        paths = path_list(self._params_like)
        n = len(paths)
        if leaf == 0:
            what = "the loss"
        elif leaf <= n:
            what = f"gradient {paths[leaf - 1]}"
        elif leaf <= 2 * n:
            what = f"updated param {paths[leaf - 1 - n]}"
        else:
            what = "the gradient norm (its sum of squares overflowed float32; each gradient " \
                   "is finite)"
        return (f"non-finite value at step {first_step}: first non-finite is {what} "
                f"({count} bad step(s) by step {self.step}; no checkpoint was written from "
                "that step on; nan_policy='skip' skips such steps instead)")

    def _evaluate(self, state, data, step: int):
        """Evaluate `state` on `data`, report, run the callbacks' `on_eval`; the state to
        continue from (a callback may return a new one)."""
        totals: dict = {}
        multiple = sharding.batch_parallelism(self.mesh)
        if sharding.pipeline.stages(self.mesh) > 1:  # padded to whole microbatches too
            multiple *= self.pipeline_microbatches
        for batch in eval_batches(data, self.eval_batch_size, multiple_of=multiple):
            sums = self.eval_fn(state, sharding.shard_global_batch(batch, self.mesh))
            for k, v in jax.device_get(sums).items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        metrics, self.last_eval_arrays = summarize_eval(self.metric_fn, totals)
        self.last_eval, self.last_eval_step = metrics, step
        value = metrics.get(self.monitor)
        self.improved = value is not None and better(value, self.best, self.mode)
        if self.improved:
            self.best = value
        self.eval_history.append((step, metrics))
        self._write(f"{self.run}/eval", step, metrics)
        for cb in self.callbacks:
            state = cb.on_eval(self, step, metrics, state) or state
        return state

    # -- logs and signals ----------------------------------------------------------------

    def _open_logs(self, steps: int) -> None:
        self._pending, self._last_step, self._last_stamp = [], self.step, time.perf_counter()
        self._params_like = self.state_shardings.params
        main = sharding.is_main_process()  # logs are written once, by process 0
        self.logs = RunLogs(self.log_dir, self.run, self.step, steps,
                            tensorboard=self.tensorboard, plots=self.plots,
                            progress=self.progress, main=main)
        self._tracking = []
        if main:
            self._start_trackers()

    def _start_trackers(self) -> None:
        """Start a tracker run each (named after the log folder); if one cannot start,
        the ones already started are ended as failed and the logs closed."""
        name = self.log_dir.name if self.log_dir is not None else self.run
        for tracker in self.trackers:
            try:
                tracker.start(name, self.run_config, self.log_dir)
            except BaseException:
                self._finish_trackers("failed")
                self._close_logs()
                raise
            self._tracking.append(tracker)

    def _finish_trackers(self, outcome: str) -> None:
        """End the tracker runs with the final checkpoint's path and how the fit ended
        (after a failure, a tracker that cannot end its run only warns: the fit's own error
        is the one to see)."""
        latest = None if self.checkpointer is None else self.checkpointer.latest
        while self._tracking:
            tracker = self._tracking.pop(0)
            try:
                tracker.finish(None if latest is None else str(latest), outcome)
            except Exception as err:
                if outcome != "failed":
                    raise
                warnings.warn(f"could not end the {type(tracker).__name__} run: "
                              f"{type(err).__name__}: {err}", stacklevel=2)

    def _write(self, run: str, step: int, values: dict) -> None:
        self.logs.write(run, step, values)
        for tracker in self._tracking:
            tracker.log(run, step, values)

    def _close_logs(self) -> None:
        self.logs.close(self.last_eval_arrays.get("confusion"),
                        f"{self.run}: step {self.last_eval_step}")


def _describe(batch) -> str:
    """`key: shape dtype` of each array of a batch."""
    if not isinstance(batch, dict):
        return type(batch).__name__
    return ", ".join(f"{k}: {tuple(getattr(v, 'shape', ()))} {getattr(v, 'dtype', '')}"
                     for k, v in batch.items())


def _shown(values: dict, batch_size: int | None) -> dict:
    """What the progress bar shows: loss, learning rate, throughput."""
    shown = {k: values[k] for k in ("loss", "learning_rate") if k in values}
    if "steps_per_second" in values:
        rate = values["steps_per_second"]
        shown["it/s"] = rate
        if batch_size:
            shown["ex/s"] = rate * batch_size
    return shown


def _early_stopping(config: TrainerConfig, callbacks) -> tuple:
    """The run's early stopping (the config's section, or an `EarlyStopping` among
    `callbacks`: one or the other) and the other callbacks."""
    given = [c for c in callbacks if isinstance(c, EarlyStopping)]
    others = [c for c in callbacks if not isinstance(c, EarlyStopping)]
    if config.early_stopping is not None:
        given.append(EarlyStopping(**to_dict(config.early_stopping)))
    if len(given) > 1:
        raise JaxtrainError("one early stopping per Trainer: give config.early_stopping or "
                            "an EarlyStopping callback, not both")
    return (given[0] if given else None), others


def _pipeline_microbatches(config: TrainerConfig, mesh, state, logical_axes) -> int:
    """The pipeline microbatch count (`sharding.pipeline.microbatches`, default the stage
    count), once the model's layers, the batch and the mesh are checked to fit it."""
    train = config.train
    batch, what = train.batch_size, "train.batch_size"
    if train.microbatches > 1 and batch % train.microbatches == 0:
        batch, what = batch // train.microbatches, "train.batch_size / train.microbatches"
    return sharding.pipeline.check_pipeline(
        mesh, sharding.pipeline.stacked_layers(state.params, logical_axes), batch,
        config.sharding.pipeline.microbatches, what, config.sharding.pipeline.repeats)


def _logical_axes(state):
    """The logical axis names of the params of an NNX model's state (its annotations,
    which the sharding rules map to mesh axes); None for a Linen module or an apply
    function (the rules' fallback places those)."""
    if not isinstance(state.adapter, NnxAdapter):
        return None
    with nnx.use_eager_sharding(False):
        return param_logical_axes(state.model(train=False))
