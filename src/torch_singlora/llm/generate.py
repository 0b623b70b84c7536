"""Generation with a chat model: loading (a base or merged folder, a trained adapter, or a base plus an adapter),
batched generation (left padding, greedy or sampling) and token streaming.

    chat = load_chat_model("runs/sft/adapter")                       # base recorded at training (run_info.json)
    chat = load_chat_model("merged/")                                # `singlora merge` output, or any base model
    chat = load_chat_model("SmolLM2/", adapter="lora_peft/")         # + a SingLoRA adapter or a PEFT LoRA folder
    texts = generate(chat.model, chat.tokenizer, [[{"role": "user", "content": "Hi"}]], GenerationOptions())
    for piece in stream(chat.model, chat.tokenizer, messages, GenerationOptions()):
        print(piece, end="", flush=True)

Prompts are lists of messages rendered with the chat template and its generation prompt (``add_generation_prompt``),
tokenized without extra special tokens, as in training. Batches are padded on the left, so every prompt ends at the
same position and generation continues each one; the answer is the new tokens up to the first end-of-sequence
token (the tokenizer's EOS and the generation config's ``eos_token_id``), decoded without special tokens.
Greedy generation is deterministic; sampling draws from ``torch.manual_seed(options.seed)``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..cli_options import check_at_least
from ..errors import SingLoRAError
from ..hf import eval_mode
from ..untrusted import read_json
from .data import Message
from .tokenization import render, set_chat_template, stop_token_ids


@dataclass
class GenerationOptions:
    """How to generate (the names of ``transformers.GenerationConfig``)."""

    max_new_tokens: int = 256  # at most this many new tokens per answer
    do_sample: bool = False  # False: greedy (deterministic); True: sample with temperature / top_p / top_k
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    seed: int = 0  # sampling seed (torch.manual_seed before each call)
    batch_size: int = 8  # prompts per forward

    def validate(self) -> None:
        """Check the fields; errors name the flag."""
        check_at_least(self, 1, "max_new_tokens", "batch_size")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SingLoRAError(f"--temperature={self.temperature} must be a finite number > 0")
        if not 0 < self.top_p <= 1:
            raise SingLoRAError(f"--top-p={self.top_p} must be in (0, 1]")
        check_at_least(self, 0, "top_k")


@dataclass
class ChatModel:
    """A model ready to generate: ``model`` (eval mode), its ``tokenizer`` (with a chat template) and where it came
    from (``source``, for messages and output records)."""

    model: nn.Module
    tokenizer: Any
    source: str


# ---- loading -----------------------------------------------------------------------------------------------------

def _load_causal_lm(path: str, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from ..hf import from_pretrained

    return from_pretrained(AutoModelForCausalLM, path, "model", dtype=dtype)


def _adapter_kind(folder: Path) -> str:
    """``singlora`` or ``peft`` (a LoRA, e.g. ``singlora export``), from the folder's ``adapter_config.json``."""
    from ..adapter_file import CONFIG_FILE

    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise SingLoRAError(f"--adapter {str(folder)!r}: no {CONFIG_FILE} (a SingLoRA adapter or a PEFT LoRA folder)")
    config = read_json(config_path, what="adapter config")
    if isinstance(config, dict) and config.get("format") == "singlora":
        return "singlora"
    if isinstance(config, dict) and isinstance(config.get("peft_type"), str):
        return "peft"
    raise SingLoRAError(f"{config_path}: neither a SingLoRA adapter (format 'singlora') nor a PEFT adapter (peft_type)")


def _with_adapter(load_base: Callable[[], nn.Module], adapter: str) -> nn.Module:
    """The base model (``load_base()``) with ``adapter``; a PEFT folder is checked before the base loads."""
    if _adapter_kind(Path(adapter)) == "singlora":
        from ..model import SingLoRAModel

        return SingLoRAModel.from_pretrained(load_base(), adapter)
    from ..peft_folder import load_peft_adapter

    return load_peft_adapter(load_base, adapter, what=f"--adapter {adapter!r}")


def chat_model_inputs(path: str, adapter: str | None = None, chat_template: str | None = None
                      ) -> dict[str, str | None]:
    """``{what: path}`` of everything ``load_chat_model(path, adapter, chat_template=...)`` reads (a trained
    adapter's recorded base model and tokenizer included): what no output of the command may overwrite."""
    from ..runs import RUN_INFO, read_run_info

    inputs = {"model": path, "--adapter": adapter, "--chat-template": chat_template}
    if (Path(path) / RUN_INFO).is_file():
        info = read_run_info(path)
        inputs.update({"base model": info["base_model"], "tokenizer": info["tokenizer"]})
    return inputs


