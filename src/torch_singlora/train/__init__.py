"""Fine-tuning transformers models from the command line (``singlora train``).

- ``config``: ``TrainConfig``, every option of ``singlora train`` (validated; errors name the flag).
- ``tasks``: what is trained: the ``Task`` protocol, ``classification`` and ``causal-lm`` (a new task plugs in here).
- ``data``: reading and checking rows (CSV / JSONL / folders), splits, tokenizing, the collator.
- ``registry``: the task names (``TASKS``: name -> the module and class, imported when used).
- ``methods``: how it trains: the ``Method`` protocol, ``singlora``, PEFT's ``lora`` / ``dora`` / ``loraplus``,
  ``full``.
- ``step``: one optimizer step with gradient accumulation and the non-finite policy (also used by DreamBooth).
- ``loop``: ``train(config)`` on ``accelerate``: prepare, steps, finish.
- ``checkpoint``: the training state in one atomic file; ``evaluate``: eval passes; ``metrics``: metric functions,
  the JSONL log, the summary table; ``plots``: PNG curves of one or several runs.

Outside this package, because inference and serving use them too: ``torch_singlora.runs`` (the output folder: new
run / ``--resume`` / ``--overwrite``, run_info.json, loading a trained run back), ``torch_singlora.hf`` (local model
and tokenizer folders with clear errors, ``eval_mode``) and ``torch_singlora.datafiles`` (the rows of data files).

Imports transformers / accelerate / peft / matplotlib, so ``import torch_singlora`` never imports this package.
"""
