"""jaxtrain against PyTorch on the same machine: (b) training steps per second and (c) time
to a held-out loss, for the models of `configs/digits_cnn.yaml` and `configs/char_gpt.yaml`.

jaxtrain's side is the `Trainer` that `jaxtrain train CONFIG` builds (the config's model,
data, optimizer, batch size, seed, precision, nan_policy and log_every; no checkpoints,
logs or progress bar, which the torch loop does not have either), driven by
`Trainer.fit`. The torch side is a plain loop over the same batches (`Batches`, the
Trainer's data order) with the twin models of `torch_twins.py`, into which jaxtrain's
initial params are copied: `zero_grad`, forward, cross-entropy, `backward`, the config's
global-norm clipping (`clip_grad_norm_`), the optimizer with `fused=True` (the fastest
torch variant in part a) at the learning rate the config's schedule gives that step, and
`loss.item()` at the config's log points. It runs eager and with the loss function
(model and cross-entropy, forward and backward) under `torch.compile`.

Before anything is timed, the first `--check` steps' losses of every side must agree with
jaxtrain's to float tolerance. (b) Sides alternate within one process, `--steps` steps
each per round; the median (min, max) steps per second over `--rounds` rounds after one
warm-up round, and jaxtrain's speed relative to the fastest torch side. (c) Each side
trains from the same init on the same batches in chunks of `--eval-every` steps; after
each chunk its held-out loss (mean nats per token over the first `--eval-examples`
validation sequences) is computed off the clock; the training wall time and steps until
it first reaches `--target` are reported.

    nice -n 0 python benchmarks/vs_torch_train.py --part b [--only cnn,gpt] [--rounds 7]
    nice -n 0 python benchmarks/vs_torch_train.py --part c [--target 2.3]
    nice -n 0 python benchmarks/vs_torch_train.py --part kernels --only gpt   # its parts
    nice -n 0 python benchmarks/vs_torch_train.py --part profile --only gpt   # XLA's thunks

Prints versions, thread counts and load averages, one JSON line per measurement, then a
table. OPENBLAS_NUM_THREADS is 1 unless set (FACTS.md: OpenBLAS's spinning threads).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402
from torch_twins import (  # noqa: E402
    TorchCNN,
    TorchGPT,
    cnn_state_dict,
    gpt_state_dict,
    load_params,
)

from jaxtrain.models import registry  # noqa: E402
from jaxtrain.train import Batches, LoggingConfig, Trainer, TrainerConfig, TrainState  # noqa: E402
from jaxtrain.train.config import load_config  # noqa: E402
from jaxtrain.train.run import data_and_model  # noqa: E402
from jaxtrain.train.tasks import get_task  # noqa: E402
from jaxtrain.transforms.schedules import SCHEDULES  # noqa: E402
from jaxtrain.transforms.spec import build as build_spec  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODELS = {"cnn": "digits_cnn", "gpt": "char_gpt"}
# steps per side per round in part b (a round of each takes ~1-3 s on a quiet 2-core CPU)
STEPS = {"cnn": 200, "gpt": 10}
# Idle time before each timed segment: torch's OpenMP threads spin on both cores for a
# while after its last parallel region, and XLA work started at once ran ~1.3x slower
# (vs_torch.py, --settle-ms; RESULTS.md).
SETTLE_S = 0.02


@dataclasses.dataclass
class Case:
    """One config's run, as both sides need it."""

    name: str
    cfg: object
    task: object
    data: dict
    model_name: str
    model_kwargs: dict
    params: dict  # jaxtrain's initial params, numpy

    def jax_model(self):
        return registry.build(self.model_name, self.cfg.seed, **self.model_kwargs)

    def batches(self) -> Batches:
        return Batches(self.data["train"], self.cfg.train.batch_size, self.cfg.seed)


def load_case(name: str) -> Case:
    cfg = load_config(CONFIGS / f"{MODELS[name]}.yaml")
    data, model_name, kwargs = data_and_model(cfg)
    model = registry.build(model_name, cfg.seed, **kwargs)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return Case(name, cfg, get_task(cfg.task), data, model_name, kwargs, params)


# -- jaxtrain's side ---------------------------------------------------------------------

