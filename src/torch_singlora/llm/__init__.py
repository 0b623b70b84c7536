"""Instruction fine-tuning of chat LLMs: chat data, the chat template with an assistant-only loss mask, generation,
a chat REPL and the SFT metrics. Needs the ``llm`` extra (transformers, datasets, rouge-score).

- ``data``: rows in TRL's dataset shapes (``messages``; ``prompt``/``completion``; alpaca ``instruction``/``input``/
  ``output``; ShareGPT ``conversations``) from .jsonl / .json / .csv / .parquet, a ``datasets.save_to_disk`` folder
  or a folder ``datasets.load_dataset`` reads; every value type-checked, errors name the file, row and column.
- ``tokenization``: the tokenizer's chat template (or a ``--chat-template`` file), token ids and labels with the
  loss on assistant tokens only (or on the whole text), per-example truncation, padding collator.
- ``generate``: load a base / merged model, a trained adapter, or a base + adapter; batched generation (left
  padding, greedy or sampling) and token streaming.
- ``metrics``: exact match and ROUGE-L against reference answers; sample generations.
- ``chat``: the interactive ``singlora chat`` REPL. ``cli``: ``singlora generate`` and ``singlora chat``.
- ``task``: ``singlora train --task sft``. ``examples``: instruction data built from BBC News (the demo's).

Nothing heavy is imported here.
"""
