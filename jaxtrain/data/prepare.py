"""`jaxtrain data prepare`: the user's files -> sharded, checksummed records with a manifest.

Three kinds of input:

- `text`: files (folders, globs) tokenized byte-level, with a byte-level BPE trained here
  on the same text, or with a given `tokenizer.json`, and concatenated into one token
  stream per split. Each file is a document; the last `valid_fraction` of each file's
  bytes (cut at a line end for BPE) goes to `valid`.
- `images`: a class-per-folder tree (`ROOT/CLASS/*.png|jpg|...`) decoded with Pillow
  into uint8 (H, W, C) arrays and int32 labels (classes in sorted folder order).
- `arrays`: `.npz` / `.npy` files of equal-length arrays (one key per array).

Layout of the output folder (every array an `.npy` file that `np.load(mmap_mode='r')`
reads without loading it):

    manifest.json            format version, kind, counts, shards (bytes, SHA-256),
                             features (dtype, shape), tokenizer, classes, source
    tokenizer.json           (BPE only) the tokenizer the tokens were made with
    train/tokens-00000.npy   token shards (1-D); train/documents.npy: document starts
    train/image-00000.npy    or one shard series per feature (`image`, `label`, ...)
    valid/...

Why a flat token array and not ArrayRecord: a training window is then one contiguous
read at a computed offset (any `seq_len`, chosen at training time), 5-8x faster to read at
random than a record per window from ArrayRecord read singly and ~2x faster than read 64
at a time (`benchmarks/data_throughput.py`, `format` case, and benchmarks/RESULTS.md), and
it needs no decoding.

The preparation is written to a hidden sibling folder and renamed into place only when
complete, so a killed preparation is never mistaken for a finished one. The manifest
records a fingerprint of the inputs (paths, sizes, modification times) and the options;
running again on unchanged input finds it and does nothing.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import JaxtrainError

FORMAT, VERSION, MANIFEST = "jaxtrain-records", 1, "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHUNK = 16 * 2**20  # bytes of text read (and tokenized) at a time


# -- inputs ------------------------------------------------------------------------------

def input_files(paths, suffixes: tuple | None = None) -> list[Path]:
    """The files named by `paths` (files, folders searched recursively, or globs; hidden
    files skipped), each folder's and glob's in sorted order, given files in given order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for p in map(str, paths):
        if any(c in p for c in "*?["):
            matches = [Path(m) for m in sorted(globlib.glob(p, recursive=True))]
        elif Path(p).is_dir():
            matches = sorted(f for f in Path(p).rglob("*")
                             if not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif Path(p).exists():
            matches = [Path(p)]
        else:
            raise JaxtrainError(f"input path {p} does not exist")
        matches = [f for f in matches if f.is_file()
                   and (suffixes is None or f.suffix.lower() in suffixes)]
        if not matches:
            kinds = f" ({', '.join(suffixes)})" if suffixes else ""
            raise JaxtrainError(f"input path {p} holds no files{kinds}")
        found.extend(matches)
    return found


def fingerprint(kind: str, files, options: dict) -> str:
    """What decides the output: the format version, the kind, the options and every
    input file's path, size and modification time (like make, not a content hash)."""
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps([VERSION, kind, options, stats], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**22):
            digest.update(block)
    return digest.hexdigest()


# -- output --------------------------------------------------------------------------------

class Output:
    """A preparation under way: files go to a hidden `.NAME.partial-PID` sibling of `out`,
    which `commit` renames to `out` once the manifest is written (and `abort` removes)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if self.out.exists() and not (self.out / MANIFEST).is_file():
            if not self.out.is_dir() or any(self.out.iterdir()):
                raise JaxtrainError(f"output folder {self.out} exists and is not a prepared "
                                    "data set (no manifest.json): choose another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def write(self, relative: str, array: np.ndarray) -> dict:
        """Save `array` as `relative` (.npy); its manifest entry (file, count, bytes, sha256)."""
        path = self.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        return {"file": relative, "count": int(len(array)), "bytes": path.stat().st_size,
                "sha256": sha256_file(path)}

    def commit(self, manifest: dict) -> None:
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Shards:
    """Rows of one split appended in order and written `rows` at a time, one `.npy`
    series per feature (`train/tokens-00000.npy`, ...)."""

    def __init__(self, output: Output, split: str, rows: int):
        self.output, self.split, self.rows = output, split, max(1, rows)
        self.pending: dict[str, list] = {}
        self.entries: dict[str, list] = {}
        self.count = 0

    def add(self, **features) -> None:
        for name, value in features.items():
            self.pending.setdefault(name, []).append(np.asarray(value))
        first = next(iter(features))
        while sum(len(a) for a in self.pending[first]) >= self.rows:
            self._flush(self.rows)

    def _flush(self, rows: int) -> None:
        for name, parts in self.pending.items():
            joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
            index = len(self.entries.get(name, []))
            entry = self.output.write(f"{self.split}/{name}-{index:05d}.npy", joined[:rows])
            self.entries.setdefault(name, []).append(entry)
            self.pending[name] = [joined[rows:]] if len(joined) > rows else []
        self.count += rows

    def close(self) -> dict:
        """Write what is left; the split's manifest entry."""
        left = sum(len(a) for a in next(iter(self.pending.values()), []))
        if left:
            self._flush(left)
        return {"count": self.count, "shards": self.entries}


class _bar:
    """Progress of a preparation step: a tqdm bar on a terminal, else a plain line at
    each quarter done (the Trainer's convention)."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "B"):
        from tqdm.auto import tqdm

        self.total, self.desc, self.enabled, self.done = max(1, total), desc, enabled, 0
        self.next = self.total / 4
        self.tqdm = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                         mininterval=1.0) if enabled and sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.tqdm is not None:
            self.tqdm.update(n)
        elif self.enabled and self.done >= self.next:
            print(f"{self.desc}: {self.done / self.total:.0%}", file=sys.stderr, flush=True)
            self.next += self.total / 4

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def _finish(output: Output, manifest: dict, progress: bool) -> dict:
    output.commit(manifest)
    if progress:
        counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
        print(f"prepared {manifest['kind']} in {output.out}: {counts}", file=sys.stderr)
    return manifest


def up_to_date(out: str | Path, fp: str, progress: bool = False) -> dict | None:
    """The manifest in `out` if it was made from the same inputs and options and all
    its files are still there at their recorded sizes (said on stderr when `progress`)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != VERSION or manifest.get("source", {}).get("fingerprint") != fp:
        return None
    for entry in all_files(manifest):
        f = Path(out) / entry["file"]
        if not f.is_file() or f.stat().st_size != entry["bytes"]:
            return None
    if progress:
        print(f"{out} is up to date (same inputs and options): nothing to do", file=sys.stderr)
    return manifest


def all_files(manifest: dict) -> list[dict]:
    """Every file entry (shards and document indexes) of a manifest."""
    entries = []
    for split in manifest.get("splits", {}).values():
        for series in split.get("shards", {}).values():
            entries.extend(series)
        if split.get("documents"):
            entries.append(split["documents"])
    if manifest.get("tokenizer", {}).get("file"):
        entries.append(manifest["tokenizer"]["file_entry"])
    return entries


def _manifest(kind: str, paths, files, fp: str, options: dict, splits: dict,
              features: dict, **extra) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"paths": [str(p) for p in paths], "files": len(files),
                       "bytes": sum(f.stat().st_size for f in files), "fingerprint": fp,
                       "options": options},
            "features": features, "splits": splits, **extra}


