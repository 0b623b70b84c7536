"""How big a checkpoint of the docs/interop.md TRL recipe is, on the real SmolLM2-135M-Instruct (issue 24: the docs
said "kilobytes"). One ``SFTTrainer`` step with ``singlora_trainer_class`` (adapter-only checkpoints), all-linear,
r = 8, then the size of every file in ``checkpoint-1/``.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.trl_checkpoint
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def main() -> None:
    import datasets
    import transformers
    import trl

    from torch_singlora import SingLoRAConfig, get_singlora_model
    from torch_singlora.assets import smollm2_path
    from torch_singlora.integrations.trainer import singlora_trainer_class

    path = smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = get_singlora_model(transformers.AutoModelForCausalLM.from_pretrained(path),
                               SingLoRAConfig(r=8, alpha=8, target_modules="all-linear"))
    rows = [{"prompt": [{"role": "user", "content": f"Spell {i}."}],
             "completion": [{"role": "assistant", "content": f"{i} is a number."}]} for i in range(2)]
    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(output_dir=out, max_steps=1, save_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-3, activation_checkpointing=False, use_cpu=True, bf16=False,
                             report_to=[], disable_tqdm=True, logging_strategy="no")
        singlora_trainer_class(trl.SFTTrainer)(model=model, args=args, processing_class=tokenizer,
                                               train_dataset=datasets.Dataset.from_list(rows)).train()
        files = sorted(p for p in (Path(out) / "checkpoint-1").rglob("*") if p.is_file())
        print("| file | bytes |\n|---|---|")
        for file in files:
            print(f"| {file.name} | {file.stat().st_size:,} |")
        print(f"| total | {sum(f.stat().st_size for f in files):,} |")


if __name__ == "__main__":
    main()
