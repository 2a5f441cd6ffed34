"""tools.bench_flux_meanflow on CPU: its report carries no profiler log lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tools.bench_attention_jvp import PROFILER_LOG_LINE, quiet_profiler_logs

REPO = Path(__file__).resolve().parents[1]


def test_report_has_no_profiler_log_lines(tmp_path):
    # A model of a few thousand parameters: the CPU path profiles every step for its peak memory
    # (and once more with --profile), which is where the profiler's lines came from.
    tiny = ["--hidden", "64", "--heads", "2", "--double", "1", "--single", "1", "--image-tokens", "16",
            "--text-tokens", "8", "--batch", "1", "--warmup", "0", "--repeats", "1", "--discrete-steps", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench_flux_meanflow", *tiny, "--device", "cpu", "--profile", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    report = result.stdout + result.stderr
    assert "USDT" not in report and "gpuGetDeviceCount" not in report, report
    assert not [line for line in report.splitlines() if PROFILER_LOG_LINE.match(line.encode())], report
    for step in ("flow_matching", "meanflow_discrete", "meanflow_differential"):
        assert f"\n{step} " in result.stdout
        assert (tmp_path / f"{step}.ops.txt").exists()


def test_other_output_on_stderr_still_comes_through(capfd):
    with quiet_profiler_logs():
        os.write(2, b"USDT:2026-11-30 14:03:00 23588:23588 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"ERROR:2026-11-30 14:03:00 23588:23588 DeviceProperties.cpp:56] gpuGetDeviceCount failed\n")
        print("a real warning", file=sys.stderr)
    assert capfd.readouterr().err == "a real warning\n"


def test_mfu_report_runs_end_to_end_on_cpu(tmp_path):
    """``--mfu`` at a tiny width on CPU (the GPU check's code path, CUDA pieces aside): the matmul
    peak is measured, each step gets the planner's FLOPs, TFLOP/s = FLOPs / median time, MFU =
    that over the peak, and the predicted time; ``--steps`` leaves the discrete step out."""
    import json

    tiny = ["--hidden", "64", "--heads", "2", "--double", "1", "--single", "1", "--image-tokens", "16",
            "--text-tokens", "8", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench_flux_meanflow", *tiny, "--device", "cpu", "--mfu", "--matmul-size", "128",
         "--steps", "flow_matching", "meanflow_differential", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "matmul peak: 128^3 float32 products, mean of 10:" in result.stdout
    assert "meanflow_discrete" not in result.stdout and "differential / flow-matching time:" in result.stdout
    report = json.loads(out.read_text())
    mfu = report["mfu"]
    assert mfu["matmul_peak_tflops"] > 0
    assert [row["name"] for row in mfu["steps"]] == ["flow_matching", "meanflow_differential"]
    medians = {row["name"]: row["median_s"] for row in report["results"]}
    for row in mfu["steps"]:
        assert row["flops"] > 0 and row["tflops_per_s"] == row["flops"] / row["median_s"] / 1e12
        assert row["mfu"] == row["tflops_per_s"] / mfu["matmul_peak_tflops"] and row["planned_s"] > 0
        assert row["median_s"] == medians[row["name"]]
    assert mfu["differential_over_flow_matching"] == medians["meanflow_differential"] / medians["flow_matching"]
    # The differential step adds the tangent's FLOPs.
    assert mfu["steps"][1]["flops"] > mfu["steps"][0]["flops"]


def test_step_flops_at_the_gpu_checks_shapes():
    """The GPU check's shapes (width 3072, 24 heads of 128, 2 double + 4 single blocks, 4096 image
    + 512 text tokens, batch 2): the FLOPs the planner's gemm efficiency was derived from (README:
    64.3 TFLOP a flow-matching step, 84.7 a differential one) and its predictions (153 and 201 ms)."""
    from types import SimpleNamespace

    from models.flux.config import flux_dev_config
    from tools.bench_flux_meanflow import predicted_seconds, step_flops

    head = 128
    config = flux_dev_config(mean_flow_student=True, hidden_size=3072, num_attention_heads=24, kv_channels=head,
                             ffn_hidden_size=4 * 3072, num_double_layers=2, num_single_layers=4,
                             axes_dims_rope=(head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8))
    flops = step_flops(config, SimpleNamespace(image_tokens=4096, text_tokens=512, batch=2))
    assert round(flops["flow_matching"] / 1e12, 1) == 64.3
    assert round(flops["meanflow_differential"] / 1e12, 1) == 84.7
    assert round(predicted_seconds(flops["flow_matching"]) * 1e3) == 153
    assert round(predicted_seconds(flops["meanflow_differential"]) * 1e3) == 201
