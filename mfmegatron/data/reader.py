"""Per-data-parallel-rank prompt streaming from WebDataset shards, exactly resumable.

Shards are read with :mod:`tarfile` on seekable files, not through the ``webdataset`` package's
pipeline: the order is computed per position (:mod:`mfmegatron.data.order`), so the reader needs
random access to one sample in a shard, which a tar index (member offsets, from one pass over the
headers) gives; there is then no shuffle buffer whose contents a checkpoint would have to carry,
no dependence on how a pipeline splits work between nodes and workers, and each fault is known
down to the shard and sample it cost. The files stay WebDataset-compatible (``webdataset`` reads
them as they are). Shards must be seekable files — local disk or a mounted parallel / object file
system — not ``pipe:`` or HTTP URLs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mfmegatron.data import format as fmt
from mfmegatron.data.order import EpochOrder, merge_consumed, nth_remaining

STATE_FORMAT = "mfmegatron.data.PromptShardReader/1"
MAX_OPEN_SHARDS = 256


class ShardReadWarning(UserWarning):
    """A shard or sample could not be read and is skipped (once per shard / sample and reader)."""


class NoReadableSamplesError(RuntimeError):
    """A rank went through a whole epoch's worth of positions without one readable sample."""


@dataclass
class PromptSample:
    key: str
    prompt: str
    meta: dict[str, Any] | None
    shard: str  # shard file name
    epoch: int
    position: int  # global position (epoch * samples_per_epoch + position in epoch)
    t5: torch.Tensor | None = None  # [s_txt, d_t5]
    t5_mask: torch.Tensor | None = None  # [s_txt] bool, True for real tokens
    pooled: torch.Tensor | None = None  # [d_clip]


def _resolve_source(source) -> tuple[fmt.Manifest, dict[str, str]]:
    """(manifest, {path: error} for shards found damaged while counting samples)."""
    if isinstance(source, fmt.Manifest):
        return source, {}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if (path / fmt.MANIFEST_NAME).is_file():
                return fmt.Manifest.read(path / fmt.MANIFEST_NAME), {}
            paths = sorted(str(p) for p in path.glob("*.tar"))
        elif path.suffix == ".json":
            return fmt.Manifest.read(path), {}
        elif any(c in str(source) for c in "*?["):
            paths = sorted(glob.glob(str(source)))
        else:
            paths = [str(path)]
    else:
        paths = [str(p) for p in source]
    if not paths:
        raise FileNotFoundError(f"no shards found in {source!r}")
    return fmt.index_shards(paths)


def _fingerprint(manifest: fmt.Manifest) -> str:
    listing = [[shard.name, shard.samples] for shard in manifest.shards]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


