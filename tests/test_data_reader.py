"""Prompt-shard reader: every prompt once per epoch over data-parallel ranks, a seeded order that
changes with seed and epoch, and exact resumption (same and different data-parallel sizes)."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter

import pytest

from mfmegatron.data import (
    PromptBatchLoader,
    PromptShardReader,
    build_prompt_shards,
    merge_state_dicts,
)

N = 103  # prompts: 11 shards of 10 with a short last one


def _prompts(n=N):
    return [f"prompt {i}: a {['red', 'blue', 'green'][i % 3]} thing number {i}" for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    (root / "prompts.txt").write_text("\n".join(_prompts()) + "\n")
    build_prompt_shards([root / "prompts.txt"], root / "shards", samples_per_shard=10)
    return root / "shards"


def _reader(shards, **kw):
    kw.setdefault("seed", 7)
    kw.setdefault("window_shards", 3)
    return PromptShardReader(shards, **kw)


def windowed_manifest(shards):
    return PromptShardReader(shards).manifest


def _keys(samples):
    return [s.key for s in samples]


# -- building from each input format -----------------------------------------------------------


def test_txt_csv_jsonl_inputs_read_back_in_order_with_metadata(tmp_path):
    prompts = _prompts(25)
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "caption", "source"])
        writer.writerows([[i, p, "csv"] for i, p in enumerate(prompts)])
    with open(tmp_path / "p.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "data": {"text": p}, "source": "jsonl"}) + "\n")

    options = {"p.txt": {}, "p.csv": {"column": "caption"}, "p.jsonl": {"field": "data.text"}}
    for name, kw in options.items():
        out = tmp_path / name.replace(".", "_")
        summary = build_prompt_shards([tmp_path / name], out, samples_per_shard=4, **kw)
        assert summary.samples == 25 and len(summary.manifest.shards) == 7
        samples = list(PromptShardReader(out, shuffle=False, epochs=1))
        assert [s.prompt for s in samples] == prompts, name
        if name == "p.txt":
            assert all(s.meta is None for s in samples)
        else:
            assert samples[3].meta["id"] in (3, "3") and samples[3].meta["source"] == name[2:]
            assert "caption" not in samples[3].meta and "data" not in samples[3].meta


# -- order -------------------------------------------------------------------------------------


def test_two_ranks_read_every_prompt_exactly_once_per_epoch(shards):
    per_rank = [list(_reader(shards, rank=r, world_size=2, epochs=3)) for r in range(2)]
    for epoch in range(3):
        parts = [[s.prompt for s in samples if s.epoch == epoch] for samples in per_rank]
        assert set(parts[0]).isdisjoint(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(_prompts())
        assert abs(len(parts[0]) - len(parts[1])) <= 1
    # Epochs reshuffle; shuffling is not the stored order.
    rank0 = [[s.key for s in per_rank[0] if s.epoch == e] for e in range(3)]
    assert rank0[0] != rank0[1] and rank0[1] != rank0[2]
    stored = sorted(rank0[0])
    assert rank0[0] != stored


def test_order_is_a_function_of_the_seed(shards):
    first = _keys(_reader(shards, rank=1, world_size=2).take(60))
    again = _keys(_reader(shards, rank=1, world_size=2).take(60))
    other = _keys(_reader(shards, rank=1, world_size=2, seed=8).take(60))
    assert first == again
    assert first != other


def test_whole_epoch_shuffle_and_unshuffled_order(shards):
    everything = list(_reader(shards, window_shards=None, epochs=1))
    assert sorted(_keys(everything)) == [f"{i:010d}" for i in range(N)]
    # A window of 3 shards keeps each window's samples together; a full shuffle mixes them.
    windowed = list(_reader(shards, epochs=1))
    counts = {info.name: info.samples for info in windowed_manifest(shards).shards}
    first: list[str] = []
    for sample in windowed:
        first += [sample.shard] if sample.shard not in first else []
        if len(first) == 3:
            break
    size = sum(counts[name] for name in first)
    assert {s.shard for s in windowed[:size]} == set(first)
    assert windowed[size].shard not in first
    assert len({s.shard for s in everything[:size]}) > 3
    in_order = list(PromptShardReader(shards, shuffle=False, epochs=1))
    assert _keys(in_order) == [f"{i:010d}" for i in range(N)]


# -- resumption --------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("k", [0, 17, 51, 52, 60])
def test_resume_continues_exactly_like_the_uninterrupted_run(shards, world, k):
    # 2 ranks x 60 samples cross the epoch boundary (103 per epoch); k=51/52 stop right at it.
    total = 60 if world == 2 else 130
    for rank in range(world):
        uninterrupted = _keys(_reader(shards, rank=rank, world_size=world).take(total))
        before = _reader(shards, rank=rank, world_size=world)
        head = _keys(before.take(k))
        state = json.loads(json.dumps(before.state_dict()))  # survives a JSON checkpoint
        after = _reader(shards, rank=rank, world_size=world)
        after.load_state_dict(state)
        assert head + _keys(after.take(total - k)) == uninterrupted


def test_merged_state_with_the_same_world_continues_exactly(shards):
    readers = [_reader(shards, rank=r, world_size=2) for r in range(2)]
    for reader in readers:
        reader.take(40)
    merged = merge_state_dicts([r.state_dict() for r in readers])
    assert merged["done"] == [] and merged["base"] == 80
    for rank in range(2):
        resumed = _reader(shards, rank=rank, world_size=2)
        resumed.load_state_dict(merged)
        uninterrupted = _reader(shards, rank=rank, world_size=2).take(90)
        assert _keys(resumed.take(50)) == _keys(uninterrupted[40:])


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_with_another_data_parallel_size_neither_repeats_nor_skips(shards, new_world):
    # Ranks stopped at different counts (as after skipping unreadable samples); rank 1 is
    # already in epoch 1.
    old = [_reader(shards, rank=r, world_size=2) for r in range(2)]
    seen = old[0].take(45) + old[1].take(56)
    assert {s.epoch for s in seen} == {0, 1}
    states = [r.state_dict() for r in old]

    new = [_reader(shards, rank=r, world_size=new_world, epochs=2) for r in range(new_world)]
    for reader in new:
        reader.load_state_dict(states)  # the list of all ranks' states is merged on load
    rest = [s for reader in new for s in reader]
    for epoch in range(2):
        keys = [s.key for s in seen + rest if s.epoch == epoch]
        assert sorted(keys) == [f"{i:010d}" for i in range(N)], epoch
    if new_world == 3:
        counts = [sum(1 for _ in r.take(10**6)) for r in new]
        assert counts == [0, 0, 0]


def test_loader_state_is_the_last_delivered_batch_despite_prefetch(shards):
    uninterrupted = PromptBatchLoader(_reader(shards, rank=1, world_size=2), 4, prefetch=0)
    expected = [next(uninterrupted).keys for _ in range(8)]

    loader = PromptBatchLoader(_reader(shards, rank=1, world_size=2), 4, prefetch=3)
    got = [next(loader).keys]
    deadline = time.monotonic() + 20
    while not loader._queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loader._queue.full()  # the thread has read ahead of the trainer
    got += [next(loader).keys for _ in range(2)]
    assert loader.reader.state_dict()["processed"] > 12
    state = loader.state_dict()
    assert state["processed"] == 12
    assert loader.counters["delivered"] == 12
    loader.close()

    resumed = PromptBatchLoader(_reader(shards, rank=1, world_size=2), 4, prefetch=2)
    resumed.load_state_dict(state)
    got += [next(resumed).keys for _ in range(5)]
    resumed.close()
    assert got == expected


def test_finite_loader_ends_with_a_partial_batch(shards):
    loader = PromptBatchLoader(_reader(shards, epochs=1), 10, prefetch=2)
    sizes = [len(batch) for batch in loader]
    assert sizes == [10] * 10 + [3]


def test_a_state_from_another_layout_or_order_is_refused(shards):
    reader = _reader(shards, rank=0, world_size=2)
    reader.take(5)
    state = reader.state_dict()
    with pytest.raises(ValueError, match="merge"):
        _reader(shards, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        _reader(shards, rank=0, world_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="ranks 0..1"):
        merge_state_dicts([state])
    changed = dict(state, fingerprint="0" * 16)
    with pytest.raises(ValueError, match="shard list"):
        _reader(shards, rank=0, world_size=2).load_state_dict(changed)