def _check_fraction(valid_fraction: float) -> None:
    if not isinstance(valid_fraction, (int, float)) or not 0.0 <= valid_fraction < 1.0:
        raise JaxtrainError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")


def _shard_rows(shard_mb: float, row_bytes: int) -> int:
    if not isinstance(shard_mb, (int, float)) or shard_mb <= 0:
        raise JaxtrainError(f"shard size must be a positive number of MB, got {shard_mb!r}")
    return max(1, int(shard_mb * 2**20) // max(1, row_bytes))


# -- text ----------------------------------------------------------------------------------

def _read_parts(path: Path, valid_fraction: float, at_line: bool):
    """`(split, bytes chunk)` pairs of one file, streamed: the first `1 - valid_fraction`
    of its bytes to train (cut after a newline when `at_line`), the rest to valid."""
    size = path.stat().st_size
    cut = int(size * (1.0 - valid_fraction))
    with open(path, "rb") as f:
        head = cut
        if at_line and valid_fraction > 0 and cut < size:
            f.seek(cut)
            rest = f.read(CHUNK)
            newline = rest.find(b"\n")
            head = cut + newline + 1 if newline >= 0 else size
            f.seek(0)
        for split, length in (("train", head), ("valid", size - head)):
            while length > 0:
                block = f.read(min(CHUNK, length))
                if at_line and len(block) == CHUNK and length > CHUNK:
                    newline = block.rfind(b"\n")
                    if newline >= 0:  # keep whole lines together for the tokenizer
                        f.seek(newline + 1 - len(block), os.SEEK_CUR)
                        block = block[:newline + 1]
                length -= len(block)
                yield split, block


def _make_tokenizer(tokenizer: str, vocab_size: int, files, progress: bool):
    from .tokenizer import BPE, Bytes

    if tokenizer == "bytes":
        return Bytes()
    if tokenizer == "bpe":
        total = sum(f.stat().st_size for f in files)
        bar = _bar(total, "training BPE", progress)

        def texts():
            for f in files:
                for _, block in _read_parts(f, 0.0, at_line=True):
                    bar.update(len(block))
                    yield block.decode("utf-8", errors="replace")

        tok = BPE.train(texts(), vocab_size)
        bar.close()
        return tok
    return BPE.from_file(tokenizer)


def prepare_text(paths, out, tokenizer: str = "bytes", vocab_size: int = 4096,
                 valid_fraction: float = 0.1, shard_mb: float = 256,
                 progress: bool = True) -> dict:
    """Tokenize the text files of `paths` into `out` (see the module docstring);
    `tokenizer` is `bytes`, `bpe` (trained here, `vocab_size` tokens) or a tokenizer.json
    path. Returns the manifest (the existing one when the input is unchanged)."""
    from .tokenizer import BPE, token_dtype

    _check_fraction(valid_fraction)
    files = input_files(paths)
    options = {"tokenizer": tokenizer, "valid_fraction": valid_fraction, "shard_mb": shard_mb}
    if tokenizer == "bpe":
        options["vocab_size"] = vocab_size
    elif tokenizer != "bytes":
        options["tokenizer"] = BPE.from_file(tokenizer).digest
    fp = fingerprint("text", files, options)
    done = up_to_date(out, fp, progress)
    if done is not None:
        return done
    output = Output(out)
    try:
        tok = _make_tokenizer(tokenizer, vocab_size, files, progress)
        dtype = token_dtype(tok.vocab_size)
        rows = _shard_rows(shard_mb, dtype.itemsize)
        splits = {s: Shards(output, s, rows) for s in ("train", "valid")}
        starts: dict[str, list] = {"train": [0], "valid": [0]}
        bar = _bar(sum(f.stat().st_size for f in files), "tokenizing", progress)
        for f in files:
            lengths = {"train": 0, "valid": 0}
            for split, block in _read_parts(f, valid_fraction, tok.kind != "bytes"):
                ids = tok.encode(block).astype(dtype)
                splits[split].add(tokens=ids)
                lengths[split] += len(ids)
                bar.update(len(block))
            for split, n in lengths.items():
                if n and tok.eos_id is not None:
                    splits[split].add(tokens=np.asarray([tok.eos_id], dtype))
                    n += 1
                if n:
                    starts[split].append(starts[split][-1] + n)
        bar.close()
        manifest_splits = {}
        for split, shards in splits.items():
            entry = shards.close()
            if entry["count"]:
                entry["documents"] = output.write(f"{split}/documents.npy",
                                                  np.asarray(starts[split], np.int64))
                manifest_splits[split] = entry
        if "train" not in manifest_splits:
            raise JaxtrainError(f"input {paths} holds no text (all files are empty)")
        tok_entry = {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                     "digest": tok.digest}
        if tok.kind == "bpe":
            tok.save(output.tmp / "tokenizer.json")
            tok_entry["file"] = "tokenizer.json"
            tok_entry["file_entry"] = {"file": "tokenizer.json",
                                       "bytes": (output.tmp / "tokenizer.json").stat().st_size,
                                       "sha256": sha256_file(output.tmp / "tokenizer.json")}
        manifest = _manifest("tokens", paths, files, fp, options, manifest_splits,
                             {"tokens": {"dtype": dtype.name, "shape": []}},
                             tokenizer=tok_entry)
        return _finish(output, manifest, progress)
    except BaseException:
        output.abort()
        raise


# -- images --------------------------------------------------------------------------------

def _held_out(n: int, valid_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the `round(n * valid_fraction)` examples held out (seeded)."""
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[:int(round(n * valid_fraction))]] = True
    return mask


def _image_size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)):
        raise JaxtrainError(f"image_size must be a positive integer or [height, width], "
                            f"got {value!r}")
    return int(value[0]), int(value[1])


def _decode(path: Path, mode: str | None, size: tuple[int, int] | None, resize: bool):
    """The image as a uint8 (H, W, C) array in `mode`, resized to `size` when `resize`;
    None when Pillow cannot decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = mode or ("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            im = im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError):
        return None, mode
    if size is not None and im.size != (size[1], size[0]):
        if not resize:
            raise JaxtrainError(f"image {path} is {im.size[1]}x{im.size[0]} but earlier ones "
                                f"are {size[0]}x{size[1]} (height x width): pass --image-size "
                                "H W to resize all images to one size")
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(im, np.uint8)
    return (array[..., None] if array.ndim == 2 else array), mode


def prepare_images(root, out, image_size=None, valid_fraction: float = 0.1, seed: int = 0,
                   shard_mb: float = 256, progress: bool = True) -> dict:
    """Decode `root/CLASS/*.png|jpg|...` into uint8 images and int32 labels in `out`.

    All images take the colour mode of the first one (grayscale stays one channel, else
    RGB) and must share its size unless `image_size` (H or (H, W)) resizes them all.
    A file Pillow cannot decode is skipped and counted (the manifest names them and the
    summary line says how many): one corrupt file among thousands should not cost a long
    preparation, and nothing is lost silently. If none decodes, nothing is written.
    """
    _check_fraction(valid_fraction)
    size = _image_size(image_size)
    root = Path(root)
    if not root.is_dir():
        raise JaxtrainError(f"image folder {root} does not exist (want ROOT/CLASS/*.png)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise JaxtrainError(f"image folder {root} has no class subfolders (want "
                            "ROOT/CLASS/*.png)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*")
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((f, label) for f in files)
    if not items:
        raise JaxtrainError(f"image folder {root} holds no image files "
                            f"({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    files = [f for f, _ in items]
    options = {"image_size": size, "valid_fraction": valid_fraction, "seed": seed,
               "shard_mb": shard_mb}
    fp = fingerprint("images", files, options)
    done = up_to_date(out, fp, progress)
    if done is not None:
        return done
    held = _held_out(len(items), valid_fraction, seed)
    output = Output(out)
    try:
        mode, shape, splits, skipped = None, None, {}, []
        bar = _bar(len(items), "decoding images", progress, unit="img")
        for (path, label), valid in zip(items, held, strict=True):
            bar.update(1)
            array, mode = _decode(path, mode, size or (shape[:2] if shape else None),
                                  resize=size is not None)
            if array is None:
                skipped.append(str(path.relative_to(root)))
                continue
            if shape is None:
                shape = array.shape
                rows = _shard_rows(shard_mb, int(np.prod(shape)))
                splits = {s: Shards(output, s, rows) for s in ("train", "valid")}
            splits["valid" if valid else "train"].add(image=array[None],
                                                      label=np.asarray([label], np.int32))
        bar.close()
        if shape is None:
            raise JaxtrainError(f"none of the {len(items)} image files under {root} could "
                                "be decoded by Pillow")
        manifest_splits = {s: e for s, e in ((s, sh.close()) for s, sh in splits.items())
                           if e["count"]}
        if "train" not in manifest_splits:
            raise JaxtrainError(f"no decodable image is left for training under {root}")
        manifest = _manifest(
            "arrays", [root], files, fp, options, manifest_splits,
            {"image": {"dtype": "uint8", "shape": list(shape), "scale": 1 / 255},
             "label": {"dtype": "int32", "shape": []}},
            classes=classes, info={"num_classes": len(classes)},
            skipped={"count": len(skipped), "files": skipped[:100]})
        if skipped and progress:
            print(f"skipped {len(skipped)} image(s) Pillow could not decode, e.g. "
                  f"{skipped[0]} (listed in {out}/{MANIFEST})", file=sys.stderr)
        return _finish(output, manifest, progress)
    except BaseException:
        output.abort()
        raise


# -- arrays --------------------------------------------------------------------------------

def _open_arrays(files) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for f in files:
        try:
            if f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    loaded = {k: z[k] for k in z.files}
            elif f.suffix == ".npy":
                loaded = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False)}
            else:
                raise JaxtrainError(f"array input {f} is neither .npy nor .npz")
        except (OSError, ValueError) as err:
            raise JaxtrainError(f"array input {f} cannot be read by NumPy: {err}") from None
        for key, value in loaded.items():
            if key in arrays:
                raise JaxtrainError(f"array name {key!r} appears twice (again in {f})")
            if value.ndim == 0 or value.dtype == object:
                raise JaxtrainError(f"array {key!r} in {f} must have a leading example "
                                    f"axis and a numeric dtype, got {value.dtype} "
                                    f"{value.shape}")
            arrays[key] = value
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise JaxtrainError(f"arrays differ in length (examples): {sizes}")
    return arrays


def prepare_arrays(paths, out, valid_fraction: float = 0.1, seed: int = 0,
                   shard_mb: float = 256, progress: bool = True) -> dict:
    """Shard the equal-length arrays of `.npz` / `.npy` files (`x.npy` is array `x`)
    into `out`, a seeded `valid_fraction` of the examples held out."""
    _check_fraction(valid_fraction)
    files = input_files(paths, (".npy", ".npz"))
    options = {"valid_fraction": valid_fraction, "seed": seed, "shard_mb": shard_mb}
    fp = fingerprint("arrays", files, options)
    done = up_to_date(out, fp, progress)
    if done is not None:
        return done
    arrays = _open_arrays(files)
    n = len(next(iter(arrays.values())))
    held = _held_out(n, valid_fraction, seed)
    row_bytes = sum(v[:1].nbytes for v in arrays.values())
    rows = _shard_rows(shard_mb, row_bytes)
    output = Output(out)
    try:
        splits = {}
        bar = _bar(n, "writing arrays", progress, unit="ex")
        for split, mask in (("train", ~held), ("valid", held)):
            index = np.flatnonzero(mask)
            shards = Shards(output, split, rows)
            for start in range(0, len(index), rows):
                part = index[start:start + rows]
                shards.add(**{k: np.asarray(v[part]) for k, v in arrays.items()})
                bar.update(len(part))
            entry = shards.close()
            if entry["count"]:
                splits[split] = entry
        bar.close()
        features = {k: {"dtype": v.dtype.name, "shape": list(v.shape[1:])}
                    for k, v in arrays.items()}
        info = {}
        label = arrays.get("label")
        if label is not None and np.issubdtype(label.dtype, np.integer) and label.ndim == 1:
            info["num_classes"] = int(np.max(label)) + 1
        manifest = _manifest("arrays", paths if isinstance(paths, list) else [paths], files,
                             fp, options, splits, features, info=info)
        return _finish(output, manifest, progress)
    except BaseException:
        output.abort()
        raise