def load_chat_model(path: str, adapter: str | None = None, *, chat_template: str | None = None,
                    dtype: torch.dtype | None = None) -> ChatModel:
    """A model and tokenizer from ``path``: an adapter folder written by ``singlora train`` (its base model,
    tokenizer and chat template are those recorded in ``run_info.json``), or a transformers model folder (a base
    model, or a ``singlora merge`` output), optionally with ``adapter`` (a SingLoRA adapter or a PEFT LoRA folder
    such as a ``singlora export`` output). ``chat_template``: a Jinja file overriding the template."""
    from ..hf import load_tokenizer
    from ..runs import RUN_INFO

    folder = Path(path)
    if not folder.is_dir():
        raise SingLoRAError(f"model {path!r}: no such folder")
    if (folder / RUN_INFO).is_file():
        if adapter is not None:
            raise SingLoRAError(f"{path} is a trained adapter (it names its base model); --adapter applies to a base "
                                "model folder")
        from ..runs import load_trained
        from ..train.registry import get_task

        model, info = load_trained(path)
        tokenizer = get_task(info["task"]).load_tokenizer(info["tokenizer"], info)
        source = f"{path} (base {info['base_model']})"
    else:
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            raise SingLoRAError(f"{path} is an adapter folder without run_info.json (not a `singlora train` output): "
                                f"give its base model folder, and --adapter {path}")
        load_base = lambda: _load_causal_lm(path, dtype)  # noqa: E731
        model = load_base() if adapter is None else _with_adapter(load_base, adapter)
        tokenizer = load_tokenizer(path, "model")
        source = path if adapter is None else f"{path} + {adapter}"
    set_chat_template(tokenizer, chat_template)
    model.eval()
    return ChatModel(model, tokenizer, source)


# ---- generation --------------------------------------------------------------------------------------------------

def generation_config(model: nn.Module, tokenizer: Any, options: GenerationOptions) -> Any:
    """A ``GenerationConfig`` for ``options``: sampling settings only when sampling, the stop tokens of the tokenizer
    and of the model's own generation config, the tokenizer's pad token."""
    from transformers import GenerationConfig

    options.validate()
    stops = sorted(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    if not stops:
        raise SingLoRAError("the tokenizer has no EOS token and the model no eos_token_id: generation cannot stop")
    sampling = dict(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=options.do_sample,
                            eos_token_id=stops, pad_token_id=pad,
                            **(sampling if options.do_sample else {}))


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The token ids of a prompt: the chat template with the generation prompt, no extra special tokens."""
    if not messages:
        raise SingLoRAError("an empty prompt (no messages)")
    text = render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` (B, T) with each sequence right-aligned (padding on the left)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, length - len(sequence):] = torch.tensor(list(sequence))
            mask[row, length - len(sequence):] = 1
    return ids, mask


def _answer(tokenizer: Any, new_ids: Sequence[int], stops: set[int]) -> str:
    """Decode the new tokens up to (not including) the first stop token."""
    ids = list(new_ids)
    for position, token in enumerate(ids):
        if token in stops:
            ids = ids[:position]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Message]],
             options: GenerationOptions | None = None) -> list[str]:
    """The answer to each prompt (a list of messages), in order; batches of ``options.batch_size`` prompts of
    similar length, padded on the left."""
    options = options or GenerationOptions()
    config = generation_config(model, tokenizer, options)
    stops = set(config.eos_token_id)
    encoded = [prompt_ids(tokenizer, messages) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding per batch
    answers: list[str] = [""] * len(encoded)
    device = _device(model)
    if options.do_sample:
        torch.manual_seed(options.seed)
    with eval_mode(model, inference=True):
        for start in range(0, len(order), options.batch_size):
            batch = order[start:start + options.batch_size]
            ids, mask = left_pad([encoded[i] for i in batch], config.pad_token_id)
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, index in enumerate(batch):
                answers[index] = _answer(tokenizer, output[row, ids.shape[1]:].tolist(), stops)
    return answers


def stream(model: nn.Module, tokenizer: Any, messages: Sequence[Message],
           options: GenerationOptions | None = None) -> Iterator[str]:
    """The answer to ``messages`` as text pieces, yielded as the tokens are generated (``TextIteratorStreamer``;
    generation runs in a thread). The pieces joined equal ``generate(...)`` of the same prompt. Closing the
    iterator early (``break``, Ctrl-C) stops the generation at the next token."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    options = options or GenerationOptions()
    config = generation_config(model, tokenizer, options)
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=_device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    failure: list[BaseException] = []

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def run() -> None:
        try:
            if options.do_sample:
                torch.manual_seed(options.seed)
            with eval_mode(model, inference=True):
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhenAsked()]))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]
