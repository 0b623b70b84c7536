"""Fine-tuning transformers models from the command line (``singlora train``): data, methods, loop, checkpoints.

- ``data``: read classification (CSV / JSONL / folder of class subfolders) and causal-LM (text / JSONL) datasets.
- ``methods``: build the model to train: ``singlora``, ``lora`` / ``dora`` / ``loraplus`` (through PEFT), ``full``.
- ``loop``: ``TrainConfig`` and ``train()`` on ``accelerate`` (one process, ``accelerate launch`` or ``torchrun``).
- ``checkpoint``: one atomic file with trainable tensors, optimizer, scheduler, RNG and position.
- ``evaluate``: metrics of a model on a dataset; ``metrics``: metric functions, the JSONL log, the summary table;
  ``plots``: PNG curves of one or several runs.

Imports transformers / accelerate / peft / matplotlib, so ``import torch_singlora`` never imports this package.
"""
