"""Prepared records (see `prepare.py`) read with Grain: checked, shuffled, split over hosts.

`load_records(path, ...)` is the `records` data set of configs. It checks the manifest
(format version, every file present at its recorded size, SHA-256 checksums), and gives

- `train`: a `Records` split; the Trainer asks it for a `loader(batch_size, seed)`,
  whose batch for step `s` is a pure function of (seed, s, the data):
  the rows at positions `s*b .. (s+1)*b` of `MapDataset.range(len(rows)).shuffle(seed)
  .repeat()` (a global shuffle, a new one each epoch), computed vectorized
  (`shuffle.ShuffledOrder`, equal to Grain's), host `h` of `P` reading only its slice
  `h*b/P .. (h+1)*b/P`, each batch in one call: the batches of Grain's per-example
  `MapDataset.source(rows).shuffle(seed).repeat().batch(...)`, without its per-example
  cost. The global batch sequence is the same on any number of processes, and resuming
  at step `s` reads from `s`: the state's `data_position` (saved in the same Orbax
  checkpoint) is the whole iterator state. Without worker processes the batches are
  read when the Trainer asks for them, a group of consecutive ones at a time; with
  `workers`, a Grain pipeline runs them, each with
  `threads` read threads and a `prefetch` buffer. Epochs run into each other: a batch
  may hold the last examples of one epoch and the first of the next (each example is
  still seen once per epoch).
- `valid`: a dict of lazy columns (`len`, slicing give NumPy arrays) read on demand.

Token sets give windows of `seq_len + 1` tokens (consecutive windows share one token,
as `jaxtrain.data.text.windows`); `cross_documents=False` keeps every window inside one
document (a document shorter than `seq_len + 1` tokens then gives none).
What is held in memory: the document start offsets (8 bytes per document, plus 8 per
document for the window counts when windows stay in documents), Grain's prefetch buffer
(with workers; without, the batches read ahead: `READ_AHEAD`, at most `READ_AHEAD_BYTES`
unless one batch is larger), one open file per shard and the shuffle's last two blocks
(at most 1 MB); rows are read with `os.pread`, never mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import JaxtrainError
from .prepare import FORMAT, MANIFEST, VERSION, all_files, sha256_file
from .shuffle import ShuffledOrder, shuffle_in_epoch

VERIFY_BYTES = 2 * 2**30  # verify="auto" checks SHA-256 sums of data sets up to this size
SPAN_BYTES_PER_ROW = 4096  # `take` reads a span of rows in one call up to this per row
READ_AHEAD = 8  # without workers a loader reads this many consecutive batches at once,
READ_AHEAD_BYTES = 4 * 2**20  # fewer when they would pass this size (at least one)


def read_manifest(path: str | Path, verify="auto") -> dict:
    """The manifest of the prepared folder `path`, after checking that every file it
    lists is there at its size and (`verify` True, or "auto" up to 2 GiB) checksum."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        partial = sorted(path.parent.glob(f".{path.name}.partial-*"))
        if partial:
            raise JaxtrainError(f"the preparation of {path} did not finish ({partial[0].name} "
                                "is left): run `jaxtrain data prepare` again")
        what = "does not exist" if not path.exists() else "has no manifest.json"
        raise JaxtrainError(f"prepared data {path} {what}: make it with `jaxtrain data "
                            "prepare`")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as err:
        raise JaxtrainError(f"{file} is not valid JSON: {err}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise JaxtrainError(
            f"{file} is format {manifest.get('format')!r} version {manifest.get('version')!r};"
            f" this jaxtrain reads {FORMAT!r} version {VERSION}: prepare the data again")
    entries = all_files(manifest)
    for entry in entries:
        f = path / entry["file"]
        if not f.is_file():
            raise JaxtrainError(f"shard {f} listed in {file} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise JaxtrainError(f"shard {f} is {f.stat().st_size} bytes, the manifest says "
                                f"{entry['bytes']} (truncated or changed): prepare again")
    if verify not in (True, False, "auto"):
        raise JaxtrainError(f"data key 'verify' must be true, false or auto, got {verify!r}")
    if verify is True or (verify == "auto" and sum(e["bytes"] for e in entries) <= VERIFY_BYTES):
        for entry in entries:
            if sha256_file(path / entry["file"]) != entry["sha256"]:
                raise JaxtrainError(f"shard {path / entry['file']} does not match its SHA-256 "
                                    "checksum in the manifest (changed after preparation): "
                                    "prepare again")
    return manifest


