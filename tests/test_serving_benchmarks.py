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
    qv = {row["targets"]: row for row in rows["memory"]}["q_proj,v_proj"]
    # the tiny Llama: hidden 32, 2 KV heads of 8 (v_proj 32 -> 16), 2 layers; ranks 4, 8, 16; float32
    for r in (4, 8, 16):
        per = qv["per_rank"][r]
        assert per["singlora"] == 2 * (32 * r + 32 * r) * 4  # each adapter at its own rank, not padded to 16
        assert per["stored"] == per["singlora"] + 2 * 2 * (16 * 8 + 4)  # + per layer a table row and a coefficient
        assert per["peft"] == per["lora"] == 2 * ((32 + 32) * r + (32 + 16) * r) * 4  # PEFT's tensors measured
    assert qv["reuse"]["allocated_after"] == qv["reuse"]["allocated_before"]  # unloaded rows reused
    steps = {(row["shape"], row["method"]) for row in rows["steps"]}
    assert steps == {(shape, method) for shape in ("prefill", "decode") for method in (
        "base", "merged", "singlora_model_unmerged", "bank_one_adapter", "bank_all_base", "bank_mixed")}
    assert (tmp_path / "serving_quick.md").read_text().count("| singlora_mixed |") == 2


def test_unmerged_overhead_quick(tmp_path) -> None:
    results = unmerged_overhead.main(["--quick", "--out", str(tmp_path)])
    for row in results["shapes"].values():
        medians = row["median_ms"]
        assert set(medians) == {"base", "merged", "unmerged", "unmerged_out_of_place"}
        assert row["over_base"]["unmerged"] == pytest.approx(medians["unmerged"] / medians["base"])
