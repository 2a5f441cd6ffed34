"""The global sample order and the arithmetic of exact resumption.

**Order.** Epoch ``e`` of a dataset of ``N`` samples is a permutation of all samples that depends
only on (seed, e, the shards' sample counts, ``window_shards``): the shards are permuted, cut into
windows of ``window_shards`` consecutive shards, and the samples of each window are permuted among
themselves (a window of all shards is a uniform shuffle of the epoch). The windows play the part
of a shuffle buffer, without state: any position's sample is computed, not buffered.
Permutations sort a 64-bit hash (splitmix64) of (key, index), written out here in integer
arithmetic, so the order does not change with a numpy upgrade.

**Streams.** The epochs are laid end to end into one infinite sequence of *global positions*
``g`` (epoch ``g // N``, position ``g % N`` in it). A run consumes them from a *base*: all
positions below ``base`` are consumed, and so are those listed in ``done`` (a short, sorted list
of positions above it). The remaining positions, in order, are ``R = [g >= base, g not in done]``
and data-parallel rank ``r`` of ``W`` reads ``R[r], R[r + W], R[r + 2W], ...``. A rank's whole
state is then how many of its positions it has *processed* (delivered or skipped as unreadable).

Resuming with the same ``W``: each rank restores its own count (exactly the uninterrupted run's
continuation). With another ``W``: the ranks' states are merged into one (``base``, ``done``) that
names exactly the consumed positions — the ranks' counts differ only by what faults made them
skip, so ``done`` stays short — and the new ranks split what remains. Within an epoch no sample is
delivered twice or skipped either way.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

_U64 = np.uint64
_MASK = (1 << 64) - 1


def mix64(values) -> np.ndarray:
    """splitmix64's finalizer, a bijection of uint64 (elementwise)."""
    x = np.array(values, dtype=_U64, copy=True, ndmin=1)
    with np.errstate(over="ignore"):
        x += _U64(0x9E3779B97F4A7C15)
        x ^= x >> _U64(30)
        x *= _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


def stream_key(seed: int, epoch: int, tag: int) -> int:
    key = int(mix64(seed & _MASK)[0])
    key = int(mix64(key ^ (epoch & _MASK))[0])
    return int(mix64(key ^ tag)[0])


def hashed_permutation(ids: np.ndarray, key: int) -> np.ndarray:
    """Indices that order ``ids`` (distinct non-negative ints) by a keyed hash: a permutation."""
    hashes = mix64(np.asarray(ids, dtype=np.int64).astype(_U64) ^ _U64(key))
    return np.argsort(hashes, kind="stable")


_TAG_SHARDS = 1
_TAG_WINDOW = 2


class EpochOrder:
    """Position in epoch -> (shard index, sample index in shard), computed a window at a time."""

    def __init__(
        self,
        counts: Sequence[int],
        seed: int,
        epoch: int,
        shuffle: bool,
        window_shards: int | None,
    ) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        n_shards = len(self.counts)
        self.shard_base = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        if shuffle:
            shard_order = hashed_permutation(np.arange(n_shards), stream_key(seed, epoch, _TAG_SHARDS))
        else:
            shard_order = np.arange(n_shards)
        k = n_shards if not window_shards or not shuffle else min(window_shards, n_shards)
        self.windows = [shard_order[i : i + k] for i in range(0, n_shards, max(k, 1))]
        sizes = np.array([self.counts[w].sum() for w in self.windows], dtype=np.int64)
        self.window_end = np.cumsum(sizes)
        self.total = int(self.window_end[-1]) if len(sizes) else 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        if w not in self._cache:
            shards = self.windows[w]
            counts = self.counts[shards]
            shard_of = np.repeat(shards, counts)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            index_of = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
            if self.shuffle:
                global_ids = self.shard_base[shard_of] + index_of
                order = hashed_permutation(global_ids, stream_key(self.seed, self.epoch, _TAG_WINDOW))
                shard_of, index_of = shard_of[order], index_of[order]
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[w] = (shard_of, index_of)
        return self._cache[w]

    def locate(self, position: int) -> tuple[int, int]:
        if not 0 <= position < self.total:
            raise IndexError(f"position {position} outside epoch of {self.total} samples")
        w = int(np.searchsorted(self.window_end, position, side="right"))
        shard_of, index_of = self._window(w)
        offset = position - (int(self.window_end[w - 1]) if w else 0)
        return int(shard_of[offset]), int(index_of[offset])


def nth_remaining(base: int, done: Sequence[int], j: int) -> int:
    """The ``j``-th (0-based) position >= ``base`` that is not in ``done`` (sorted, all >= base)."""
    k = 0
    while True:
        x = base + j + k
        k_new = bisect.bisect_right(done, x)
        if k_new == k:
            return x
        k = k_new


def normalize(base: int, done: Sequence[int]) -> tuple[int, list[int]]:
    """Moves ``base`` past positions in ``done`` directly above it; drops entries below it."""
    remaining = sorted(d for d in set(done) if d >= base)
    i = 0
    while i < len(remaining) and remaining[i] == base:
        base += 1
        i += 1
    return base, remaining[i:]


def merge_consumed(
    base: int, done: Sequence[int], world_size: int, processed: Sequence[int]
) -> tuple[int, list[int]]:
    """(base, done) naming every position consumed when rank ``r`` processed ``processed[r]``."""
    if len(processed) != world_size:
        raise ValueError(f"need one count per rank: {world_size} ranks, {len(processed)} counts")
    least = min(processed)
    # R[0 : W * least] is consumed entirely, and with it every `done` position below R[W * least].
    new_base = nth_remaining(base, done, world_size * least) if least else base
    extra = [
        nth_remaining(base, done, rank + world_size * i)
        for rank, count in enumerate(processed)
        for i in range(least, count)
    ]
    return normalize(new_base, [d for d in done if d >= new_base] + extra)
