"""Measurements: interleaved step times, peak step memory, state bytes, inference speed, file size, merge time.

Timing: methods run round robin (A, B, C, A, B, C, ...) so load from other processes on the shared machine hits
all of them alike; we report medians and quartiles of the post-warm-up steps.

Memory: the CPU allocator keeps no peak statistic, and RSS mixes in the allocator's caching and every other
model in this process. We record one training step under ``torch.profiler`` with ``profile_memory=True`` and
replay its allocation events (``+bytes`` / ``-bytes`` in time order): the maximum of the running sum is the peak
of tensor bytes allocated by the step above the level at its start (activations kept for backward, gradients,
temporaries, optimizer updates). It is exact and deterministic, eager and compiled alike. The persistent bytes
(weights, trainable parameters, optimizer state) are counted from the tensors themselves and added.

On CUDA (``device="cuda"``) every timed call is bracketed by ``torch.cuda.synchronize()`` (``synchronizer``), so
a time covers the kernels the call launched; the peak step bytes are ``max_memory_allocated()`` after
``reset_peak_memory_stats()``, minus ``memory_allocated()`` at the start of the step: the same quantity (peak
above the starting level) read from the caching allocator's own statistics.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile


def keep_freed_memory() -> None:
    """Make glibc's allocator keep the memory this process frees, so that steps stop page-faulting.

    By default glibc returns freed memory to the system (big blocks are ``mmap``-ed and unmapped each time, the
    heap's top is trimmed), so a step touches fresh pages wherever it allocates more than the heap holds: up to
    ~150,000 minor page faults a step, and how many a method pays depends on what ran before it in an interleaved
    round (one MiniLM run: 0 to 118,000 a step between methods, moving ratios by up to 0.12). Here every allocation
    comes from the heap (``M_MMAP_MAX = 0``) and the heap is never trimmed (``M_TRIM_THRESHOLD``): after a few
    rounds every step reuses pages the process already has, and the times measure computation. A user's run on
    default glibc pays the faults too (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment, or
    jemalloc / tcmalloc, remove them). Raises ``RuntimeError`` where ``mallopt`` is missing or refuses (not glibc)."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None or not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError(f"keep_freed_memory: no glibc mallopt here (C library {name!r})")


def quartiles(samples: Sequence[float]) -> dict[str, float]:
    """Median, first and third quartile, min, of ``samples`` (seconds) in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0], "n": len(ms)}


def _no_sync() -> None:
    """CPU work is done when the call returns: nothing to wait for."""


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before starting and before stopping a clock on ``device``: ``torch.cuda.synchronize`` on CUDA."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return _no_sync


def timed(fn: Callable[[], Any], sync: Callable[[], None] = _no_sync) -> float:
    """Seconds of one call of ``fn`` (``sync()`` before the start and before the stop)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved_times(fns: dict[str, Callable[[], None]], warmup: int, steps: int,
                      sync: Callable[[], None] = _no_sync) -> dict[str, list[float]]:
    """Run ``warmup + steps`` rounds; each round calls every fn once, in order. Returns the timed seconds."""
    return interleaved_clocks(fns, warmup, steps, sync)[0]


def interleaved_clocks(fns: dict[str, Callable[[], None]], warmup: int, steps: int,
                       sync: Callable[[], None] = _no_sync) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``interleaved_times``, and beside each wall time the CPU seconds the process got during the call
    (``time.process_time``: all threads; on a shared machine it leaves out the time other processes held the
    core, which wall time counts)."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + steps):
        for name, fn in fns.items():
            start = time.process_time()
            elapsed = timed(fn, sync)
            if round_index >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(time.process_time() - start)
    return wall, cpu


def peak_step_bytes(fn: Callable[[], None], device: str = "cpu") -> int:
    """Peak tensor bytes allocated by one call of ``fn`` above the level at its start (see module doc)."""
    if torch.device(device).type == "cuda":
        return cuda_peak_step_bytes(fn)
    return cpu_peak_step_bytes(fn)


def cuda_peak_step_bytes(fn: Callable[[], None]) -> int:
    """CUDA: ``max_memory_allocated`` during one call of ``fn`` minus ``memory_allocated`` at its start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def cpu_peak_step_bytes(fn: Callable[[], None]) -> int:
    """CPU: replay of the allocation events ``torch.profiler`` records during one call of ``fn``."""
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


def inference_times(models: dict[str, nn.Module], batch: dict[str, Tensor], warmup: int, steps: int,
                    sync: Callable[[], None] = _no_sync) -> dict[str, list[float]]:
    """Interleaved forward-only times (eval, no_grad) of ``models`` on ``batch`` (labels dropped)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(**inputs)
        return run

    for model in models.values():
        model.eval()
    return interleaved_times({name: forward(m) for name, m in models.items()}, warmup, steps, sync)


def directory_bytes(save: Callable[[str], None]) -> dict[str, int]:
    """``{file name: bytes}`` of what ``save(directory)`` writes into an empty temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        save(directory)
        return {path.name: path.stat().st_size for path in Path(directory).rglob("*") if path.is_file()}


def median_seconds(fn: Callable[[], object], repeats: int, after: Callable[[], object] | None = None,
                   sync: Callable[[], None] = _no_sync) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls; ``after()`` (untimed) runs after each call."""
    samples = []
    for _ in range(repeats):
        samples.append(timed(fn, sync))
        if after is not None:
            after()
    return statistics.median(samples)


def cuda_description() -> dict[str, object]:
    """The GPU's name, memory, compute capability and the CUDA / cuDNN versions torch was built with."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": f"cuda: {props.name}", "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}", "gpu_multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def machine_description(device: str = "cpu") -> dict[str, object]:
    """CPU model, cores, torch threads and versions, load average at call time; the GPU's, on CUDA."""
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
        **(cuda_description() if torch.device(device).type == "cuda" else {}),
    }


def write_outputs(results: dict[str, Any], render: Callable[[dict[str, Any]], str], out: Path, stem: str,
                  title: str = "") -> str:
    """Stamp the load average at the end into ``results["machine"]``, then write ``<out>/<stem>.json`` and
    ``<out>/<stem>.md`` (``title``, then ``render(results)``) atomically; returns the rendered text."""
    import json

    from torch_singlora.atomic import atomic_write_text  # as elsewhere in this module: imported where used

    results["machine"]["load_average_end"] = list(os.getloadavg())
    text = render(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", (f"{title}\n\n" if title else "") + text + "\n")
    return text

