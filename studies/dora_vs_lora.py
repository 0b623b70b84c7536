"""Why DoRA's accuracies track LoRA's in studies 2b and 5: is DoRA active, and how far does it move from LoRA?

Trains LoRA and DoRA (PEFT, ``use_dora=True``) once each on the study-5 task (BBC headlines, 8 per class, 20 steps,
lr 1e-2 = both methods' validation choice, seed 0) with the same CLI as the studies, then compares, per adapted
module, the low-rank update ``dW = B @ A`` (alpha / r = 1) with the pretrained ``W0`` and DoRA's magnitude vector
``m`` with its initial value ``||W0||`` (row norms, PEFT's layout) and with ``||W0 + dW||``: DoRA's weight is
``m * (W0 + dW) / ||W0 + dW||``, so where ``m`` equals ``||W0 + dW||`` it is LoRA's ``W0 + dW`` exactly. Run::

    python -m studies.dora_vs_lora            # ~1 min on one core; runs are cached under --work
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from studies.bbc import TASKS, Bench, RunSpec, Split, make_split, minilm_path


def module_stats(adapter: Path, base: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per module: ||dW|| / ||W0||, max relative change of row norms from dW; DoRA only: max |m - m0| / m0 and
    |m - ||W0 + dW||| / ||W0 + dW|| averaged over rows and its max (how far DoRA's rescaling takes its weight from
    W0 + dW)."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    stats: dict[str, list[float]] = {"update": [], "row_norms": [], "magnitude": [], "rescale": [], "rescale_max": []}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split("base_model.model.")[-1].split(".lora_A.")[0].removeprefix("bert.")
        W0, dW = base[module], tensors[key.replace(".lora_A.", ".lora_B.")] @ A
        m0, norms = W0.norm(dim=1), (W0 + dW).norm(dim=1)
        stats["update"].append(float(dW.norm() / W0.norm()))
        stats["row_norms"].append(float((norms / m0 - 1).abs().max()))
        magnitude = [v for k, v in tensors.items() if "lora_magnitude_vector" in k and f"{module}." in k]
        if magnitude:
            stats["magnitude"].append(float(((magnitude[0] - m0).abs() / m0).max()))
            rescale = (magnitude[0] - norms).abs() / norms
            stats["rescale"].append(float(rescale.mean()))
            stats["rescale_max"].append(float(rescale.max()))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/singlora_dora_vs_lora", help="runs and data split (cache)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = TASKS["titles"]
    split = Split(task["train_per_class"], task["val_per_class"], task["test_per_class"], "titles")
    bench = Bench(minilm_path(), make_split(Path(args.work), split), Path(args.work), "titles", task="titles")
    from transformers import AutoModel

    base = {name.removesuffix(".weight"): p.detach() for name, p in AutoModel.from_pretrained(minilm_path())
            .named_parameters() if p.dim() == 2}
    print("| method | test accuracy | median ‖dW‖ / ‖W0‖ | max row-norm change from dW | max abs(m - m0) / m0 | "
          "abs(m - ‖W0 + dW‖) / ‖W0 + dW‖: median module's row mean; max |")
    print("|---|---|---|---|---|---|")
    for method in ("lora", "dora"):
        spec = RunSpec(method=method, lr=1e-2, seed=0, epochs=task["epochs"], max_length=task["max_length"])
        result = bench.run(spec)
        stats = module_stats(bench.work / "runs" / bench.label / spec.key() / "adapter", base)
        update = sorted(stats["update"])[len(stats["update"]) // 2]
        rescale = (f"{sorted(stats['rescale'])[len(stats['rescale']) // 2]:.4f}; {max(stats['rescale_max']):.4f}"
                   if stats["rescale"] else "-")
        magnitude = f"{max(stats['magnitude']):.4f}" if stats["magnitude"] else "-"
        print(f"| {method} | {result['test_accuracy']:.4f} | {update:.4f} | {max(stats['row_norms']):.3f} | "
              f"{magnitude} | {rescale} |")


if __name__ == "__main__":
    main()