class _Shards:
    """One feature's shard series as one array of rows (`read(start, stop)` may span
    shards). Rows are read with `os.pread` into fresh buffers, not memory-mapped: the
    kernel maps whole large folios (up to 2 MB) of a mapped file per fault, so random
    windows from a mapping grew the process's RSS by ~1.8 MB each (measured; see
    docs/data.md). Files open on first read, so the object pickles small into Grain's
    worker processes."""

    def __init__(self, root: Path, entries: list[dict]):
        self.files = [str(root / e["file"]) for e in entries]
        self.bounds = np.cumsum([0] + [e["count"] for e in entries])
        self.open = None

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getstate__(self):
        return {**self.__dict__, "open": None}

    def __del__(self, close=os.close):  # `os` may be gone when the interpreter exits
        for fd, *_ in self.open or ():
            close(fd)

    def _open(self) -> list:
        opened = []
        for f in self.files:
            with open(f, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = header(handle)
                offset = handle.tell()
            if fortran:
                raise JaxtrainError(f"shard {f} is Fortran-ordered; prepare the data again")
            row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            opened.append((os.open(f, os.O_RDONLY), offset, row, dtype, tuple(shape[1:])))
        return opened

    def take(self, indices) -> np.ndarray:
        """Rows `indices` (any order) as one array: each row read straight into its place,
        or, when they lie in one shard within `count * SPAN_BYTES_PER_ROW` bytes, their
        whole span read in one call and gathered (a `pread` costs about what copying a
        4 KiB page does: 1.2 us against ~24 us for an 86 KB span, measured)."""
        if self.open is None:
            self.open = self._open()
        _, _, row, dtype, shape = self.open[0]
        indices = np.asarray(indices, np.int64)
        if not len(indices):
            return np.empty((0, *shape), dtype)
        lo, hi = int(indices.min()), int(indices.max()) + 1
        first = int(self.bounds.searchsorted(lo, "right")) - 1
        if hi <= self.bounds[first + 1] and (hi - lo) * row <= len(indices) * SPAN_BYTES_PER_ROW:
            fd, offset = self.open[first][:2]
            start = offset + (lo - int(self.bounds[first])) * row
            span = np.frombuffer(os.pread(fd, (hi - lo) * row, start), dtype)
            return span.reshape(-1, *shape)[indices - lo]
        shard = self.bounds.searchsorted(indices, "right") - 1
        local = indices - self.bounds[shard]
        out = np.empty((len(indices), *shape), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        for k, (f, i) in enumerate(zip(shard.tolist(), local.tolist(), strict=True)):
            fd, offset = self.open[f][:2]
            os.preadv(fd, [view[k * row:(k + 1) * row]], offset + i * row)
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.open is None:
            self.open = self._open()
        first = int(np.searchsorted(self.bounds, start, "right")) - 1
        parts = []
        while start < stop:
            lo, hi = self.bounds[first], self.bounds[first + 1]
            take = min(stop, hi)
            fd, offset, row, dtype, shape = self.open[first]
            data = os.pread(fd, (take - start) * row, offset + (start - lo) * row)
            parts.append(np.frombuffer(data, dtype).reshape(-1, *shape))
            start, first = take, first + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TokenWindows:
    """Grain data source: window `i` of a split's token stream, `{'tokens': int32
    (seq_len + 1,)}`."""

    def __init__(self, root: Path, split: dict, seq_len: int, cross_documents: bool = True):
        self.stream = _Shards(root, split["shards"]["tokens"])
        self.seq_len, self.cross = seq_len, cross_documents
        starts = np.load(root / split["documents"]["file"], allow_pickle=False)
        self.longest = int(np.max(np.diff(starts))) if len(starts) > 1 else 0
        if cross_documents:
            self.n = max(0, (len(self.stream) - 1) // seq_len)
            self.starts = self.cum = None
        else:
            per_doc = np.maximum(0, (np.diff(starts) - 1) // seq_len)
            self.starts, self.cum = starts[:-1], np.cumsum(per_doc)
            self.n = int(self.cum[-1]) if len(per_doc) else 0

    def __len__(self) -> int:
        return self.n

    def _start(self, i: int) -> int:
        if self.cross:
            return i * self.seq_len
        doc = int(np.searchsorted(self.cum, i, "right"))
        before = int(self.cum[doc - 1]) if doc else 0
        return int(self.starts[doc]) + (i - before) * self.seq_len

    def __getitem__(self, i: int) -> dict:
        i = int(i) % self.n
        start = self._start(i)
        return {"tokens": self.stream.read(start, start + self.seq_len + 1).astype(np.int32)}

    def take(self, indices) -> dict:
        """Windows `indices` (a loader's batch) stacked."""
        return {"tokens": np.stack([self[i]["tokens"] for i in indices])}

    def rows(self, start: int, stop: int) -> dict:
        """Windows `start:stop` stacked (one read when windows may cross documents)."""
        if not self.cross or stop <= start:
            return {"tokens": np.stack([self[i]["tokens"] for i in range(start, stop)])
                    if stop > start else np.zeros((0, self.seq_len + 1), np.int32)}
        flat = self.stream.read(start * self.seq_len, stop * self.seq_len + 1)
        idx = np.arange(stop - start)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return {"tokens": flat[idx].astype(np.int32)}


class ArrayRows:
    """Grain data source: row `i` of a split's features (`image` uint8 scaled to float32
    in [0, 1] when the manifest gives a `scale`)."""

    def __init__(self, root: Path, split: dict, features: dict):
        self.columns = {k: _Shards(root, split["shards"][k]) for k in features}
        self.scale = {k: f.get("scale") for k, f in features.items()}
        self.n = split["count"]

    def __len__(self) -> int:
        return self.n

    def _convert(self, name: str, value: np.ndarray) -> np.ndarray:
        scale = self.scale[name]
        return value * np.float32(scale) if scale else np.array(value)

    def __getitem__(self, i: int) -> dict:
        i = int(i) % self.n
        return {k: self._convert(k, c.read(i, i + 1)[0]) for k, c in self.columns.items()}

    def rows(self, start: int, stop: int) -> dict:
        return {k: self._convert(k, c.read(start, stop)) for k, c in self.columns.items()}

    def take(self, indices) -> dict:
        """Rows `indices` (a loader's batch) stacked."""
        indices = np.asarray(indices) % self.n
        return {k: self._convert(k, c.take(indices)) for k, c in self.columns.items()}


class Column:
    """One feature of a source as a read-only array-like: `len`, `x[i]`, `x[a:b]`,
    `x[i, ...]` give NumPy arrays read on demand (for evaluation and samples)."""

    def __init__(self, source, name: str):
        self.source, self.name = source, name

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> tuple:
        return (len(self), *self.source[0][self.name].shape)

    def __getitem__(self, index):
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            value = self.source.rows(start, stop)[self.name][::step]
        else:
            value = self.source.rows(int(index), int(index) + 1)[self.name][0]
        return value[rest] if rest else value


class ReadBatch:
    """Host `process_index`'s rows of global batch `step`: positions `step * batch_size +
    process_index * b ..` (`b = batch_size // process_count`) of the shuffled order."""

    def __init__(self, source, order: ShuffledOrder, batch_size: int, process_index: int,
                 process_count: int):
        self.source, self.order, self.batch_size = source, order, batch_size
        self.local = batch_size // process_count
        self.offset = process_index * self.local

    def __call__(self, step: int) -> dict:
        start = int(step) * self.batch_size + self.offset
        return self.source.take(self.order.rows(start, start + self.local))

    def many(self, step: int, count: int) -> dict:
        """Batches `step .. step + count` stacked on a new leading axis, read in one
        call (one host's batches are one span of the order)."""
        start = int(step) * self.batch_size + self.offset
        if self.local == self.batch_size:
            rows = self.order.rows(start, start + count * self.local)
        else:
            rows = np.concatenate([self.order.rows(s, s + self.local) for s in
                                   range(start, start + count * self.batch_size,
                                         self.batch_size)])
        return {k: v.reshape(count, self.local, *v.shape[1:])
                for k, v in self.source.take(rows).items()}


class Loader:
    """This host's batch of a data position (see the module docstring). Without worker
    processes, read when asked, in the caller's thread: the Trainer asks for the next
    batch while the last step runs, and Grain's read threads and iterator only added
    Python per step (GIL) on top of the same read. With `workers`, from a Grain pipeline
    over worker processes, started at the position asked for and followed while
    positions come in order. Batches are process-local: the feed assembles the global
    array with `jax.make_array_from_process_local_data`."""

    process_local = True

    def __init__(self, source, batch_size: int, seed: int, workers: int = 0,
                 threads: int = 2, prefetch: int = 8, process_index: int | None = None,
                 process_count: int | None = None):
        import jax

        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        if not isinstance(batch_size, int) or batch_size < 1 or batch_size % pc:
            raise JaxtrainError(f"batch_size must be a positive multiple of the {pc} "
                                f"process(es), got {batch_size!r}")
        if batch_size > len(source):
            raise JaxtrainError(f"batch_size {batch_size} exceeds the {len(source)} examples "
                                "in the prepared train split")
        self.batch_size, self.seed = batch_size, seed
        self.workers, self.threads, self.prefetch = workers, threads, prefetch
        # the batches of `MapDataset.source(source).shuffle(seed).repeat().batch(...)`:
        # Grain's shuffle computed for a block of indices at once (`ShuffledOrder`), then
        # one read per batch (`take`), without Grain's per-example cost (~40 us each)
        self.read = ReadBatch(source, ShuffledOrder(len(source), seed), batch_size, pi, pc)
        self.iterator, self.expected = None, None
        self.group, self.held = None, None  # without workers: batches per read, the last

    def _from_group(self, position: int) -> dict:
        """Without workers: the batch of `position` from one read of `group` consecutive
        batches (`READ_AHEAD`, within `READ_AHEAD_BYTES`), kept until a position outside
        it is asked for: one `take` per group, not per batch."""
        if self.group is None:  # sized by the first batch
            size = sum(v.nbytes for v in self.read(position).values())
            self.group = max(1, min(READ_AHEAD, READ_AHEAD_BYTES // max(size, 1)))
        first, batches = self.held or (None, None)
        if first is None or not first <= position < first + self.group:
            first, batches = position, self.read.many(position, self.group)
            self.held = first, batches
        return {k: v[position - first] for k, v in batches.items()}

    def _start(self, position: int) -> None:
        import grain
        from absl import flags

        self.close()
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (defaults)
            flags.FLAGS.mark_as_parsed()
        data = grain.MapDataset.range(position, sys.maxsize // self.batch_size).map(
            self.read).to_iter_dataset(grain.ReadOptions(num_threads=self.threads,
                                                         prefetch_buffer_size=self.prefetch))
        data = data.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        self.iterator = iter(data)

    def __call__(self, position: int) -> dict:
        if not self.workers:  # read in this thread, while the last step runs
            return self._from_group(position)
        if position != self.expected:
            self._start(position)
        self.expected = position + 1
        return next(self.iterator)

    def many(self, position: int, count: int) -> dict:
        """The batches of `count` positions from `position`, stacked on a new leading
        axis (for `steps_per_call`): without workers, read in one call."""
        if not self.workers:
            return self.read.many(position, count)
        batches = [self(position + i) for i in range(count)]
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def close(self) -> None:
        """Stop the Grain iterator (its read threads, worker processes, buffer)."""
        if self.iterator is not None:
            self.iterator.close()
        self.iterator, self.expected, self.held = None, None, None


class Records:
    """A prepared split for training: `loader(batch_size, seed)` gives the Trainer its
    batches; `arrays(limit, seed)` a seeded random subset in memory (the tuning tools
    hold their training set on the devices)."""

    def __init__(self, source, workers: int = 0, threads: int = 2, prefetch: int = 8,
                 identity: dict | None = None):
        self.source, self.identity = source, identity
        self.workers, self.threads, self.prefetch = workers, threads, prefetch
        self.last = None  # (batch size, seed, hosts), the Loader last given

    def __len__(self) -> int:
        return len(self.source)

    def loader(self, batch_size: int, seed: int, **hosts) -> Loader:
        """A Loader of these records; the same one again for the same batch size, seed
        and hosts, so a `fit` that continues where the last one stopped continues its
        shuffle and, with `workers`, its Grain iterator (prefetched batches, worker
        processes) instead of starting anew; the Loader it replaces is closed."""
        key = (batch_size, seed, tuple(sorted(hosts.items())))
        if self.last is None or self.last[0] != key:
            self.close()
            self.last = key, Loader(self.source, batch_size, seed, self.workers,
                                    self.threads, self.prefetch, **hosts)
        return self.last[1]

    def close(self) -> None:
        """Close the last Loader given (its worker processes and read-ahead); the run that
        loaded these records calls it when it ends (`closing`)."""
        if self.last is not None:
            self.last[1].close()
        self.last = None

    def arrays(self, limit: int, seed: int = 0) -> dict:
        """The first `limit` examples of epoch 0 of the seeded shuffle, stacked."""
        n = len(self.source)
        return self.source.take(shuffle_in_epoch(np.arange(min(limit, n)), n, seed))


@contextlib.contextmanager
def closing(data: dict):
    """A `with` block over a loaded data set (`{'train': ..., 'valid': ...}`) whose end,
    however it ends, closes the prepared records among its splits (`Records.close`): a
    run that fails or returns leaves no worker processes behind, whoever still holds
    the data."""
    try:
        yield data
    finally:
        for split in data.values():
            if isinstance(split, Records):
                split.close()


def data_identity(path: str | Path, manifest: dict) -> dict:
    """What a checkpoint records of the prepared data it was trained on: the folder, when
    it was prepared, the examples per split, and `digest`, the SHA-256 of its kind,
    features, tokenizer and every file's checksum (the content, so a preparation from the same input
    made again has the same digest)."""
    files = sorted((e["file"], e.get("count"), e["sha256"]) for e in all_files(manifest))
    content = json.dumps([manifest["kind"], manifest.get("features"),
                          manifest.get("tokenizer", {}).get("digest"), files], sort_keys=True)
    return {"path": str(path), "prepared": manifest.get("created"),
            "examples": {s: v["count"] for s, v in manifest["splits"].items()},
            "digest": hashlib.sha256(content.encode()).hexdigest()}


def identity_changes(saved: dict, current: dict) -> list[str]:
    """What differs between the data a checkpoint was trained on and the data given now
    (`data_identity` records), empty when the content is the same."""
    if not saved.get("digest") or not current.get("digest") or (
            saved["digest"] == current["digest"]):
        return []
    changes = [f"{key} {saved.get(key)} -> {current.get(key)}" for key in ("path", "examples")
               if saved.get(key) != current.get(key)]
    return [*changes, f"content sha256 {saved['digest'][:12]}... -> "
                      f"{current['digest'][:12]}..., prepared {saved.get('prepared')} -> "
                      f"{current.get('prepared')}"]


def check_same_data(saved: dict | None, current: dict | None, folder) -> None:
    """Refuse in one line to resume the run of checkpoint folder `folder`, trained on the
    prepared data `saved` (a checkpoint's `data` record), on other data behind the same
    path (`current`); see `identity_changes`."""
    changes = identity_changes(saved or {}, current or {})
    if changes:
        raise JaxtrainError(
            f"the prepared data at {current['path']} is not the data the run in {folder} "
            f"was trained on ({'; '.join(changes)}): resume with the original data, or "
            "start a fresh run in another folder (out=)")


def _int(name: str, value, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise JaxtrainError(f"data key {name!r} must be an integer >= {low}, got {value!r}")
    return value


def load_records(path: str, seq_len: int | None = None, cross_documents: bool = True,
                 tokenizer: str | None = None, verify="auto", workers: int = 0,
                 threads: int = 2, prefetch: int = 8) -> dict:
    """The prepared data at `path` as `{'train': Records, 'valid': {name: Column},
    'info'}`. Token sets need `seq_len`; `tokenizer` (a tokenizer.json), if given, must
    be the one the data was prepared with."""
    root = Path(path)
    manifest = read_manifest(root, verify)
    reading = {"workers": _int("workers", workers), "threads": _int("threads", threads),
               "prefetch": _int("prefetch", prefetch, 1)}
    splits = manifest["splits"]
    info = dict(manifest.get("info", {}))
    if manifest["kind"] == "tokens":
        from .tokenizer import BPE, Bytes

        tok = manifest["tokenizer"]
        if tokenizer is not None:
            given = BPE.from_file(tokenizer).digest
            if given != tok["digest"]:
                raise JaxtrainError(f"tokenizer {tokenizer} is not the one {root} was prepared "
                                    f"with ({tok.get('file') or tok['kind']}, sha256 "
                                    f"{tok['digest'][:12]}...): prepare the data with it")
        if seq_len is None:
            raise JaxtrainError(f"data key 'seq_len' is missing: {root} is a token stream")
        seq_len = _int("seq_len", seq_len, 1)
        sources = {s: TokenWindows(root, splits[s], seq_len, cross_documents) for s in splits}
        for name, src in sources.items():
            if len(src) == 0:
                where = (f"its longest document has {src.longest} tokens" if not cross_documents
                         else f"the split has {len(src.stream)} tokens")
                raise JaxtrainError(f"data key 'seq_len' {seq_len} is longer than the {name} "
                                    f"split of {root} allows ({where}; a window needs "
                                    "seq_len + 1)")
        decoder = (BPE.from_file(root / tok["file"]) if tok["kind"] == "bpe" else Bytes())
        info.update(vocab_size=tok["vocab_size"], seq_len=seq_len, decode=decoder.decode)
    else:
        sources = {s: ArrayRows(root, splits[s], manifest["features"]) for s in splits}
        if manifest.get("classes"):
            info["num_classes"] = len(manifest["classes"])
    data = {"train": Records(sources["train"], **reading,
                             identity=data_identity(root, manifest)), "info": info}
    if "valid" in sources:
        data["valid"] = {k: Column(sources["valid"], k) for k in sources["valid"][0]}
    return data
