"""Prepared records read with Grain: is the loader ever the bottleneck?

Cases (one JSON line per measurement, then a short table):

- `format`: random 1025-token windows (uint16) from a flat `.npy` token array (what
  `jaxtrain data prepare` writes), read with `os.pread` as the loader reads it
  (`jaxtrain.data.records`), against ArrayRecord with one window per record (read singly
  and 64 at a time); why the token store is a flat array.
- `loader`: the Grain loader alone (`jaxtrain.data.records.Loader`): tokens/s of GPT
  windows (batch 64 x seq 1024) and images/s of 8x8 digit images (batch 256), with 0
  and N worker processes.
- `trainer`: `Trainer.fit` steps/s with the file loader against the in-memory data for
  the char GPT (configs/char_gpt.yaml's model, batch 16 x 128) and the digits CNN (batch
  64), same process, alternating, median ratio over repetitions. The in-memory side runs
  both ways the Trainer feeds a dict: kept on the devices (its default for small sets)
  and put on the devices each step from the host.
- `memory`: peak RSS of `jaxtrain train` on a prepared byte-level token set of
  `--memory-gb` GB (generated in a temp dir, prepared, trained on for a few steps, deleted),
  measured by `/usr/bin/time -v` ("Maximum resident set size"); the preparation's too.

    python benchmarks/data_throughput.py [--only format,loader,trainer,memory] [--reps 5]
        [--steps 50] [--models gpt,cnn] [--workers 2] [--memory-gb 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def bench_format(reps: int) -> list[dict]:
    from array_record.python import array_record_module as arm
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from jaxtrain.data.records import _Shards

    seq, n_tok, reads = 1024, 20_000_000, 5000
    tmp = Path(tempfile.mkdtemp())
    try:
        tokens = np.random.default_rng(0).integers(0, 50257, n_tok, dtype=np.uint16)
        np.save(tmp / "t.npy", tokens)
        writer = arm.ArrayRecordWriter(str(tmp / "t.array_record"), "group_size:1")
        windows = (n_tok - 1) // seq
        for i in range(windows):
            writer.write(tokens[i * seq:i * seq + seq + 1].tobytes())
        writer.close()
        flat = _Shards(tmp, [{"file": "t.npy", "count": n_tok}])  # the loader's reader
        source = ArrayRecordDataSource([str(tmp / "t.array_record")])
        index = np.random.default_rng(1).integers(0, windows, reads)

        def npy():
            for i in index:
                flat.read(i * seq, i * seq + seq + 1).astype(np.int32)

        def ar_single():
            for i in index:
                np.frombuffer(source[int(i)], np.uint16).astype(np.int32)

        def ar_batched():
            for k in range(0, reads, 64):
                for r in source.__getitems__([int(i) for i in index[k:k + 64]]):
                    np.frombuffer(r, np.uint16).astype(np.int32)

        rates: dict = {"flat npy (pread)": [], "array_record": [], "array_record x64": []}
        for _ in range(reps):
            for name, fn in (("flat npy (pread)", npy), ("array_record", ar_single),
                             ("array_record x64", ar_batched)):
                start = time.perf_counter()
                fn()
                rates[name].append(reads / (time.perf_counter() - start))
        return [emit({"case": "format", "store": k, "windows_per_s": statistics.median(v),
                      "tokens_per_s": statistics.median(v) * seq}) for k, v in rates.items()]
    finally:
        shutil.rmtree(tmp)


def _prepared_sets(tmp: Path) -> dict:
    """The stdlib corpus byte-level and the digits as an image folder, prepared."""
    from jaxtrain.data.prepare import prepare_images, prepare_text
    from jaxtrain.data.text import STDLIB_FILES

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prepare_text([stdlib / f for f in STDLIB_FILES], tmp / "text", progress=False)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from digit_folders import write_digit_folders

    write_digit_folders(tmp / "pngs")
    prepare_images(tmp / "pngs", tmp / "images", valid_fraction=0.25, progress=False)
    return {"text": tmp / "text", "images": tmp / "images"}


def bench_loader(sets: dict, reps: int, workers: int) -> list[dict]:
    from jaxtrain.data.records import load_records

    out = []
    for kind, path, kwargs, batch, steps in (
            ("tokens", sets["text"], {"seq_len": 1024}, 64, 40),
            ("images", sets["images"], {}, 256, 40)):
        for w in sorted({0, workers}):
            records = load_records(str(path), workers=w, **kwargs)["train"]
            loader = records.loader(batch, 0, process_index=0, process_count=1)
            loader(0)  # start-up (worker processes) not counted
            rates = []
            for r in range(reps):
                start = time.perf_counter()
                for s in range(1 + r * steps, 1 + (r + 1) * steps):
                    loader(s)
                rates.append(steps * batch / (time.perf_counter() - start))
            rate = statistics.median(rates)
            unit = "tokens_per_s" if kind == "tokens" else "images_per_s"
            value = rate * 1024 if kind == "tokens" else rate
            out.append(emit({"case": "loader", "data": kind, "workers": w, unit: value}))
            loader.close()
    return out


def _trainers(kind: str, sets: dict):
    """(file-fed trainer, its data, in-memory data, a fresh trainer maker)."""
    import jax

    from jaxtrain import transforms
    from jaxtrain.data import digits_split
    from jaxtrain.data.records import load_records
    from jaxtrain.data.text import load_text
    from jaxtrain.models import registry
    from jaxtrain.train import (
        LoggingConfig,
        TrainConfig,
        Trainer,
        TrainerConfig,
        TrainState,
        classification_loss,
    )
    from jaxtrain.train.language_model import lm_loss

    if kind == "gpt":
        kwargs = dict(vocab_size=256, d_model=128, num_layers=5, num_heads=4, max_len=128,
                      positions="rotary", norm="layernorm", tie_embeddings=True)
        build, loss, batch = (lambda: registry.build("gpt", 0, **kwargs)), lm_loss, 16
        memory = load_text(seq_len=128)["train"]
        files = load_records(str(sets["text"]), seq_len=128)["train"]
    else:
        build = lambda: registry.build("cnn", 0, num_classes=10)  # noqa: E731
        loss, batch = classification_loss, 64
        memory = digits_split(range(10))[0]
        files = load_records(str(sets["images"]))["train"]

    def make(device_data):
        state = TrainState.create(build(), transforms.adam(1e-3), jax.random.PRNGKey(0))
        mesh = __import__("jaxtrain").sharding.make_mesh(devices=jax.devices()[:1])
        config = TrainerConfig(train=TrainConfig(batch_size=batch, device_data=device_data,
                                                 log_every=50),
                               logging=LoggingConfig(progress=False))
        return Trainer(state, loss, config, mesh=mesh)

    return make, memory, files


def bench_trainer(sets: dict, reps: int, steps: int, models=("gpt", "cnn")) -> list[dict]:
    out = []
    for kind in models:
        make, memory, files = _trainers(kind, sets)
        sides = {"file": (make("auto"), files), "memory (device)": (make(True), memory),
                 "memory (host)": (make(False), memory)}
        rates: dict = {k: [] for k in sides}
        cpu: dict = {k: [] for k in sides}  # process CPU time per step, all threads
        for trainer, data in sides.values():  # compile and start-up
            trainer.fit(data, 2)
        for r in range(reps):
            for name, (trainer, data) in sides.items():
                total = 2 + (r + 1) * steps
                start, used = time.perf_counter(), time.process_time()
                trainer.fit(data, total)
                rates[name].append(steps / (time.perf_counter() - start))
                cpu[name].append((time.process_time() - used) / steps * 1e3)
        for name in ("memory (device)", "memory (host)"):
            ratios = [f / m for f, m in zip(rates["file"], rates[name], strict=True)]
            out.append(emit({"case": "trainer", "model": kind, "versus": name,
                             "file_steps_per_s": statistics.median(rates["file"]),
                             "memory_steps_per_s": statistics.median(rates[name]),
                             "ratio_median": statistics.median(ratios),
                             "ratio_min": min(ratios), "ratio_max": max(ratios),
                             "file_cpu_ms_per_step": statistics.median(cpu["file"]),
                             "memory_cpu_ms_per_step": statistics.median(cpu[name])}))
    return out


def _max_rss_mb(command: list[str], env: dict) -> tuple[float, str]:
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1])
    return kb / 1024, result.stdout


def bench_memory(gb: float, steps: int) -> list[dict]:
    from jaxtrain.data.text import STDLIB_FILES

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    block = b"".join((stdlib / f).read_bytes() for f in STDLIB_FILES)
    tmp = Path(tempfile.mkdtemp())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        text = tmp / "big.txt"
        with open(text, "wb") as f:  # the corpus repeated, each copy shifted by a byte
            written, k = 0, 0
            while written < gb * 1e9:
                f.write(block[k % 251:] + block[:k % 251])
                written, k = written + len(block), k + 1
        cli = [sys.executable, "-m", "jaxtrain.cli"]
        prep_rss, _ = _max_rss_mb([*cli, "data", "prepare", "text", str(text), "--out",
                                   str(tmp / "records"), "--valid-fraction", "0.0001",
                                   "--quiet"], env)
        text.unlink()
        tokens = sum(f.stat().st_size for f in (tmp / "records").rglob("tokens-*.npy"))
        char_gpt = Path(__file__).resolve().parent.parent / "configs" / "char_gpt.yaml"
        config = yaml.safe_load(char_gpt.read_text())
        config["data"] = {"name": "records", "path": str(tmp / "records"), "seq_len": 128}
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        train_rss, out = _max_rss_mb(
            [*cli, "train", str(tmp / "config.yaml"), f"out={tmp / 'run'}",
             f"train.steps={steps}", f"train.eval_every={steps}", "logging.progress=false",
             "checkpoint.every=null"], env)
        return [emit({"case": "memory", "token_bytes": tokens, "prepare_max_rss_mb": prep_rss,
                      "train_max_rss_mb": train_rss, "steps": steps,
                      "summary": json.loads(out.splitlines()[0])["step"]})]
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="format,loader,trainer",
                        help="comma-separated cases (memory is opt-in: it writes ~8 GB)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="trainer steps per repetition")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--models", default="gpt,cnn", help="the trainer case's models")
    args = parser.parse_args()
    cases = args.only.split(",")
    rows = []
    if "format" in cases:
        rows += bench_format(args.reps)
    if {"loader", "trainer"} & set(cases):
        tmp = Path(tempfile.mkdtemp())
        try:
            sets = _prepared_sets(tmp)
            if "loader" in cases:
                rows += bench_loader(sets, args.reps, args.workers)
            if "trainer" in cases:
                rows += bench_trainer(sets, args.reps, args.steps, args.models.split(","))
        finally:
            shutil.rmtree(tmp)
    if "memory" in cases:
        rows += bench_memory(args.memory_gb, 20)
    print()
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))


if __name__ == "__main__":
    main()
