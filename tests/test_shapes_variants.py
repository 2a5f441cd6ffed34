"""The variant sweep's bookkeeping (tools/shapes_variants.py): cumulative teacher forwards from the
per-step log, the equal-forwards pick and the table, on logs written here (no training)."""

from __future__ import annotations

import json

import pytest

from tools import shapes_variants


def _write_log(directory, forwards_per_step, scores, steps=4, eval_every=2, switch=None):
    directory.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "forwards_teacher": forwards_per_step,
               "phase_differential": float(switch is not None and step >= switch)}
        if step % eval_every == 0:
            for s in (1, 2, 4):
                row[f"eval_student_{s}_overall"] = scores[step]
                row[f"eval_student_{s}_paired_rmse"] = 0.1
            row["eval_teacher_50_overall"] = 0.9
        rows.append(row)
    (directory / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_equal_teacher_forwards_picks_the_evaluation_within_the_smallest_budget(tmp_path):
    # Variant a spends 2 teacher forwards per step, b spends 4: the budget is a's total (8), which
    # b reached at step 2.
    for seed in (0, 1):
        _write_log(shapes_variants.run_directory(tmp_path, "a", seed), 2.0, {2: 0.2, 4: 0.4 + seed / 10}, switch=1)
        _write_log(shapes_variants.run_directory(tmp_path, "b", seed), 4.0, {2: 0.5, 4: 0.7})
    assert shapes_variants.finished(shapes_variants.run_directory(tmp_path, "a", 0), steps=4)
    assert not shapes_variants.finished(shapes_variants.run_directory(tmp_path, "a", 0), steps=6)

    runs = {v: {s: shapes_variants.evaluations(shapes_variants.read_log(
        shapes_variants.run_directory(tmp_path, v, s) / "log.jsonl")) for s in (0, 1)} for v in ("a", "b")}
    assert [row["teacher_forwards"] for row in runs["b"][0]] == [8.0, 16.0]
    switches = {v: [shapes_variants.switch_step(shapes_variants.read_log(
        shapes_variants.run_directory(tmp_path, v, s) / "log.jsonl")) for s in (0, 1)] for v in ("a", "b")}
    assert switches == {"a": [1, 1], "b": [None, None]}
    table = shapes_variants.summarise(runs, switches=switches, fallback=2).splitlines()
    rows = {(line.split("|")[1].strip()[0], line.split("|")[3].strip()): line for line in table if line.startswith("| a") or line.startswith("| b")}
    assert rows[("a", "equal steps")].split("|")[2].strip() == "1"
    assert rows[("b", "equal steps")].split("|")[2].strip() == "never"
    assert shapes_variants.describe_switch([2, 2], fallback=2) == "fallback"
    assert shapes_variants.describe_switch([40, None], fallback=2) == "40/never"
    assert "| 4 | 8 | 0.450 ± 0.071" in rows[("a", "equal steps")]
    assert "| 4 | 8 | 0.450 ± 0.071" in rows[("a", "equal teacher forwards")]
    assert "| 4 | 16 | 0.700 ± 0.000" in rows[("b", "equal steps")]
    assert "| 2 | 8 | 0.500 ± 0.000" in rows[("b", "equal teacher forwards")]
    assert "teacher 50 steps 0.900" in table[-1]
    # Each variant names the teacher its runs recorded.
    for variant, teacher in (("a", "assets/shapes_teacher"), ("b", "outputs/other")):
        for seed in (0, 1):
            (shapes_variants.run_directory(tmp_path, variant, seed) / "config.json").write_text(
                json.dumps({"model": {"teacher_checkpoint": teacher}}))
    assert shapes_variants.describe_teachers(tmp_path, runs).splitlines() == [
        "Variant a's teacher: assets/shapes_teacher.", "Variant b's teacher: outputs/other."]


def test_each_variant_changes_only_its_own_settings(tmp_path):
    command = shapes_variants.run_command(tmp_path, "b", 3, 300, 50, 2, ["optim.lr=1e-4"])
    assert command[-4:] == ["logging.progress_bar=false", "warmup.policy=fixed", "warmup.switch_step=null", "optim.lr=1e-4"]
    assert "train.seed=3" in command and "train.eval_interval=50" in command and shapes_variants.RECIPE in command
    assert shapes_variants.run_command(tmp_path, "c", 0, 300, 50, 2, [])[-1] == "logging.progress_bar=false"


def test_the_automatic_switch_variants_and_the_smooth_teacher(tmp_path, capsys):
    e = shapes_variants.run_command(tmp_path, "e", 0, 300, 50, 2, [])
    assert e[-3:] == ["warmup.policy=auto", "warmup.auto.min_steps=50", "warmup.auto.max_steps=200"]
    f = shapes_variants.run_command(tmp_path, "f", 0, 300, 50, 2, [], smooth_teacher="teachers/smooth")
    assert f[-4:] == ["warmup.policy=auto", "warmup.auto.min_steps=50", "warmup.auto.max_steps=200",
                      "model.teacher_checkpoint=teachers/smooth"]
    with pytest.raises(SystemExit) as exit_:
        shapes_variants.main(["--out", str(tmp_path / "sweep"), "--variants", "f", "--table-only"])
    assert exit_.value.code == 2
    assert "variant f needs --smooth-teacher" in capsys.readouterr().err
