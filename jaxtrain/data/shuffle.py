"""Grain's global shuffle, vectorized: the rows `MapDataset.range(n).shuffle(seed).repeat()`
gives at any positions, computed for a whole NumPy array of positions at once.

Grain computes each position with one Python call to its C++ `index_shuffle` (a 4-round
Simon block cipher, keys from `std::seed_seq{seed}`, cycle-walking into `[0, n)`; epoch
`e` uses seed `seed + e`). For a small set that cost ~25 us per index here (an index walks
~48 cipher steps when n ~ 1,300, the smallest block being 16 bits): ~1.6 ms per batch
of 64, ten times the read.
This is the same algorithm on arrays (tested equal to Grain's on many seeds and sizes,
including its quirk for `n = 2**k + 1`, k even >= 16, where the cipher's block misses the
last index), so the batches stay those of Grain's pipeline, bit for bit.
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

ROUNDS = 4  # what `ShuffleMapDataset` asks of `index_shuffle`
_M32 = 0xFFFFFFFF
TABLE_BITS = 16  # cipher blocks up to this many bits are encrypted whole (512 KB)


def round_keys(seed: int, rounds: int = ROUNDS) -> list[int]:
    """`std::seed_seq{seed}.generate(keys, keys + rounds)` (the C++ standard's algorithm)."""
    n, s = rounds, 1
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q, m = p + t, max(s + 1, n)
    b = [0x8B8B8B8B] * n

    def mix(x: int) -> int:
        return x ^ (x >> 27)

    for k in range(m):
        r1 = 1664525 * mix(b[k % n] ^ b[(k + p) % n] ^ b[(k - 1) % n]) & _M32
        r2 = (r1 + (s if k == 0 else k % n + seed if k <= s else k % n)) & _M32
        b[(k + p) % n] = (b[(k + p) % n] + r1) & _M32
        b[(k + q) % n] = (b[(k + q) % n] + r2) & _M32
        b[k % n] = r2
    for k in range(m, m + n):
        r3 = 1566083941 * mix((b[k % n] + b[(k + p) % n] + b[(k - 1) % n]) & _M32) & _M32
        r4 = (r3 - k % n) & _M32
        b[(k + p) % n] ^= r3
        b[(k + q) % n] ^= r4
        b[k % n] = r4
    return b


def _word_bits(max_index: int) -> int:
    """Half the cipher's block: Grain's `ceil(log2(max_index))`, made even, at least 16."""
    block = math.ceil(math.log2(max_index))
    return max(block + block % 2, 16) // 2


def _simon_f(v: np.ndarray, w: int) -> np.ndarray:
    """Simon's round function on `w`-bit words: `(v <<< 1) & (v <<< 8) ^ (v <<< 2)`."""
    mask = (1 << w) - 1

    def rotl(r):
        return ((v << r) & mask) | (v >> (w - r))

    return (rotl(1) & rotl(8)) ^ rotl(2)


@functools.lru_cache(maxsize=8)
def _simon_f_table(w: int) -> np.ndarray:
    """`_simon_f` of every `w`-bit word (w <= 16: at most 512 KB), looked up instead."""
    return _simon_f(np.arange(1 << w, dtype=np.intp), w)


def _encrypt(x: np.ndarray, keys: list[int], w: int) -> np.ndarray:
    """Grain's `simon_encrypt<w>` of blocks `x` (`2 * w` bits; intp up to w = 16, else
    uint64): two Feistel rounds per pair of keys."""
    mask = (1 << w) - 1
    if w <= 16:  # looked up; `wrap` skips the bounds check (w-bit words are in range)
        f = functools.partial(np.take, _simon_f_table(w), mode="wrap")
    else:
        f = functools.partial(_simon_f, w=w)
    left, right = (x >> w) & mask, x & mask
    for i in range(0, len(keys), 2):
        left ^= f(right) ^ (keys[i] & mask)
        right ^= f(left) ^ (keys[i + 1] & mask)
    return (left << w) | right


def shuffle_in_epoch(index: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Grain's `index_shuffle(i, n - 1, seed, 4)` for every `i` of `index` (all in [0, n))."""
    if n <= 1:
        return np.zeros(np.shape(index), np.int64)
    keys, w, top = round_keys(seed % 2**32), _word_bits(n - 1), n - 1
    if 2 * w <= TABLE_BITS:  # the smallest block: encrypt it whole once, walk by lookup
        every = np.arange(1 << 2 * w, dtype=np.intp)
        table = _encrypt(every, keys, w)
        jump = np.where(every <= top, every, table)  # one step; a block in [0, n) stays
        for _ in range(4):  # 16 steps at once: ~25 walk iterations, not ~400 (n ~ 1k)
            jump = jump.take(jump, mode="wrap")  # in range: `wrap` skips the bounds check
        step, out = jump.__getitem__, table[np.asarray(index, np.intp)]
    else:
        step = functools.partial(_encrypt, keys=keys, w=w)
        out = step(np.asarray(index, np.intp if w <= 16 else np.uint64))
    walk = np.flatnonzero(out > top)  # cycle-walk: encrypt again until inside [0, n)
    while walk.size:
        again = step(out[walk])
        out[walk] = again
        walk = walk[again > top]
    return out.astype(np.int64)


class ShuffledOrder:
    """The rows of `MapDataset.range(n).shuffle(seed).repeat()` at consecutive positions
    (epoch `p // n` shuffled with seed `seed + epoch`), computed a block of an epoch at a time:
    block `j` of epoch `e` is the rows at in-epoch indices `j*block .. (j+1)*block` (the
    whole epoch when it is smaller), cached, the last few kept. What is held: at most
    `KEEP` blocks of `block` int64 rows (1 MB at the default), whatever the data size;
    a whole epoch is one block when its cipher is encrypted whole (`TABLE_BITS`).
    The block after the one last asked for is computed meanwhile in a background thread
    (NumPy releases the GIL for most of it): a loop reading in order does not wait for
    the next epoch's shuffle, ~1-2 ms for any set of up to 65,536 examples (its cipher
    is encrypted whole), i.e. 50-100 us a step for the digits' 21 batches an epoch.
    Thread-safe (Grain's read threads ask for consecutive batches at once); pickles
    without its cache and thread (Grain's worker processes)."""

    KEEP = 2

    def __init__(self, n: int, seed: int, block: int = 2**TABLE_BITS):
        self.n, self.seed, self.block = n, seed % 2**32, min(n, block)
        self.last = (n - 1) // self.block  # an epoch's last block
        self.cache: dict = {}  # (epoch, block) -> the Future of its rows
        self.lock = threading.Lock()
        self.ahead = None  # the background thread (an executor), started when first asked

    def __getstate__(self):
        return {**self.__dict__, "cache": {}, "lock": None, "ahead": None}

    def __setstate__(self, state):
        self.__dict__.update(state, lock=threading.Lock())

    def _compute(self, epoch: int, j: int) -> np.ndarray:
        start = j * self.block
        index = np.arange(start, min(start + self.block, self.n))
        return shuffle_in_epoch(index, self.n, (self.seed + epoch) % 2**32)

    def _future(self, epoch: int, j: int) -> Future:
        """Block `j` of `epoch`, held or started (the lock held)."""
        future = self.cache.get((epoch, j))
        if future is None:
            if len(self.cache) >= self.KEEP:
                del self.cache[next(iter(self.cache))]  # the oldest
            if self.ahead is None:
                self.ahead = ThreadPoolExecutor(1, thread_name_prefix="shuffle-ahead")
            future = self.cache[epoch, j] = self.ahead.submit(self._compute, epoch, j)
        return future

    def _block(self, epoch: int, j: int) -> np.ndarray:
        with self.lock:
            future = self._future(epoch, j)
            self._future(*((epoch, j + 1) if j < self.last else (epoch + 1, 0)))
        return future.result()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The rows at positions `start .. stop` (any span, across epochs)."""
        parts = []
        while start < stop:
            epoch, i = divmod(start, self.n)
            j = i // self.block
            rows = self._block(epoch, j)[i - j * self.block:]
            parts.append(rows[:stop - start])
            start += len(parts[-1])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