class _OpenShard:
    def __init__(self, index: fmt.ShardIndex) -> None:
        self.index = index
        self.file = open(index.path, "rb") if index.samples else None

    def read(self, offset: int, size: int) -> bytes:
        self.file.seek(offset)
        data = self.file.read(size)
        if len(data) != size:
            raise OSError(f"short read at byte {offset}: {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class PromptShardReader:
    """An endless, deterministic stream of :class:`PromptSample` for one data-parallel rank.

    Args:
        source: a directory (with ``manifest.json``, or else all ``*.tar`` in it), a manifest
            path, a glob, a list of shard paths, or a :class:`~mfmegatron.data.format.Manifest`.
        rank, world_size: this reader's data-parallel rank and the data-parallel size. Ranks
            read disjoint samples. Tensor/pipeline/context-parallel peers of one data-parallel
            rank use the same ``rank`` (see :func:`data_parallel_rank_and_size`).
        seed: the order's seed; ``shuffle=False`` reads shards and samples in stored order.
        window_shards: shards whose samples are shuffled together (the "shuffle buffer");
            ``None`` or 0 shuffles whole epochs (for datasets of up to a few hundred shards).
            ``window_shards + 1`` shards (at most 256) are kept open, each with a file handle
            and its member index.
        load_embeddings: read the ``.t5.npy`` / ``.t5mask.npy`` / ``.clip.npy`` members when
            present (otherwise they are seeked over).
        epochs: stop after this many epochs (``StopIteration``); ``None`` never stops.

    Damaged data never stops the stream: a shard that cannot be read, a truncated or corrupt
    one, and a sample without ``.txt`` or with an undecodable member are skipped with one
    :class:`ShardReadWarning` naming the shard or sample, and counted in :attr:`counters`.
    """

    def __init__(
        self,
        source,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        window_shards: int | None = 16,
        load_embeddings: bool = True,
        epochs: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.manifest, scan_errors = _resolve_source(source)
        self.samples_per_epoch = self.manifest.num_samples
        if self.samples_per_epoch == 0:
            raise ValueError(f"no samples in {source!r}")
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.window_shards = window_shards or None
        self.load_embeddings = load_embeddings
        self.epochs = epochs
        self.fingerprint = _fingerprint(self.manifest)
        self._counts = [shard.samples for shard in self.manifest.shards]
        self._orders: OrderedDict[int, EpochOrder] = OrderedDict()
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        # The current window's shards stay open (file handle + member index each); a whole-epoch
        # shuffle over many shards re-indexes shards as they cycle through this cap.
        self._max_open = min((self.window_shards or len(self._counts)) + 1, MAX_OPEN_SHARDS)
        self._warned: set[str] = set()
        self._consecutive_skips = 0
        self._reset(base=0, done=[], processed=0)
        self._counters = {"delivered": 0, "skipped": 0, "bad_samples": 0}
        self._bad_shards: set[str] = set()
        # Without a manifest, damage found while counting was excluded from the counts: warn now.
        self._scan_bad: set[str] = set()
        for path, error in scan_errors.items():
            self._scan_bad.add(os.path.basename(path))
            self._warn_once(
                path,
                f"shard {path}: {error}; only its readable samples are counted (the "
                "builder's manifest.json avoids this scan)",
            )
        self._bad_shards |= self._scan_bad

    # -- position bookkeeping -----------------------------------------------------------------

    def _reset(self, base: int, done: list[int], processed: int) -> None:
        self._base, self._done, self._processed = base, list(done), processed

    def _next_position(self) -> int:
        return nth_remaining(self._base, self._done, self.rank + self.world_size * self._processed)

    @property
    def epoch(self) -> int:
        """The epoch of the next position this rank reads."""
        return self._next_position() // self.samples_per_epoch

    @property
    def counters(self) -> dict[str, int]:
        """Samples delivered, positions skipped, bad samples, distinct bad shards (this rank)."""
        return {**self._counters, "bad_shards": len(self._bad_shards)}

    def _order(self, epoch: int) -> EpochOrder:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.popitem(last=False)
            self._orders[epoch] = EpochOrder(
                self._counts, self.seed, epoch, self.shuffle, self.window_shards
            )
        return self._orders[epoch]

    # -- reading ------------------------------------------------------------------------------

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, ShardReadWarning, stacklevel=4)

    def _shard(self, shard: int) -> _OpenShard:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        info = self.manifest.shards[shard]
        index = fmt.scan_shard(info.path)
        if index.error is not None or len(index.samples) < info.samples:
            self._bad_shards.add(info.name)
            reason = index.error or "fewer samples than the manifest lists"
            lost = info.samples - min(len(index.samples), info.samples)
            self._warn_once(
                info.path,
                f"shard {info.path}: {reason}; {lost} of its {info.samples} samples are skipped",
            )
        elif len(index.samples) > info.samples:
            self._warn_once(
                info.path,
                f"shard {info.path} has {len(index.samples)} samples but the manifest lists "
                f"{info.samples}; the extra samples are not read",
            )
        while len(self._open) >= self._max_open:
            self._open.popitem(last=False)[1].close()
        self._open[shard] = _OpenShard(index)
        return self._open[shard]

    def _bad_sample(self, shard_path: str, key: str, why: str) -> None:
        self._counters["bad_samples"] += 1
        self._warn_once(f"{shard_path}:{key}", f"sample {key!r} in shard {shard_path}: {why}; skipped")

    def _read(self, shard: int, index: int, epoch: int, position: int) -> PromptSample | None:
        info = self.manifest.shards[shard]
        open_shard = self._shard(shard)
        if index >= len(open_shard.index.samples):
            return None  # lost to a damaged shard (already warned and counted)
        key, members = open_shard.index.samples[index]
        try:
            if fmt.TXT not in members:
                self._bad_sample(info.path, key, "no .txt member")
                return None
            prompt = open_shard.read(*members[fmt.TXT]).decode("utf-8")
            meta = None
            if fmt.JSON in members:
                meta = json.loads(open_shard.read(*members[fmt.JSON]))
            sample = PromptSample(key, prompt, meta, info.name, epoch, position)
            if self.load_embeddings:
                self._read_embeddings(open_shard, members, sample)
        except OSError as error:
            # The file changed or failed under us: nothing after this point in it is trusted.
            self._bad_shards.add(info.name)
            open_shard.index.samples = open_shard.index.samples[:index]
            self._warn_once(
                info.path, f"shard {info.path}: read failed at sample {key!r} ({error}); the rest "
                "of this shard is skipped",
            )
            return None
        except ValueError as error:  # UnicodeDecodeError, JSONDecodeError, bad .npy
            self._bad_sample(info.path, key, f"undecodable ({error})")
            return None
        return sample

    def _read_embeddings(self, open_shard: _OpenShard, members, sample: PromptSample) -> None:
        if fmt.T5 in members:
            t5 = fmt.load_npy(open_shard.read(*members[fmt.T5]))
            if t5.ndim != 2:
                raise ValueError(f".t5.npy has shape {t5.shape}, expected [tokens, dim]")
            sample.t5 = fmt.storage_to_tensor(t5)
            if fmt.T5_MASK in members:
                mask = fmt.load_npy(open_shard.read(*members[fmt.T5_MASK]))
                if mask.shape != (t5.shape[0],):
                    raise ValueError(f".t5mask.npy has shape {mask.shape}, expected ({t5.shape[0]},)")
                sample.t5_mask = torch.from_numpy(mask.astype(bool))
            else:
                sample.t5_mask = torch.ones(t5.shape[0], dtype=torch.bool)
        if fmt.CLIP in members:
            pooled = fmt.load_npy(open_shard.read(*members[fmt.CLIP]))
            if pooled.ndim != 1:
                raise ValueError(f".clip.npy has shape {pooled.shape}, expected [dim]")
            sample.pooled = fmt.storage_to_tensor(pooled)

    def __iter__(self) -> Iterator[PromptSample]:
        return self

    def __next__(self) -> PromptSample:
        while True:
            position = self._next_position()
            epoch, in_epoch = divmod(position, self.samples_per_epoch)
            if self.epochs is not None and epoch >= self.epochs:
                raise StopIteration
            shard, index = self._order(epoch).locate(in_epoch)
            sample = self._read(shard, index, epoch, position)
            self._processed += 1
            if sample is not None:
                self._consecutive_skips = 0
                self._counters["delivered"] += 1
                return sample
            self._counters["skipped"] += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= self.samples_per_epoch:
                raise NoReadableSamplesError(
                    f"rank {self.rank}: {self._consecutive_skips} positions in a row were "
                    f"unreadable (an epoch has {self.samples_per_epoch}); counters {self.counters}"
                )

    def take(self, n: int) -> list[PromptSample]:
        """The next ``n`` samples (fewer if a finite reader ends)."""
        out: list[PromptSample] = []
        while len(out) < n:
            try:
                out.append(next(self))
            except StopIteration:
                break
        return out

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    # -- checkpointing ------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window_shards": self.window_shards,
            "fingerprint": self.fingerprint,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-serialisable). Restore it with :meth:`load_state_dict` on
        the same rank of the same data-parallel size, or merge all ranks' states with
        :func:`merge_state_dicts` to resume with any data-parallel size."""
        return {
            "format": STATE_FORMAT,
            "kind": "rank",
            **self._config(),
            "base": self._base,
            "done": list(self._done),
            "world_size": self.world_size,
            "rank": self.rank,
            "processed": self._processed,
            "counters": dict(self._counters),
            "bad_shards": sorted(self._bad_shards),
        }

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Continues from a state: this rank's own (same data-parallel size), a merged one from
        :func:`merge_state_dicts` / :func:`gather_state_dict` (any size), or the list of all
        ranks' states (merged here)."""
        if not isinstance(state, dict):
            state = merge_state_dicts(list(state))
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a PromptShardReader state (format={state.get('format')!r})")
        for name, value in self._config().items():
            if state[name] != value:
                raise ValueError(
                    f"state was saved with {name}={state[name]!r} but this reader has "
                    f"{name}={value!r}; the sample order would differ"
                    + (" (the shard list or counts changed)" if name == "fingerprint" else "")
                )
        self.close()
        if state["kind"] == "rank":
            if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
                raise ValueError(
                    f"state of rank {state['rank']} of {state['world_size']} loaded into rank "
                    f"{self.rank} of {self.world_size}: load each rank's own state, or merge all "
                    "ranks' states (merge_state_dicts / gather_state_dict) to change the "
                    "data-parallel size"
                )
            self._reset(state["base"], state["done"], state["processed"])
            counters, bad = state["counters"], state["bad_shards"]
        elif state["kind"] == "global":
            self._reset(state["base"], state["done"], 0)
            # Cumulative counts continue on rank 0 only, so a sum over ranks stays right.
            keep = self.rank == 0
            counters = state["counters"] if keep else {k: 0 for k in self._counters}
            bad = state["bad_shards"] if keep else []
        else:
            raise ValueError(f"unknown state kind {state['kind']!r}")
        self._counters = {k: int(counters.get(k, 0)) for k in self._counters}
        self._bad_shards = set(bad) | self._scan_bad
        self._consecutive_skips = 0


