"""A byte-level text corpus made of the Python standard library's own source files.

Nothing is downloaded: the files below are part of every CPython 3.10+ install (modules
that were removed, moved into packages or turned into shims in 3.10-3.14 are left out).
Their text differs a little between Python versions, so the corpus is fixed per install,
not across installs. Each file's first `1 - valid_fraction` of bytes goes to training and
the rest to validation (same kind of code on both sides), in the order listed.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from ..errors import JaxtrainError

STDLIB_FILES = (
    "argparse.py", "ast.py", "base64.py", "bdb.py", "bisect.py", "calendar.py", "cmd.py",
    "code.py", "codecs.py", "collections/__init__.py", "configparser.py", "contextlib.py",
    "copy.py", "csv.py", "dataclasses.py", "difflib.py", "dis.py", "doctest.py",
    "email/message.py", "email/_header_value_parser.py", "enum.py", "fnmatch.py",
    "fractions.py", "ftplib.py", "functools.py", "gettext.py", "glob.py", "gzip.py",
    "heapq.py", "hmac.py", "http/client.py", "http/server.py", "imaplib.py", "inspect.py",
    "ipaddress.py", "json/decoder.py", "json/encoder.py", "locale.py", "logging/__init__.py",
    "mailbox.py", "ntpath.py", "numbers.py", "operator.py", "optparse.py", "os.py", "pdb.py",
    "pickle.py", "platform.py", "posixpath.py", "pprint.py", "pstats.py", "pydoc.py",
    "queue.py", "random.py", "sched.py", "selectors.py", "shlex.py", "shutil.py",
    "smtplib.py", "socket.py", "ssl.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py", "tokenize.py",
    "trace.py", "traceback.py", "typing.py", "unittest/case.py", "unittest/mock.py",
    "urllib/parse.py", "urllib/request.py", "uuid.py", "weakref.py", "xml/dom/minidom.py",
)

VOCAB_SIZE = 256  # one token per byte value


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 tokens in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Tokens back to text (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_corpus(valid_fraction: float = 0.1, root: str | Path | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """`(train, valid)` byte streams (uint8) of the listed standard-library files."""
    if not 0.0 < valid_fraction < 1.0:
        raise JaxtrainError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    missing = [f for f in STDLIB_FILES if not (root / f).is_file()]
    if missing:
        raise JaxtrainError(
            f"standard-library sources missing under {root}: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} (an install without .py sources?)"
        )
    train, valid = [], []
    for name in STDLIB_FILES:
        data = (root / name).read_bytes()
        cut = int(len(data) * (1.0 - valid_fraction))
        train.append(data[:cut])
        valid.append(data[cut:])
    as_array = lambda parts: np.frombuffer(b"".join(parts), np.uint8)
    return as_array(train), as_array(valid)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping (n, seq_len + 1) int32 windows; consecutive windows share one byte,
    so every byte after the first is a prediction target exactly once."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise JaxtrainError(f"seq_len must be a positive integer, got {seq_len!r}")
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise JaxtrainError(f"seq_len {seq_len} is longer than the {len(stream)}-byte text")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx].astype(np.int32)


def load_text(seq_len: int = 128, valid_fraction: float = 0.1) -> dict:
    """The stdlib corpus as `{'train': {'tokens'}, 'valid': {'tokens'}, 'info'}`; tokens
    are (n, seq_len + 1) windows: inputs `[:, :-1]`, next-byte targets `[:, 1:]`."""
    train, valid = stdlib_corpus(valid_fraction)
    return {
        "train": {"tokens": windows(train, seq_len)},
        "valid": {"tokens": windows(valid, seq_len)},
        "info": {"vocab_size": VOCAB_SIZE, "seq_len": seq_len, "files": len(STDLIB_FILES),
                 "train_bytes": len(train), "valid_bytes": len(valid)},
    }
