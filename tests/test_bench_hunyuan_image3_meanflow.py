"""tools.bench_hunyuan_image3_meanflow runs one step of each kind on CPU and reports the ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_one_step_each_reports_time_and_memory_ratios(tmp_path):
    tiny = ["--hidden", "32", "--heads", "4", "--groups", "2", "--layers", "1", "--experts", "8", "--topk", "2",
            "--expert-width", "16", "--image-tokens", "16", "--text-tokens", "4", "--latent-channels", "4",
            "--warmup", "0", "--repeats", "1", "--recompute", "--json", str(tmp_path / "bench.json")]
    result = subprocess.run(
        [sys.executable, "-m", "tools.bench_hunyuan_image3_meanflow", *tiny],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "8 experts top-2" in result.stdout and "recompute" in result.stdout
    for step in ("flow_matching", "meanflow_differential"):
        assert f"\n{step} " in result.stdout
    rows = {row["name"]: row for row in json.loads((tmp_path / "bench.json").read_text())["results"]}
    differential = rows["meanflow_differential"]
    assert differential["time_ratio"] > 0 and differential["peak_ratio"] > 0
    assert differential["saved_bytes"] > 0 and rows["flow_matching"]["time_ratio"] == 1.0
