"""Benchmark suite: SingLoRA vs PEFT LoRA, side by side in one process. Run ``python -m benchmarks.run --help``."""
