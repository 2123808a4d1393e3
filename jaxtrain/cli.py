"""The `jaxtrain` command. Errors are printed as one line, without a traceback: a
`JaxtrainError` (bad input) exits with 2; any other exception is a fault jaxtrain did not
foresee, printed as one line asking for a report (exit 1; `JAXTRAIN_TRACEBACK=1` shows
the traceback)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import JaxtrainError


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line and exits with code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def key_values(text: str) -> dict:
    """`crop=2,rotate=10` as `{'crop': 2, 'rotate': 10}`, each value read as YAML."""
    import yaml

    pairs = [item.partition("=") for item in text.split(",")]
    if not text or any(not key or not eq for key, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE pairs separated by commas "
                                         f"(e.g. crop=2,rotate=10), got {text!r}")
    return {key.strip(): yaml.safe_load(value) for key, _, value in pairs}


def cmd_demo(args) -> int:
    from .demo import format_table, run_demo

    given = {k: getattr(args, k) for k in ("shots", "seeds", "finetune_steps", "augment")
             if getattr(args, k) is not None}  # else the demo's defaults
    summary = run_demo(out=args.out, seed=args.seed, steps=args.steps,
                       overwrite=args.overwrite, progress=not args.quiet, **given)
    print(format_table(summary))
    print(f"\n{summary['devices']} device(s); fine-tune load: {summary['finetune_load']}")
    print(f"wrote {args.out}/curves.png, {args.out}/confusion-*.png, {args.out}/log.jsonl, "
          f"{args.out}/results.json")
    return 0


def cmd_train(args) -> int:
    import json
    import signal

    from .train.config import load_config
    from .train.run import run_config

    if args.ray_workers is not None:
        return train_on_ray(args)
    cfg = load_config(args.config, args.overrides)
    report = start_processes(args, cfg)
    summary = run_config(cfg, resume=args.resume)
    sample = summary.pop("after_fit", None)
    if report:
        print(json.dumps(summary))
        if sample:
            print(sample)
    if summary["interrupted"]:
        if report:
            print(f"jaxtrain train: stopped by {summary['interrupted']} at step "
                  f"{summary['step']}; checkpoint saved, run the same command to resume",
                  file=sys.stderr)
        return 128 + signal.Signals[summary["interrupted"]].value
    return 0


def train_on_ray(args) -> int:
    """`jaxtrain train --ray-workers N`: the run on N Ray Train workers
    (`jaxtrain.train.ray_train`); prints the last metrics reported to Ray and the last
    checkpoint registered with it."""
    import json

    from .train.ray_train import train_on_ray as run

    given = [f for f in ("coordinator", "num_processes", "process_id")
             if getattr(args, f) is not None]
    if given:
        raise JaxtrainError(f"--ray-workers starts its own processes: leave out "
                            f"--{given[0].replace('_', '-')}")
    result = run(args.config, args.overrides, num_workers=args.ray_workers,
                 use_gpu=args.ray_gpu, max_failures=args.ray_max_failures,
                 resume=args.resume, coordinator_timeout=args.coordinator_timeout,
                 heartbeat_timeout=args.heartbeat_timeout)
    checkpoint = None if result.checkpoint is None else result.checkpoint.path
    print(json.dumps({"metrics": result.metrics, "checkpoint": checkpoint}))
    return 0


def start_processes(args, cfg) -> bool:
    """Join the other processes of a multi-process launch (`sharding.start_from_env`:
    the flags, else the launcher's variables) and then, on process 0, say in one line
    which launcher, how many processes and what global mesh. A mesh that does not fit the global
    devices, or a batch it cannot split evenly, is an error here, before anything is built.
    True on the process that reports."""
    from . import sharding
    from .config import to_dict

    launch = sharding.start_from_env(args.coordinator, args.num_processes, args.process_id,
                                     timeout=args.coordinator_timeout,
                                     heartbeat_timeout=args.heartbeat_timeout)
    args.multiprocess = launch is not None
    mesh = sharding.make_mesh(**to_dict(cfg.sharding.mesh))
    sharding.local_batch_rows(mesh, cfg.train.batch_size)
    if not sharding.is_main_process():
        return False
    if launch is not None:
        print(sharding.describe(launch, mesh), file=sys.stderr, flush=True)
    return True


def add_launch_flags(parser) -> None:
    """Flags that override what the launcher's environment says (see docs/scale-out.md)."""
    group = parser.add_argument_group("many processes (default: from the launcher's "
                                      "environment: SLURM, mpirun, torchrun, SkyPilot, TPU)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=positive_int, metavar="N",
                       help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    group.add_argument("--coordinator-timeout", type=positive_int, default=300, metavar="S",
                       help="seconds to wait for the coordinator (default: 300)")
    group.add_argument("--heartbeat-timeout", type=positive_int, default=100, metavar="S",
                       help="a process silent this long is declared dead and the others "
                            "are ended (default: 100, JAX's)")
    ray = parser.add_argument_group("on a Ray cluster (RAY_ADDRESS, else a local one; needs "
                                    "pip install 'jaxtrain[ray]')")
    ray.add_argument("--ray-workers", type=positive_int, metavar="N",
                     help="run as N Ray Train workers (a JaxTrainer), one process each")
    ray.add_argument("--ray-gpu", action="store_true", help="one GPU per Ray worker")
    ray.add_argument("--ray-max-failures", type=int, default=0, metavar="K",
                     help="restarts of the worker group after a failure, each resuming "
                          "from the last checkpoint (default: 0)")


def cmd_ckpt_ls(args) -> int:
    import json

    from .checkpoint import format_listing, list_checkpoints

    rows = list_checkpoints(args.dir)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_listing(rows))
    return 0


def cmd_finetune(args) -> int:
    import json

    from .finetune.run import load_finetune_config, run_finetune

    pretrained, *trailing = args.pretrained  # overrides may come after --from DIR
    if any("=" not in item for item in trailing):
        raise JaxtrainError(f"--from takes one folder, got {args.pretrained}")
    cfg = load_finetune_config(args.config, [*args.overrides, *trailing], pretrained)
    summary = run_finetune(cfg, resume=args.resume)
    print(json.dumps(summary))
    return 0 if summary["interrupted"] is None else 130


def cmd_bench(args) -> int:
    from .bench import run

    return 1 if run(args.names, args.dir, quick=args.quick, as_json=args.json) else 0


RESUME_HELP = ("continue the run saved in the output folder with its saved settings even "
               "where the config differs (without it a changed config is refused)")


def build_parser() -> Parser:
    parser = Parser(prog="jaxtrain", description="Functional training for JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    demo = sub.add_parser("demo", help="pretrain on digits 0-4, fine-tune on 5-9")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--steps", type=positive_int, default=300,
                      help="pretraining steps (default: 300)")
    demo.add_argument("--finetune-steps", type=positive_int,
                      help="steps of every fine-tune and scratch run (default: steps / 3)")
    demo.add_argument("--shots", type=positive_int,
                      help="labelled 5-9 examples per class to fine-tune on (default: 10)")
    demo.add_argument("--seeds", type=positive_int,
                      help="fine-tune runs per way, for mean and spread (default: 3)")
    demo.add_argument("--augment", type=key_values, metavar="KEY=VALUE,...",
                      help="augment the fine-tune images, e.g. crop=2,rotate=10 (keys: crop, "
                           "rotate, noise; docs/augmentation.md)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace an earlier run's checkpoint in --out")
    demo.add_argument("--quiet", action="store_true", help="no progress output")
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train from a YAML config (resumes from its "
                                          "checkpoints)")
    train.add_argument("config", help="the run's YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. train.steps=100 optimizer.learning_rate=1e-3")
    train.add_argument("--resume", action="store_true", help=RESUME_HELP)
    add_launch_flags(train)
    train.set_defaults(func=cmd_train)
    from .cli_config import add_command as add_config_command

    add_config_command(sub)
    from .cli_tune import add_commands

    add_commands(sub, positive_int)
    from .cli_data import add_commands as add_data_commands

    add_data_commands(sub, positive_int)
    bench = sub.add_parser("bench", help="run the benchmarks (optimizer, loop, sharding, "
                                          "checkpoint, sweep, mfu, conv, metrics, adamw, "
                                          "breakdown, data, scaling)")
    bench.add_argument("names", nargs="*", help="which to run (default: all)")
    bench.add_argument("--json", action="store_true", help="one JSON line per measurement")
    bench.add_argument("--quick", action="store_true", help="small sizes, a quick check")
    bench.add_argument("--dir", help="the benchmarks folder (default: ./benchmarks)")
    bench.set_defaults(func=cmd_bench)
    ckpt = sub.add_parser("ckpt", help="inspect checkpoint folders")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=Parser)
    ckpt_ls = ckpt_sub.add_parser("ls", help="steps with their metrics and sizes")
    ckpt_ls.add_argument("dir", help="a checkpoint folder")
    ckpt_ls.add_argument("--json", action="store_true", help="one JSON object per step")
    ckpt_ls.set_defaults(func=cmd_ckpt_ls)
    finetune = sub.add_parser("finetune", help="fine-tune from a pretrained checkpoint "
                                                "(config: a train config + `finetune:`)")
    finetune.add_argument("config", help="the run's YAML config (see configs/finetune_*.yaml)")
    finetune.add_argument("--from", dest="pretrained", required=True, nargs="+",
                          metavar="CKPT_DIR", help="the pretrained checkpoint folder "
                          "(key=value overrides may follow it)")
    finetune.add_argument("overrides", nargs="*", metavar="key=value",
                          help="config overrides, e.g. finetune.lora.rank=4 train.steps=100")
    finetune.add_argument("--resume", action="store_true", help=RESUME_HELP)
    finetune.set_defaults(func=cmd_finetune)
    return parser