def jax_trainer(case: Case) -> Trainer:
    """The Trainer `jaxtrain train` builds for the config (`run.config_trainer`), without
    checkpoints, log files, plots or progress bar."""
    cfg = case.cfg
    state = TrainState.create(case.jax_model(), build_spec(cfg.optimizer),
                              jax.random.PRNGKey(cfg.seed), ema_decay=cfg.train.ema_decay)
    config = TrainerConfig(train=cfg.train, sharding=cfg.sharding, seed=cfg.seed,
                           logging=LoggingConfig(progress=False, plots=False,
                                                 tensorboard=False),
                           monitor=case.task.monitor, mode=case.task.mode)
    return Trainer(state, case.task.loss_fn, config, metric_fn=case.task.metric_fn)


class JaxSide:
    def __init__(self, case: Case):
        self.trainer, self.data, self.step = jax_trainer(case), case.data["train"], 0
        loss_fn = case.task.loss_fn
        self._eval = jax.jit(lambda state, batch: loss_fn(state.model(train=False), batch,
                                                          None)[0])

    def run(self, steps: int) -> None:
        self.step += steps
        jax.block_until_ready(self.trainer.fit(self.data, self.step).params)

    def losses(self, steps: int) -> list[float]:
        """The training loss of each of the next `steps` steps (one `fit` per step: the
        last step of a fit is a log point)."""
        for _ in range(steps):
            self.run(1)
        return [v["loss"] for _, v in self.trainer.history[-steps:]]

    def held_out(self, batches: list[dict]) -> float:
        losses = [float(self._eval(self.trainer.state, b)) for b in batches]
        return float(np.mean(losses))


# -- torch's side ------------------------------------------------------------------------

def _cnn_loss(model, batch):
    return F.cross_entropy(model(batch["image"]), batch["label"])


def _gpt_loss(model, batch):
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def torch_model(case: Case) -> torch.nn.Module:
    if case.name == "cnn":
        kw = case.model_kwargs
        return load_params(TorchCNN(kw["num_classes"], kw["channels"], kw["features"]),
                           cnn_state_dict(case.params))
    kw = case.model_kwargs
    return load_params(TorchGPT(kw["vocab_size"], kw["d_model"], kw["num_layers"],
                                kw["num_heads"], kw.get("mlp_ratio", 4)),
                       gpt_state_dict(case.params))


def to_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)).long() if np.issubdtype(v.dtype, np.integer)
            else torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


def torch_optimizer(case: Case, params):
    """The config's optimizer in torch (what the two configs use: Adam, AdamW), fused,
    its learning rate schedule as a function of the step, and the clipping norm."""
    spec = case.cfg.optimizer
    opt = spec["optimizer"]
    opt = {"name": opt} if isinstance(opt, str) else dict(opt)
    name = opt.pop("name")
    lr = spec["learning_rate"]
    if isinstance(lr, dict):
        lr = dict(lr)
        schedule = SCHEDULES[lr.pop("schedule")](**lr)
        lr_at = lambda step: float(schedule(step))  # noqa: E731
    else:
        lr_at = lambda step: float(lr)  # noqa: E731
    betas = (opt.pop("b1", 0.9), opt.pop("b2", 0.999))
    if opt:
        raise SystemExit(f"{case.name}: optimizer options {opt} not mapped to torch")
    if name == "adam" and "weight_decay" not in spec:
        make = torch.optim.Adam(params, lr=lr_at(0), betas=betas, eps=1e-8, fused=True)
    elif name == "adamw" and isinstance(spec.get("weight_decay", 0.0), float):
        make = torch.optim.AdamW(params, lr=lr_at(0), betas=betas, eps=1e-8,
                                 weight_decay=spec.get("weight_decay", 1e-4), fused=True)
    else:
        raise SystemExit(f"{case.name}: optimizer {name} with {spec} not mapped to torch")
    return make, lr_at, spec.get("clip_global_norm")


class TorchSide:
    """A plain torch loop; `threads` is set with `torch.set_num_threads` before each run."""

    def __init__(self, case: Case, compiled: bool, threads: int):
        self.threads = threads
        self.model = torch_model(case)
        self.params = list(self.model.parameters())
        self.opt, self.lr_at, self.clip = torch_optimizer(case, self.params)
        loss = _cnn_loss if case.name == "cnn" else _gpt_loss
        self.loss = torch.compile(loss) if compiled else loss
        self.batches, self.step = case.batches(), 0
        self.log_every = case.cfg.train.log_every

    def _one(self, batch) -> torch.Tensor:
        torch.set_num_threads(self.threads)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model, batch)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        self.step += 1
        return loss

    def run(self, steps: int) -> None:
        for _ in range(steps):
            loss = self._one(to_torch(self.batches.get(self.step, 1)))
            if self.step % self.log_every == 0:
                loss.item()

    def losses(self, steps: int) -> list[float]:
        return [float(self._one(to_torch(self.batches.get(self.step, 1))).item())
                for _ in range(steps)]

    def held_out(self, batches: list[dict]) -> float:
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            losses = [float(_gpt_loss(self.model, to_torch(b)) if "tokens" in b
                            else _cnn_loss(self.model, to_torch(b))) for b in batches]
        return float(np.mean(losses))


