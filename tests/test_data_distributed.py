"""The reader under real torch.distributed ranks (gloo, spawned with ``run_on_ranks``): ranks
take their data-parallel rank from the process groups, their states are all-gathered and merged,
and the merged state resumes with another data-parallel size; under tensor parallelism both TP
ranks of one data-parallel rank read the same samples and their states are merged once."""

from __future__ import annotations

from mfmegatron.data import PromptShardReader, build_prompt_shards
from mfmegatron.parallel import run_on_ranks

N = 40


def _read_and_gather(shards):
    import torch.distributed as dist

    from mfmegatron.data import PromptShardReader, data_parallel_rank_and_size, gather_state_dict
    from mfmegatron.parallel import initialize_parallel

    dist.init_process_group("gloo")
    rank, world = data_parallel_rank_and_size()
    reader = PromptShardReader(shards, rank=rank, world_size=world, seed=3, window_shards=2)
    seen = [s.key for s in reader.take(9 + 4 * rank)]
    merged = gather_state_dict(reader)

    initialize_parallel(tensor_parallel_size=2)  # same two processes: one data-parallel rank
    dp = data_parallel_rank_and_size()
    tp_reader = PromptShardReader(shards, rank=dp[0], world_size=dp[1], seed=3, window_shards=2)
    tp_keys = [s.key for s in tp_reader.take(5)]
    tp_state = gather_state_dict(tp_reader)
    return (rank, world), seen, merged, dp, tp_keys, tp_state


def test_gathered_states_resume_with_another_data_parallel_size(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(N)))
    build_prompt_shards([tmp_path / "p.txt"], tmp_path / "s", samples_per_shard=10)
    results = run_on_ranks(_read_and_gather, 2, str(tmp_path / "s"), timeout=120)

    assert [r[0] for r in results] == [(0, 2), (1, 2)]
    merged = results[0][2]
    assert results[1][2] == merged and merged["kind"] == "global"
    seen = results[0][1] + results[1][1]
    assert len(seen) == 22 and len(set(seen)) == 22

    rest = []
    for rank in range(3):
        reader = PromptShardReader(
            tmp_path / "s", rank=rank, world_size=3, seed=3, window_shards=2, epochs=1
        )
        reader.load_state_dict(merged)
        rest += [s.key for s in reader]
    assert sorted(seen + rest) == [f"{i:010d}" for i in range(N)]

    # Tensor parallel: both TP ranks are data-parallel rank 0 of 1 and read the same samples.
    assert [r[3] for r in results] == [(0, 1), (0, 1)]
    assert results[0][4] == results[1][4]
    assert results[0][5]["base"] == 5 and results[0][5] == results[1][5]
