"""tools.bench_hunyuan_image3_meanflow runs one step of each kind of the real model on CPU and
reports the ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mfmegatron.parallel import parallel_context

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "64", "--heads", "4", "--groups", "2", "--layers", "1", "--experts", "8", "--topk", "2",
        "--expert-width", "32", "--latent-side", "4", "--prompt-tokens", "4", "--latent-channels", "4",
        "--patch-width", "32", "--timestep-dim", "32", "--norm-groups", "4"]


def test_one_step_each_reports_time_and_memory_ratios(tmp_path):
    args = [*TINY, "--warmup", "0", "--repeats", "1", "--recompute", "--json", str(tmp_path / "bench.json")]
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench_hunyuan_image3_meanflow", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "8 experts top-2" in result.stdout and "recompute" in result.stdout
    assert "GroupNorm(4)" in result.stdout and "4x4 latent tokens" in result.stdout
    assert "r-embedding does not exist" in result.stdout
    for step in ("flow_matching", "meanflow_differential"):
        assert f"\n{step} " in result.stdout
    rows = {row["name"]: row for row in json.loads((tmp_path / "bench.json").read_text())["results"]}
    differential = rows["meanflow_differential"]
    assert differential["time_ratio"] > 0 and differential["peak_ratio"] > 0
    assert differential["saved_bytes"] > 0 and rows["flow_matching"]["time_ratio"] == 1.0


def test_both_steps_run_the_real_model(monkeypatch):
    """Each step reaches the student's image path and experts through backward; only the
    differential step carries a tangent through the MoE."""
    import models.hunyuan_image3.model as hunyuan
    from tools import bench_hunyuan_image3_meanflow as bench

    moe_calls = []

    def counting_moe_forward_jvp(moe, x, tx=None):
        moe_calls.append(tx is not None)
        return original(moe, x, tx)

    original = hunyuan.moe_forward_jvp
    monkeypatch.setattr(hunyuan, "moe_forward_jvp", counting_moe_forward_jvp)
    args = bench.parse_args(TINY)
    with parallel_context():
        teacher, student, module = bench.build(args)
        inputs = bench.batch(args)
        for step in bench.steps(teacher, student):
            moe_calls.clear()
            step(*inputs)
            grads = {name: param.grad for name, param in module.named_parameters()}
            module.zero_grad(set_to_none=True)
            # Teacher and student forward, one layer each: the tangent only in the student's.
            tangent = step.__name__ == "meanflow_differential"
            assert sorted(moe_calls) == [False, tangent], step.__name__
            for name in hunyuan.IMAGE_PATH_MODULES:
                assert all(grads[key] is not None for key in grads if key.startswith(name + ".")), name
            assert any(grads[key] is not None for key in grads if ".local_experts." in key)
            assert not any(p.grad is not None for p in teacher.model.parameters())
