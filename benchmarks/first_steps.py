"""What the first optimizer steps of a SingLoRA run do (issue 24: the ramp's first step), on the real model.

all-MiniLM-L6-v2 fine-tuned on BBC News through ``singlora train`` (as ``make demo-classification``: all-linear,
r = 8, lr 2e-3, batch 16, the default warm-up 6% and ramp 1%) for a few optimizer steps each; every run is scored
on the same 10% held-out split. Per run it prints the held-out accuracy and macro-F1, the lr and u that metrics.jsonl
logs for each step, and whether ``A`` moved in step 1: a run at twice the learning rate that ends with the same
``A``, bit for bit, learned nothing in ``A``.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.first_steps [--steps 1 2 3 5 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def train(out: Path, steps: int, lr: float) -> dict[str, Any]:
    """One ``singlora train`` run of ``steps`` optimizer steps; its summary, the logged steps and ``A``."""
    from torch_singlora.assets import bbc_news_path, minilm_path
    from torch_singlora.cli import main

    argv = ["train", "--model", minilm_path(), "--train-data", bbc_news_path(), "--eval-split", "0.1",
            "--split-seed", "0", "--target-modules", "all-linear", "--r", "8", "--alpha", "8", "--lr", str(lr),
            "--max-steps", str(steps), "--batch-size", "16", "--max-length", "128", "--eval-batch-size", "64",
            "--save-every", "0", "--seed", "0", "--output-dir", str(out), "--quiet", "--no-plot"]
    if main(argv) != 0:
        raise SystemExit(f"singlora train failed: {' '.join(argv)}")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    return {"summary": json.loads((out / "summary.json").read_text()),
            "steps": [(r["step"], r["lr"], r["u"]) for r in logged if r["kind"] == "train"],
            "A": {k: v for k, v in tensors.items() if k.endswith("singlora_A")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        rows = []
        for steps in args.steps:
            run = train(root / f"steps{steps}", steps, args.lr)
            if steps == min(args.steps):  # does step 1 move A? the same run at twice the lr
                double = train(root / f"steps{steps}_2lr", steps, 2 * args.lr)
                same = all(torch.equal(run["A"][k], double["A"][k]) for k in run["A"])
                print(f"A after {steps} step(s) at lr {args.lr:g} and at {2 * args.lr:g}: "
                      f"{'bitwise identical (A learned nothing)' if same else 'different (A trained)'}")
            summary = run["summary"]
            logged = ", ".join(f"{s}: lr {lr:.2e} u {u:.2f}" for s, lr, u in run["steps"])
            rows.append(f"| {steps} | {summary['accuracy']:.4f} | {summary['macro_f1']:.4f} | {logged} |")
    print("\n| steps | held-out accuracy | held-out macro-F1 | logged per step |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