def quiet_libraries() -> None:
    """Keep Orbax's and absl's informational chatter out of the user's terminal."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                    for e in extra):
        args.overrides = [*args.overrides, *extra]  # key=value given after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_libraries()
    try:
        code = args.func(args)
    except JaxtrainError as err:
        code = _failed(args, f"jaxtrain {args.command}: error: {err}", 2)
    except KeyboardInterrupt:
        code = _failed(args, f"jaxtrain {args.command}: interrupted", 130)
    except Exception as err:  # not a JaxtrainError: a fault jaxtrain did not foresee
        if os.environ.get("JAXTRAIN_TRACEBACK"):
            raise
        code = _failed(args, f"jaxtrain {args.command}: internal error: {_first_line(err)} "
                       "(please report it; JAXTRAIN_TRACEBACK=1 shows the traceback)", 1)
    return code


def _failed(args, message: str, code: int) -> int:
    """Print `message`; a process of a multi-process run then exits at once: JAX's exit
    hook would wait for the other processes, which may be gone or waiting on this one."""
    if getattr(args, "multiprocess", False):
        import jax

        print(f"{message} (process {jax.process_index()} of {jax.process_count()})",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    print(message, file=sys.stderr)
    return code


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


if __name__ == "__main__":
    sys.exit(main())
