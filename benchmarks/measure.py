"""Measurements: interleaved step times, peak step memory, state bytes, inference speed, file size, merge time.

Timing: methods run round robin (A, B, C, A, B, C, ...) so load from other processes on the shared machine hits
all of them alike; we report medians and quartiles of the post-warm-up steps.

Memory: the CPU allocator keeps no peak statistic, and RSS mixes in the allocator's caching and every other
model in this process. We record one training step under ``torch.profiler`` with ``profile_memory=True`` and
replay its allocation events (``+bytes`` / ``-bytes`` in time order): the maximum of the running sum is the peak
of tensor bytes allocated by the step above the level at its start (activations kept for backward, gradients,
temporaries, optimizer updates). It is exact and deterministic, eager and compiled alike. The persistent bytes
(weights, trainable parameters, optimizer state) are counted from the tensors themselves and added.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile


def quartiles(samples: Sequence[float]) -> dict[str, float]:
    """Median, first and third quartile, min, of ``samples`` (seconds) in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0], "n": len(ms)}


def interleaved_times(fns: dict[str, Callable[[], None]], warmup: int, steps: int) -> dict[str, list[float]]:
    """Run ``warmup + steps`` rounds; each round calls every fn once, in order. Returns the timed seconds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def peak_step_bytes(fn: Callable[[], None]) -> int:
    """Peak tensor bytes allocated by one call of ``fn`` above the level at its start (see module doc)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, Tensor):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None, params: Sequence[Tensor] | None = None) -> int:
    """Bytes of optimizer state (AdamW: exp_avg, exp_avg_sq, step) for ``params`` (default: all)."""
    if optimizer is None:
        return 0
    wanted = None if params is None else {id(p) for p in params}
    return sum(tensor_bytes(state.values()) for p, state in optimizer.state.items() if wanted is None or id(p) in wanted)


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def inference_times(models: dict[str, nn.Module], batch: dict[str, Tensor], warmup: int, steps: int
                    ) -> dict[str, list[float]]:
    """Interleaved forward-only times (eval, no_grad) of ``models`` on ``batch`` (labels dropped)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(**inputs)
        return run

    for model in models.values():
        model.eval()
    return interleaved_times({name: forward(m) for name, m in models.items()}, warmup, steps)


def directory_bytes(save: Callable[[str], None]) -> dict[str, int]:
    """``{file name: bytes}`` of what ``save(directory)`` writes into an empty temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        save(directory)
        return {path.name: path.stat().st_size for path in Path(directory).rglob("*") if path.is_file()}


def median_seconds(fn: Callable[[], object], repeats: int, after: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls; ``after()`` (untimed) runs after each call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if after is not None:
            after()
    return statistics.median(samples)


def machine_description() -> dict[str, object]:
    """CPU model, cores, torch threads and versions, load average at call time."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform

    import peft
    import transformers

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "load_average": list(os.getloadavg()), "device": "cpu (no GPU)",
    }
