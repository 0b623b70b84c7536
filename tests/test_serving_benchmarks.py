"""Smoke tests of the serving benchmarks (``--quick``: tiny models): they run, and what holds by construction holds.
Speed is never asserted (the benchmarks measure it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import serving, unmerged_overhead  # noqa: E402


def test_serving_benchmark_quick(tmp_path) -> None:
    results = serving.main(["--quick", "--out", str(tmp_path)])
    rows = results["rows"]
    for workload, tokens in (("llm", lambda row: row["requests"] * 4), ("classify", None)):
        by_backend = {row["backend"]: row for row in rows[workload]}
        assert {"singlora_mixed", "one_at_a_time", "peft_mixed"} <= set(by_backend)
        assert by_backend["one_at_a_time"]["most_rows"] == 1
        assert by_backend["singlora_mixed"]["most_rows"] > 1  # several clients' requests in one forward
        for row in rows[workload]:
            assert row["p50_s"] <= row["p99_s"] and row["tokens_per_s"] == pytest.approx(row["tokens"] / row["wall_s"])
            if tokens:
                assert row["tokens"] == tokens(row)  # no early stop: every request generates max_tokens
    memory = {(row["targets"], row["adapters"]): row for row in rows["memory"]}
    # the tiny Llama: hidden 32, 2 KV heads of 8 (v_proj 32 -> 16), 2 layers, r = 8, float32
    qv = memory[("q_proj,v_proj", 3)]
    assert qv["singlora_per_adapter"] == 2 * (32 * 8 + 32 * 8) * 4
    assert qv["lora_per_adapter"] == 2 * ((32 + 32) * 8 + (32 + 16) * 8) * 4
    assert qv["square_ratio"] == 0.5 and not qv["lora_measured"] and qv["singlora_measured"]
    assert qv["lora_bytes"] == 3 * qv["lora_per_adapter"]
    assert (tmp_path / "serving_quick.md").read_text().count("| singlora_mixed |") == 2


def test_unmerged_overhead_quick(tmp_path) -> None:
    results = unmerged_overhead.main(["--quick", "--out", str(tmp_path)])
    for row in results["shapes"].values():
        medians = row["median_ms"]
        assert set(medians) == {"base", "merged", "unmerged", "unmerged_out_of_place"}
        assert row["over_base"]["unmerged"] == pytest.approx(medians["unmerged"] / medians["base"])
