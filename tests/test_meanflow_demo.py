"""Smoke run of the toy demo (`python -m tools.toy_meanflow_demo --quick`)."""

import json
import math

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
        blowup = metrics["config"]["blowup_factor"]
        for run in runs.values():
            # No student of the quick run diverges: every loss finite, samples finite at 1 and 2
            # steps and within blowup_factor x the untrained student's (the teacher's Euler
            # sampler) sliced Wasserstein distance to the target, the demo's own rule.
            assert not run["diverged"] and run["divergence_reason"] is None, (run["variant"], run["divergence_reason"])
            for num_steps in (1, 2):
                nfe = run[f"nfe{num_steps}"]
                untrained = target_result["teacher"][f"euler_{num_steps}"]["sw_to_target"]
                assert nfe["finite"] and nfe["sw_to_target"] <= blowup * untrained, (run["variant"], num_steps, nfe)
                assert {"sw_to_target", "sw_to_teacher50", "modes_covered"} <= set(nfe)
            assert all(math.isfinite(entry["loss"]) for entry in run["loss_history"])
        # ... so every seed counts in the summary.
        for entry in target_result["summary"].values():
            assert entry["diverged"] == 0 and entry["nfe1"]["sw_to_target"]["n"] == entry["seeds"] == 1
    assert "| ring |" in format_table(results)
