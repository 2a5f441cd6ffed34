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
