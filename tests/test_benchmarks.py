"""Smoke test of the benchmark suite (``python -m benchmarks.run --quick``): it runs and its numbers are sane.

Speed is not asserted (benchmarks measure it); what is checked holds by construction on any machine.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks.run import QUICK_METHODS, main  # noqa: E402


def test_quick_suite_runs_and_writes_results(tmp_path):
    main(["--quick", "--steps", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.md").read_text().startswith("# Benchmark results")
    assert set(results["workloads"]) == {"llama-tiny", "minilm-tiny"}
    for name, workload in results["workloads"].items():
        train = workload["train"]
        assert list(train) == list(QUICK_METHODS)
        for method, row in train.items():
            assert row["n"] == 2 and 0 < row["median_ms"] < 60_000, (name, method)
            assert row["peak_step_bytes"] > 0 and row["peak_total_bytes"] >= row["persistent_bytes"], (name, method)
        assert train["base"]["trainable_params"] == 0 and train["base"]["optimizer_state_bytes"] == 0
        # SingLoRA: max(d_in, d_out) * r per layer vs LoRA's (d_in + d_out) * r; AdamW keeps 2 floats each.
        assert train["singlora"]["trainable_params"] < train["lora"]["trainable_params"]
        assert workload["ratios"]["optimizer_state_square_singlora_over_lora"] == 0.5
        assert train["singlora"]["persistent_bytes"] < train["lora"]["persistent_bytes"]
        assert workload["merged_vs_unmerged_max_abs_diff"] < 1e-5
        assert workload["singlora_step"] > 0  # the ramp moved with the optimizer: u > 0 when merging
        files = workload["adapter_files"]
        assert files["singlora"]["adapter_model.safetensors"] < files["lora"]["adapter_model.safetensors"]
        assert all(math.isfinite(v) for v in workload["ratios"].values() if v is not None)