def merge_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """All ranks' :meth:`PromptShardReader.state_dict` -> one state any data-parallel size loads.

    The merged state lists exactly the positions the ranks consumed; loading it with the same
    data-parallel size and no faults seen continues each rank exactly as without the restart.
    """
    if not states:
        raise ValueError("no states to merge")
    if all(s.get("kind") == "global" for s in states):
        if len(states) == 1:
            return dict(states[0])
    if any(s.get("kind") != "rank" for s in states):
        raise ValueError("merge_state_dicts takes the per-rank states of one run (kind='rank')")
    first = states[0]
    world = first["world_size"]
    shared = ("format", "seed", "shuffle", "window_shards", "fingerprint", "samples_per_epoch",
              "base", "done", "world_size")  # fmt: skip
    for state in states:
        for name in shared:
            if state[name] != first[name]:
                raise ValueError(f"states disagree on {name}: {state[name]!r} vs {first[name]!r}")
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(world)):
        raise ValueError(f"need the states of ranks 0..{world - 1} exactly once, got ranks {ranks}")
    processed = [0] * world
    for state in states:
        processed[state["rank"]] = state["processed"]
    base, done = merge_consumed(first["base"], first["done"], world, processed)
    counters: dict[str, int] = {}
    for state in states:
        for name, value in state["counters"].items():
            counters[name] = counters.get(name, 0) + value
    merged = {k: first[k] for k in shared if k not in ("base", "done", "world_size")}
    merged.update(
        kind="global",
        base=base,
        done=done,
        counters=counters,
        bad_shards=sorted({name for s in states for name in s["bad_shards"]}),
    )
    return merged


def gather_state_dict(stateful, group=None) -> dict[str, Any]:
    """All-gathers the readers' (or loaders') states over the data-parallel ``group`` and merges
    them; every rank gets the same dict, which one rank can save.

    ``group`` defaults to megatron's data-parallel group (without context parallel) when its
    groups exist — tensor/pipeline peers hold copies of the same state and must not be merged
    twice — else the whole world.
    """
    import sys

    import torch.distributed as dist

    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if group is None and parallel_state is not None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_data_parallel_group(with_context_parallel=False)
    local = stateful.state_dict()
    states: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, local, group=group)
    return merge_state_dicts(states)


def data_parallel_rank_and_size() -> tuple[int, int]:
    """The reader's ``(rank, world_size)``: megatron's data-parallel rank and size when its
    groups exist (context-parallel peers share samples, so ``with_context_parallel=False``), else
    torch.distributed's, else (0, 1)."""
    import sys

    import torch.distributed as dist

    # Only look at megatron when it is already imported: its groups cannot exist otherwise, and
    # importing it costs seconds.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return (
            parallel_state.get_data_parallel_rank(with_context_parallel=False),
            parallel_state.get_data_parallel_world_size(with_context_parallel=False),
        )

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
