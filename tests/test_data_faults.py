"""Damaged data: a truncated shard, a garbage shard, a shard with a corrupt header and a sample
without ``.txt`` are each skipped with one warning naming them, counted, and every other sample of
the epoch is still delivered."""

from __future__ import annotations

import warnings

import pytest

from mfmegatron.data import (
    Manifest,
    NoReadableSamplesError,
    PromptShardReader,
    ShardInfo,
    ShardReadWarning,
    ShardWriter,
    scan_shard,
)

PER_SHARD = 6
N_SHARDS = 6
TRUNCATED, GARBAGE, CORRUPT, NO_TXT = 1, 4, 2, 3
NO_TXT_KEY = "s3-k2"


def _write(root):
    with ShardWriter(root, PER_SHARD) as writer:
        for shard in range(N_SHARDS):
            for i in range(PER_SHARD):
                key = f"s{shard}-k{i}"
                members = {"txt": f"prompt {key}".encode(), "json": b'{"i": %d}' % i}
                if key == NO_TXT_KEY:
                    del members["txt"]
                writer.write(key, members)
    Manifest(writer.shards).write(root / "manifest.json")
    paths = [info.path for info in writer.shards]

    data = open(paths[TRUNCATED], "rb").read()
    open(paths[TRUNCATED], "wb").write(data[: len(data) // 2 - 300])  # inside a member
    open(paths[GARBAGE], "wb").write(bytes(range(256)) * 40)
    # Overwrite the header of the third sample's first member with junk (size unchanged).
    index = scan_shard(paths[CORRUPT])
    header_at = index.samples[2][1]["txt"][0] - 512
    data = bytearray(open(paths[CORRUPT], "rb").read())
    data[header_at : header_at + 512] = b"\xff" * 512
    open(paths[CORRUPT], "wb").write(bytes(data))
    return paths


@pytest.fixture()
def damaged(tmp_path):
    return tmp_path, _write(tmp_path)


def _read_all(source, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        readers = [
            PromptShardReader(source, rank=r, epochs=1, **kw) for r in range(kw.get("world_size", 1))
        ]
        samples = [s for reader in readers for s in reader]
    messages = [str(w.message) for w in caught if issubclass(w.category, ShardReadWarning)]
    return readers, samples, messages


def _good_keys():
    bad_shards = {TRUNCATED, GARBAGE, CORRUPT}
    return {
        f"s{s}-k{i}"
        for s in range(N_SHARDS)
        for i in range(PER_SHARD)
        if s not in bad_shards and f"s{s}-k{i}" != NO_TXT_KEY
    }


def test_damaged_shards_and_samples_are_skipped_once_each_and_counted(damaged):
    root, paths = damaged
    (reader,), samples, messages = _read_all(root, seed=3, window_shards=2)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys))
    delivered = set(keys)
    assert _good_keys() <= delivered
    # From damaged shards only samples before the damage may come through.
    assert {k for k in delivered if k.startswith(f"s{CORRUPT}-")} <= {f"s{CORRUPT}-k0"}
    assert {k for k in delivered if k.startswith(f"s{GARBAGE}-")} == set()
    assert all(s.prompt == f"prompt {s.key}" for s in samples)

    # One warning per damaged shard and one for the sample without text; each names it.
    assert len(messages) == 4, messages
    for shard in (TRUNCATED, GARBAGE, CORRUPT):
        assert sum(paths[shard] in m for m in messages) == 1
    assert sum(NO_TXT_KEY in m and "no .txt" in m for m in messages) == 1
    assert any("truncated" in m for m in messages if paths[TRUNCATED] in m)

    counters = reader.counters
    assert counters["delivered"] == len(samples)
    assert counters["skipped"] == N_SHARDS * PER_SHARD - len(samples)
    assert counters["bad_shards"] == 3 and counters["bad_samples"] == 1
    assert reader.state_dict()["bad_shards"] == sorted(
        f"shard-{i:06d}.tar" for i in (TRUNCATED, GARBAGE, CORRUPT)
    )


def test_two_ranks_deliver_the_same_good_samples(damaged):
    root, _ = damaged
    _, single, _ = _read_all(root, seed=3)
    readers, both, _ = _read_all(root, seed=3, world_size=2)
    assert sorted(s.key for s in both) == sorted(s.key for s in single)
    total = {k: sum(r.counters[k] for r in readers) for k in ("delivered", "skipped")}
    assert total == {"delivered": len(single), "skipped": N_SHARDS * PER_SHARD - len(single)}


def test_without_a_manifest_damage_is_found_while_counting(damaged):
    root, paths = damaged
    (reader,), samples, messages = _read_all(str(root / "*.tar"), seed=3)
    assert _good_keys() <= {s.key for s in samples}
    assert len(messages) == 4
    assert reader.counters["bad_shards"] == 3
    assert reader.samples_per_epoch < N_SHARDS * PER_SHARD  # damaged parts are not planned


def test_a_dataset_with_nothing_readable_raises_instead_of_spinning(tmp_path):
    for i in range(2):
        (tmp_path / f"g{i}.tar").write_bytes(b"not a tar file" * 100)
    manifest = Manifest([ShardInfo(str(tmp_path / f"g{i}.tar"), 5) for i in range(2)])
    reader = PromptShardReader(manifest)
    with pytest.warns(ShardReadWarning), pytest.raises(NoReadableSamplesError):
        reader.take(1)
