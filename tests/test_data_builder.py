"""The shard builder CLI end to end, its input handling (dedup, empties, bad lines, limit), the
manifest-only mode, and WebDataset compatibility of the shards it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfmegatron.data import DummyTextEncoder, Manifest, PromptShardReader, build_prompt_shards
from tools.build_prompt_shards import main as build_main

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def test_cli_end_to_end_with_dedup_progress_and_dummy_embeddings(tmp_path):
    rows = [{"text": f"prompt {i % 30}", "id": i} for i in range(45)]  # 15 duplicates
    rows += [{"text": "   "}, {"other": "no text"}, "{not json", {"text": "prompt  7"}]
    _jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "tools.build_prompt_shards", str(tmp_path / "in.jsonl"),
           "--out", str(out), "--field", "text", "--dedup", "--samples-per-shard", "8",
           "--encoder", "dummy", "--dummy-t5-dim", "8", "--dummy-pooled-dim", "4",
           "--max-length", "6", "--embed-dtype", "bf16", "--progress-interval", "0"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[build_prompt_shards]" in done.stderr and "ETA" in done.stderr
    assert "/49 records" in done.stderr  # the ETA's total: every input line
    assert "wrote 30 samples in 4 shards" in done.stdout
    assert "dropped 16 duplicates, 1 empty, 1 without the prompt field, 1 invalid" in done.stdout

    manifest = Manifest.read(out / "manifest.json")
    assert [s.samples for s in manifest.shards] == [8, 8, 8, 6]
    assert manifest.fields["t5"]["dtype"] == "bfloat16" and manifest.extra["encoder"]["name"] == "dummy"
    samples = list(PromptShardReader(out, shuffle=False, epochs=1))
    assert [s.prompt for s in samples] == [f"prompt {i}" for i in range(30)]
    assert samples[4].meta == {"id": 4}
    want = DummyTextEncoder(t5_dim=8, pooled_dim=4, max_length=6).encode(["prompt 4"])
    assert torch.equal(samples[4].t5, want.t5[0].bfloat16())


def test_csv_limit_overwrite_and_errors(tmp_path, capsys):
    rows = "".join(f"picture {i},{i}\n" for i in range(20))
    (tmp_path / "p.csv").write_text("caption,score\n" + rows)
    out = tmp_path / "out"
    assert build_main([str(tmp_path / "p.csv"), "--out", str(out), "--column", "caption",
                       "--limit", "7", "--samples-per-shard", "5", "--quiet"]) == 0  # fmt: skip
    assert "wrote 7 samples in 2 shards" in capsys.readouterr().out
    metas = [s.meta for s in PromptShardReader(out, shuffle=False, epochs=1)]
    assert metas[:2] == [{"score": "0"}, {"score": "1"}]
    for argv, message in [
        (["--column", "caption"], "is not empty"),
        (["--overwrite"], "no column 'prompt'; the columns are ['caption', 'score']"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            build_main([str(tmp_path / "p.csv"), "--out", str(out), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert len(list(out.glob("*.tar"))) == 2  # a bad input never touches the old output
    assert build_main([str(tmp_path / "p.csv"), "--out", str(out), "--column", "caption",
                       "--overwrite", "--no-meta", "--quiet"]) == 0  # fmt: skip
    assert len(list(out.glob("*.tar"))) == 1
    assert all(s.meta is None for s in PromptShardReader(out, epochs=1))


def test_same_input_gives_byte_identical_shards(tmp_path):
    (tmp_path / "p.txt").write_text("".join(f"line {i}\n" for i in range(12)))
    for name in ("a", "b"):
        build_prompt_shards([tmp_path / "p.txt"], tmp_path / name, samples_per_shard=5)
    for shard in ("shard-000000.tar", "shard-000002.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_index_mode_writes_a_manifest_for_existing_shards(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("".join(f"line {i}\n" for i in range(12)))
    build_prompt_shards([tmp_path / "p.txt"], tmp_path / "made", samples_per_shard=5)
    (tmp_path / "made" / "manifest.json").unlink()
    assert build_main([str(tmp_path / "made"), "--index", "--out", str(tmp_path / "made")]) == 0
    assert "indexed 3 shards" in capsys.readouterr().out
    manifest = Manifest.read(tmp_path / "made" / "manifest.json")
    assert [s.samples for s in manifest.shards] == [5, 5, 2]
    assert sorted(s.prompt for s in PromptShardReader(tmp_path / "made", epochs=1)) == sorted(
        f"line {i}" for i in range(12)
    )


def test_shards_are_readable_by_the_webdataset_package(tmp_path):
    import webdataset as wds

    (tmp_path / "p.txt").write_text("".join(f"line {i}\n" for i in range(12)))
    build_prompt_shards([tmp_path / "p.txt"], tmp_path / "s", samples_per_shard=5,
                        encoder=DummyTextEncoder(t5_dim=8, pooled_dim=4, max_length=6))  # fmt: skip
    urls = sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert [s["txt"] for s in samples] == [f"line {i}" for i in range(12)]
    assert samples[0]["__key__"] == "0000000000"
    assert samples[0]["t5.npy"].shape == (6, 8) and samples[0]["clip.npy"].shape == (4,)
