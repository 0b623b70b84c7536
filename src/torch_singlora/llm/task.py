"""``singlora train --task sft``: instruction fine-tuning of a chat model (the ``Task`` protocol of ``train.tasks``).

    singlora train --task sft --model SmolLM2-135M-Instruct --train-data train.jsonl --eval-data test.jsonl \\
        --output-dir runs/sft --max-length 256 --lr 1e-3 [--chat-template FILE] [--no-assistant-only-loss]

Data: ``llm.data`` (messages, prompt/completion, alpaca, ShareGPT; files or dataset folders). Tokens: the chat
template, the loss on assistant tokens only by default (``llm.tokenization``); batches padded to their longest
example, or packed into rows without padding (``--packing``, ``train.packing``). The loss projects only the answer
positions on the vocabulary (``train.lm_loss``). Examples cut to ``--max-length`` or dropped (no answer token left)
are reported even under ``--quiet``, and counted in run_info.json and summary.json (``truncated``).
Evaluation (at step 0, i.e. the base model, at every ``--eval-every`` and at the end): ``eval_loss`` (mean
cross-entropy of the answer tokens) and ``perplexity``; then greedy answers to the first ``--eval-generations``
held-out prompts give ``exact_match`` and ``rouge_l`` against the reference answers, and the first
``--eval-samples`` of them are logged (``samples``: prompt, reference, generated).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..cli_options import check_at_least
from ..errors import SingLoRAError
from ..train.tasks import CausalLM, TaskData

if TYPE_CHECKING:
    from torch import nn

    from ..train.config import TrainConfig
    from .data import Conversation
    from .tokenization import SFTDataset


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ChatOptions:
    """The flags every chat task has (``--task sft``, ``--task dpo``): the template, the splits, the greedy answers
    of each evaluation."""

    chat_template: str | None = _help("Jinja chat template file (default: the tokenizer's own template)", None)
    data_split: str | None = _help("split to read when --train-data is a dataset folder with several", None)
    eval_data_split: str | None = _help("split to read when --eval-data is a dataset folder with several", None)
    eval_generations: int = _help("held-out prompts answered greedily at each evaluation for exact match and "
                                  "ROUGE-L against the reference answer (--task dpo: the chosen one; 0 = none)", 32)
    max_new_tokens: int = _help("most new tokens per answer at evaluation", 64)
    eval_samples: int = _help("sample generations logged per evaluation", 3)

    def __post_init__(self) -> None:
        check_at_least(self, 0, "eval_generations", "eval_samples")
        check_at_least(self, 1, "max_new_tokens")


@dataclass
class SFTOptions(ChatOptions):
    """The flags of ``--task sft``."""

    assistant_only_loss: bool = _help("loss on the assistant answers only (TRL's assistant_only_loss; the completion "
                                      "of prompt/completion rows); --no-assistant-only-loss trains on every token",
                                      True)
    packing: bool = _help("pack each batch's examples into rows without padding (TRL's packing: best-fit "
                          "decreasing into rows as long as the batch's longest example; position_ids restart per "
                          "example, attention stays within each); the same examples and loss per batch, less time "
                          "and memory", False)
    data_format: str = _help("messages, prompt-completion, alpaca, conversations, or auto (from the columns)", "auto")


class SFT(CausalLM):
    """Instruction fine-tuning of a causal LM on chat data (see the module docstring); the model and the answer
    loss are ``causal-lm``'s."""

    name = "sft"
    metrics = ("eval_loss", "perplexity", "exact_match", "rouge_l")
    evaluate_base = True
    options = SFTOptions
    input_options = ("chat_template",)
    default_max_length = 1024  # TRL's SFTConfig.max_length; batches are padded to their longest example only

    def load_model(self, path: str, info: dict[str, Any], dtype: Any = None) -> "nn.Module":
        """The causal LM; with ``--packing``, first checked to keep attention within packed examples."""
        model = super().load_model(path, info, dtype)
        if info.get("packing"):
            from ..train.packing import check_confined

            check_confined(model, vocab=model.config.vocab_size)
        return model

    def load_tokenizer(self, path: str, info: dict[str, Any], flag: str = "--tokenizer") -> Any:
        """The tokenizer with the run's chat template (``info["chat_template"]`` when one was given)."""
        from .tokenization import set_chat_template

        tokenizer = super().load_tokenizer(path, info, flag)
        if info.get("chat_template"):
            tokenizer.chat_template = info["chat_template"]
        if info:
            set_chat_template(tokenizer)  # a clear error for a tokenizer without one
        return tokenizer

    def _read(self, path: str, info: dict[str, Any], split: str | None, encoding: str | None) -> list["Conversation"]:
        """The examples in ``path`` (``--task dpo``: preference pairs), checked."""
        from .data import read_conversations

        conversations, data_format = read_conversations(path, data_format=info["data_format"], split=split,
                                                        encoding=encoding)
        info.setdefault("data_formats", {})[str(path)] = data_format
        return conversations

    def _tokenize(self, tokenizer: Any, conversations: list["Conversation"], info: dict[str, Any]) -> "SFTDataset":
        """``_read``'s examples tokenized (a dataset with ``truncated``, ``dropped`` and ``describe``)."""
        from .tokenization import tokenize_conversations

        return tokenize_conversations(tokenizer, conversations, max_length=info["max_length"],
                                      assistant_only_loss=info["assistant_only_loss"])

    def _info(self, options: SFTOptions, max_length: int | None) -> dict[str, Any]:
        from .tokenization import read_chat_template

        return {"labels": None, "max_length": max_length, "data_format": options.data_format,
                "assistant_only_loss": options.assistant_only_loss, "packing": options.packing,
                "chat_template": None if options.chat_template is None else read_chat_template(options.chat_template),
                "eval_generations": options.eval_generations, "max_new_tokens": options.max_new_tokens,
                "eval_samples": options.eval_samples}

    def load_data(self, config: "TrainConfig", tokenizer: Any) -> TaskData:
        from ..train.data import split_indices
        from ..train.tasks import _keep
        from .tokenization import set_chat_template

        options = self.parse_options(config.task_options)
        info = self._info(options, config.max_length)
        if info["chat_template"]:  # read once, by _info
            tokenizer.chat_template = info["chat_template"]
        set_chat_template(tokenizer)
        examples = self._read(config.train_data, info, options.data_split, config.encoding)
        held: list[Any] = []
        if config.eval_data:
            held = self._read(config.eval_data, info, options.eval_data_split, config.encoding)
        elif config.eval_split:
            keep, held_out = split_indices(len(examples), config.eval_split, config.split_seed)
            examples, held = [examples[i] for i in keep], [examples[i] for i in held_out]
        # --max-train-samples before tokenizing: only the examples used are tokenized
        examples = [examples[i] for i in _keep(len(examples), config.max_train_samples, config.split_seed)]
        train = self._tokenize(tokenizer, examples, info)
        evaluation = self._tokenize(tokenizer, held, info) if held else None
        for name, dataset in (("train", train), ("eval", evaluation)):
            if dataset is not None and (dataset.truncated or not config.quiet):  # cut examples: even under --quiet
                print(f"singlora train: {dataset.describe(name)}", file=sys.stderr)
        info["truncated"] = {"train": train.truncated, "train_dropped": train.dropped,
                             "eval": evaluation.truncated if evaluation is not None else 0,
                             "eval_dropped": evaluation.dropped if evaluation is not None else 0}
        return TaskData(train, evaluation, info)

    def read_eval_data(self, path: str, tokenizer: Any, info: dict[str, Any], encoding: str | None) -> "SFTDataset":
        info = {**info, "data_format": "auto"}
        dataset = self._tokenize(tokenizer, self._read(path, info, None, encoding), info)
        if dataset.truncated:
            print(f"singlora evaluate: {dataset.describe(str(path))}", file=sys.stderr)
        return dataset

    def base_info(self, options: Any) -> dict[str, Any]:
        """A base model is evaluated on whole examples (no truncation) with the options' template and loss."""
        return self._info(options, None)

    def collator(self, tokenizer: Any, info: dict[str, Any]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        if info.get("packing"):
            from ..train.packing import PackingCollator

            return PackingCollator(tokenizer.pad_token_id)
        from .tokenization import SFTCollator

        return SFTCollator(tokenizer.pad_token_id)

    def evaluate(self, model: "nn.Module", batches: Any, *, dataset: "SFTDataset", tokenizer: Any,
                 info: dict[str, Any], accelerator: Any = None) -> dict[str, Any]:
        from .generate import GenerationOptions
        from .metrics import generation_metrics

        metrics = super().evaluate(model, batches, dataset=dataset, tokenizer=tokenizer, info=info,
                                   accelerator=accelerator)  # eval_loss, perplexity of the answer tokens
        count = min(info["eval_generations"], len(dataset))
        if count:
            generator = accelerator.unwrap_model(model) if accelerator is not None else model
            options = GenerationOptions(max_new_tokens=info["max_new_tokens"], batch_size=16)
            metrics.update(generation_metrics(generator, tokenizer, dataset.conversations[:count], options=options,
                                              samples=info["eval_samples"]))
        return metrics
