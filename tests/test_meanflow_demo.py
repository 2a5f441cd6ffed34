"""Smoke run of the toy demo (`python -m tools.toy_meanflow_demo --quick`)."""

import json

from tools.toy_meanflow_demo import VARIANTS, format_table, main


def test_quick_demo_writes_metrics_and_figure(tmp_path):
    results = main(["--quick", "--output-dir", str(tmp_path)])

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    png = (tmp_path / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    assert set(metrics["targets"]) == {"ring", "checkerboard"}
    for target_result in metrics["targets"].values():
        assert set(target_result["summary"]) == set(VARIANTS)
        runs = {run["variant"]: run for run in target_result["runs"]}
        # the four students differ in their phase schedule
        assert runs["a"]["switch_step"] == 0
        assert runs["b"]["switch_step"] is None
        assert runs["c"]["switch_step"] is not None and runs["c"]["switch_step"] > 0
        assert "align_loss" in runs["d"]["loss_history"][-1]
        for run in runs.values():
            assert run["diverged"] in (True, False)
            assert {"sw_to_target", "sw_to_teacher50", "modes_covered"} <= set(run["nfe1"]) or not run["nfe1"]["finite"]
    assert "| ring |" in format_table(results)