# -- the runs ----------------------------------------------------------------------------

def make_sides(case: Case, names, threads: int) -> dict:
    """`names`: jaxtrain, torch eager, torch compiled; a torch side may name its thread
    count after an @ (`torch eager@1`), else it runs with `threads`."""
    sides, seconds = {}, {}
    for name in names:
        t0 = time.perf_counter()
        kind, _, count = name.partition("@")
        if kind not in ("jaxtrain", "torch eager", "torch compiled"):
            raise SystemExit(f"--sides: unknown side {name!r} (valid: jaxtrain, torch eager, "
                             "torch compiled, a torch side with @THREADS)")
        if kind == "jaxtrain":
            sides[name] = JaxSide(case)
        else:
            sides[name] = TorchSide(case, kind == "torch compiled", int(count or threads))
        seconds[name] = time.perf_counter() - t0
    return sides, seconds


def check_losses(case: Case, sides: dict, steps: int) -> dict:
    """The first `steps` training losses of every side (each includes its compilation),
    which must agree with jaxtrain's: within 1e-4 relative, 2e-4 at the last steps (Adam's
    first steps amplify float32 rounding of tiny second moments)."""
    losses, first_seconds = {}, {}
    for name, side in sides.items():
        t0 = time.perf_counter()
        losses[name] = side.losses(steps)
        first_seconds[name] = time.perf_counter() - t0
    ours = np.asarray(losses["jaxtrain"])
    for name, values in losses.items():
        err = np.max(np.abs(np.asarray(values) - ours) / np.abs(ours))
        if not err <= 2e-4:
            raise SystemExit(f"{case.name} {name}: losses {values} differ from jaxtrain's "
                             f"{ours.tolist()} by {err:.2e} relative")
    return {"losses": {k: [round(v, 6) for v in vs] for k, vs in losses.items()},
            "first_steps_s": {k: round(v, 2) for k, v in first_seconds.items()}}


