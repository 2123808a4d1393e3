"""The char GPT's final loss with Adam's moments stored in float32, bfloat16 and 8 bits.

Runs `configs/char_gpt.yaml` shortened to `--steps` (the warmup-cosine schedule ends at
that step, so every run is annealed; its warm-up is 50 steps or a third of the run), for
each storage option and seed, in one process. Prints one JSON line per run, then a table:
mean and spread (max - min) over the seeds of the final validation loss (nats per byte,
whole validation split) and of the last logged training loss, and each option's mean
minus float32's.

    python benchmarks/state_precision_loss.py [--steps 150 --seeds 0 1 2]

Options (config overrides; the moments are always computed in float32):
  float32          AdamW as configured (8 bytes of moments per param)
  mu,nu bf16 SR    optimizer.optimizer.{mu,nu}_dtype=bfloat16: stochastic rounding
  mu,nu bf16 RN    optimizer.state_dtype=bfloat16: the same storage, rounded to nearest
  8-bit            optimizer.optimizer.name=adamw_8bit (blockwise, bitsandbytes' scheme)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from jaxtrain.cli import quiet_libraries
from jaxtrain.train.config import load_config
from jaxtrain.train.run import run_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "char_gpt.yaml"
OPTIONS = {
    "float32": [],
    "mu,nu bf16 SR": ["optimizer.optimizer.mu_dtype=bfloat16",
                      "optimizer.optimizer.nu_dtype=bfloat16"],
    "mu,nu bf16 RN": ["optimizer.state_dtype=bfloat16"],
    "8-bit": ["optimizer.optimizer.name=adamw_8bit"],
}


def run(option: str, seed: int, steps: int, out: str) -> dict:
    overrides = [f"seed={seed}", f"out={out}", f"train.steps={steps}",
                 f"train.eval_every={steps}", f"train.log_every={steps}",
                 f"optimizer.learning_rate.total_steps={steps}",
                 f"optimizer.learning_rate.warmup_steps={min(50, steps // 3)}",
                 f"checkpoint.every={steps}", "logging.plots=false",
                 "logging.progress=false", *OPTIONS[option]]
    summary = run_config(load_config(CONFIG, overrides))
    return {"option": option, "seed": seed, "steps": summary["step"],
            "valid_loss": round(float(summary["eval"]["loss"]), 4),
            "train_loss": round(float(summary["train"]["loss"]), 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    args = ap.parse_args()
    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for option in args.options:
                row = run(option, seed, args.steps, f"{tmp}/{option}-{seed}".replace(" ", "_"))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| option | valid loss mean | spread | train loss mean | spread | "
          f"valid mean - float32 |  ({args.steps} steps, seeds {args.seeds})")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for option in args.options:
        valid = [r["valid_loss"] for r in rows if r["option"] == option]
        train = [r["train_loss"] for r in rows if r["option"] == option]
        mean = statistics.mean(valid)
        base = mean if base is None else base
        print(f"| {option} | {mean:.4f} | {max(valid) - min(valid):.4f} | "
              f"{statistics.mean(train):.4f} | {max(train) - min(train):.4f} | "
              f"{mean - base:+.4f} |")


if __name__ == "__main__":
    main()