def part_b(case: Case, sides: dict, rounds: int, steps: int) -> list[dict]:
    times = {name: [] for name in sides}
    loads = []
    for r in range(rounds + 1):
        for name, side in sides.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            side.run(steps)
            if r:
                times[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    rates = {name: [steps / t for t in ts] for name, ts in times.items()}
    best_torch = max(statistics.median(v) for k, v in rates.items() if k != "jaxtrain")
    rows = [{"bench": "vs_torch_train", "model": case.name, "side": name, "steps": steps,
             "rounds": rounds, "median_steps_per_s": round(statistics.median(v), 2),
             "min": round(min(v), 2), "max": round(max(v), 2)} for name, v in rates.items()]
    rows.append({"bench": "vs_torch_train", "model": case.name,
                 "side": "jaxtrain / fastest torch",
                 "ratio": round(statistics.median(rates["jaxtrain"]) / best_torch, 3),
                 "load_average_1min": [round(x, 1) for x in (min(loads), max(loads))]})
    return rows


def held_out_batches(case: Case, examples: int) -> list[dict]:
    valid = {k: np.asarray(v[:examples]) for k, v in case.data["valid"].items()}
    size = case.cfg.train.eval_batch_size
    return [{k: v[i:i + size] for k, v in valid.items()} for i in range(0, examples, size)]


def part_c(case: Case, sides: dict, target: float, every: int, examples: int,
           max_steps: int, checked_s: dict) -> list[dict]:
    """Train each side, one chunk of `every` steps in turn, until its held-out loss
    reaches `target`; the chunks alternate between sides while both still train. Steps
    count from the start (the checked steps included); the clock runs from the first step
    (`checked_s`: the checked steps' time), compilation included, evaluation excluded."""
    held = held_out_batches(case, examples)
    clock = dict(checked_s)
    reached: dict = {}
    curve = {name: [] for name in sides}
    step = min(side.step for side in sides.values())  # after the checked steps
    while len(reached) < len(sides) and step < max_steps:
        step += every
        for name, side in sides.items():
            if name in reached:
                continue
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            side.run(step - side.step)
            clock[name] += time.perf_counter() - t0
            loss = side.held_out(held)
            curve[name].append((step, round(loss, 4)))
            if loss <= target:
                reached[name] = (step, clock[name], os.getloadavg()[0])
        print(json.dumps({"bench": "vs_torch_time_to_loss", "model": case.name, "step": step,
                          "held_out": {k: v[-1][1] for k, v in curve.items()},
                          "train_s": {k: round(v, 1) for k, v in clock.items()}}),
              flush=True)
    rows = []
    for name in sides:
        steps, seconds, load = reached.get(name, (None, clock[name], os.getloadavg()[0]))
        rows.append({"bench": "vs_torch_time_to_loss", "model": case.name, "side": name,
                     "target": target, "steps": steps, "train_s": round(seconds, 2),
                     "reached": name in reached, "load_average_1min": round(load, 1)})
    return rows


def part_kernels(case: Case, rounds: int, threads: list[int]) -> list[dict]:
    """The char GPT step's building blocks alone, jax (jitted) against torch, alternating:
    each matmul shape of a block's forward and the LM head at the config's batch x seq
    rows and its weight gradient (dW = x^T dy), causal attention forward + backward (XLA's
    `dot_product_attention` against `F.scaled_dot_product_attention`), and the whole
    model's loss, forward only and forward + backward (no optimizer). What each
    framework's kernels cost bounds what its whole step can reach."""
    kw, train = case.model_kwargs, case.cfg.train
    rows_n = train.batch_size * case.cfg.data["seq_len"]
    d, heads = kw["d_model"], kw["num_heads"]
    hidden = kw.get("mlp_ratio", 4) * d
    rng = np.random.default_rng(0)
    matmul = jax.jit(lambda a, b: a @ b)
    weight_grad = jax.jit(lambda a, b: a.T @ b)  # the backward's dW = x^T dy
    shapes = {"qkv": (d, 3 * d), "out": (d, d), "up": (d, hidden), "down": (hidden, d),
              "lm_head": (d, kw["vocab_size"])}
    cases = {}
    for name, (k, n) in shapes.items():
        a = rng.standard_normal((rows_n, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        cases[f"matmul {name} {rows_n}x{k}x{n}"] = (
            lambda ja=ja, jb=jb: matmul(ja, jb).block_until_ready(), lambda ta=ta, tb=tb: ta @ tb)
        dy = rng.standard_normal((rows_n, n), dtype=np.float32)
        jdy, tdy = jnp.asarray(dy), torch.from_numpy(dy)
        cases[f"dW {name} {k}x{rows_n}x{n}"] = (
            lambda ja=ja, jdy=jdy: weight_grad(ja, jdy).block_until_ready(),
            lambda ta=ta, tdy=tdy: ta.T @ tdy)
    q = rng.standard_normal((train.batch_size, case.cfg.data["seq_len"], heads, d // heads),
                            dtype=np.float32)
    jq = jnp.asarray(q)
    tq = torch.from_numpy(q.transpose(0, 2, 1, 3).copy()).requires_grad_()
    attention = jax.jit(jax.grad(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla").sum(), argnums=(0, 1, 2)))

    def torch_attention():
        F.scaled_dot_product_attention(tq, tq, tq, is_causal=True).sum().backward()

    cases["attention fwd+bwd"] = (lambda: jax.block_until_ready(attention(jq, jq, jq)),
                                  torch_attention)
    # the whole model: forward (loss) and forward + backward (loss and gradients)
    graphdef, params, rest = nnx.split(case.jax_model(), nnx.Param, ...)
    loss_fn = case.task.loss_fn
    loss = lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b, None)[0]  # noqa: E731
    forward, backward = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    batch = case.batches().get(0, 1)
    jbatch, tbatch, twin = jax.device_put(batch), to_torch(batch), torch_model(case)

    def torch_forward():
        with torch.no_grad():
            _gpt_loss(twin, tbatch)

    cases["model forward"] = (lambda: forward(params, jbatch).block_until_ready(),
                              torch_forward)
    cases["model forward+backward"] = (
        lambda: jax.block_until_ready(backward(params, jbatch)),
        lambda: _gpt_loss(twin, tbatch).backward())
    out = []
    for name, (ours, theirs) in cases.items():
        sides = {"jax": ours, **{f"torch@{t}": theirs for t in threads}}
        times = {side: [] for side in sides}
        for r in range(rounds + 1):
            for side, fn in sides.items():
                if side.startswith("torch@"):
                    torch.set_num_threads(int(side[6:]))
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                if r:
                    times[side].append((time.perf_counter() - t0) / 5)
        out.append({"bench": "vs_torch_kernels", "model": case.name, "kernel": name,
                    **{f"{side}_ms": round(1e3 * statistics.median(ts), 3)
                       for side, ts in times.items()},
                    "load_average_1min": round(os.getloadavg()[0], 1)})
    return out


def part_profile(case: Case, calls: int = 3, top: int = 12) -> list[dict]:
    """Where the jitted forward + backward of the model's loss spends its time: XLA:CPU's
    thunks (fusions, matmuls) by total time per call, read from a `jax.profiler` trace,
    each with its output shape and the op it came from (from the optimized HLO)."""
    import collections
    import glob
    import gzip
    import re
    import tempfile

    graphdef, params, rest = nnx.split(case.jax_model(), nnx.Param, ...)
    loss_fn = case.task.loss_fn
    backward = jax.jit(jax.value_and_grad(
        lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b, None)[0]))
    batch = jax.device_put(case.batches().get(0, 1))
    hlo = backward.lower(params, batch).compile().as_text()
    for _ in range(2):
        jax.block_until_ready(backward(params, batch))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(backward(params, batch))
        trace = sorted(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True))[-1]
        with gzip.open(trace) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and re.search(r"(fusion|dot|copy|convolution)",
                                                           e["name"]):
            total[e["name"]] += e["dur"]
    rows = []
    for name, us in total.most_common(top):
        line = re.search("%" + re.escape(name) + r' = (\S+) .*?op_name="([^"]*)"', hlo)
        rows.append({"bench": "vs_torch_profile", "model": case.name, "thunk": name,
                     "ms_per_call": round(us / calls / 1e3, 2),
                     "shape": line.group(1) if line else "",
                     "op": line.group(2) if line else ""})
    return rows


def environment() -> dict:
    return {"bench": "vs_torch_train", "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "optax": optax.__version__, "flax": flax.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "jax_devices": str(jax.devices()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("b", "c", "kernels", "profile"), default="b")
    parser.add_argument("--only", default="cnn,gpt", help="comma-separated: cnn, gpt")
    parser.add_argument("--sides", default="jaxtrain,torch eager,torch compiled")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=0, help="per side per round (default: "
                        f"{STEPS})")
    parser.add_argument("--check", type=int, default=5, help="steps whose losses must agree")
    parser.add_argument("--target", type=float, default=2.3, help="part c: held-out nats")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(environment()), flush=True)
    names = [s.strip() for s in args.sides.split(",")]
    rows = []
    for model in [m for m in args.only.split(",") if m]:
        if model not in MODELS:
            parser.error(f"--only: unknown model {model!r} (valid: {', '.join(MODELS)})")
        if args.part == "c" and model != "gpt":
            parser.error("--part c runs the char GPT only (--only gpt)")
        case = load_case(model)
        if args.part == "kernels":
            if model != "gpt":
                parser.error("--part kernels measures the char GPT's kernels (--only gpt)")
            for row in part_kernels(case, args.rounds, sorted({1, args.threads})):
                print(json.dumps(row), flush=True)
            continue
        if args.part == "profile":
            for row in part_profile(case):
                print(json.dumps(row), flush=True)
            continue
        sides, build_s = make_sides(case, names, args.threads)
        check = check_losses(case, sides, args.check)
        print(json.dumps({"bench": "vs_torch_check", "model": model, **check,
                          "build_s": {k: round(v, 2) for k, v in build_s.items()}}), flush=True)
        if args.part == "b":
            new = part_b(case, sides, args.rounds, args.steps or STEPS[model])
        else:
            new = part_c(case, sides, args.target, args.eval_every, args.eval_examples,
                         args.max_steps, check["first_steps_s"])
        for row in new:
            print(json.dumps(row), flush=True)
        rows += new
    print(f"\n# load average at the end: {os.getloadavg()}")
    for r in rows:
        print(" ".join(f"{k}={v}" for k, v in r.items() if k != "bench"))


if __name__ == "__main__":
    main()
