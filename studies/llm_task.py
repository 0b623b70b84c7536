"""The LLM study's task and model: SmolLM2-135M-Instruct classifying BBC News headlines (issue 16).

Task: the section of a BBC News article (business, entertainment, politics, sports, tech) from its headline (the
first line of the article; 3-18 SmolLM2 tokens, median 7). The split is ``studies/bbc.py``'s fixed split, built at
run time from the installed corpus into the work folder (never into git): per class, shuffled with seed 0, the first
``test_per_class`` headlines are the test set (the same 60 per class as study 5's), the next ``val_per_class`` the
validation set, the next ``train_per_class`` the training set.

Two forms of the task:
- fine-tuning, in the paper's style (its LLaMA-7B MNLI runs were classification): ``LlamaForSequenceClassification``
  (a fresh 576 -> 5 ``score`` head on the last token, trained fully by every method) through the training CLI's
  Python API (``studies.bbc.Bench``), adapters at r = 8 on the seven projections of all 30 layers;
- zero-shot, the base instruct model asked through its chat template (``PROMPT``) to answer with the section word:
  greedy answers scored by exact match, and a ranked choice (the label whose whole answer, word + ``<|im_end|>``,
  the model finds most likely). This measures how much of the task the model already solves.

Parameter counts per adapted matrix ``(d_out, d_in)``: SingLoRA ``max(d_in, d_out) * r``, LoRA ``(d_in + d_out) * r``,
DoRA LoRA's plus ``d_out`` magnitudes (``adapter_params``).
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from studies.bbc import Bench, RunSpec, Split, make_split

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("singlora", "lora", "loraplus", "dora")
FULL_GRID = ("singlora", "lora")  # every grid rate x every seed: the learning-rate sensitivity
MAX_EXTENSIONS = 2  # grid points a method may add on an edge of the grid
PROMPT = ("Which section of the BBC News website does this headline belong to: business, entertainment, politics, "
          "sports or tech? Answer with one word.\nHeadline: {headline}")


@dataclass
class Settings:
    """What the study runs (the command's flags)."""

    split: Split
    steps: int
    batch_size: int
    max_length: int
    seeds: int
    grid: tuple[float, ...]
    methods: tuple[str, ...]
    jobs: int
    extensions: int = MAX_EXTENSIONS  # grid points a method may add on an edge


@dataclass(frozen=True)
class LLMRunSpec(RunSpec):
    """A run of the LLM study: ``RunSpec`` plus the adapted modules and the evaluation / checkpoint cadence."""

    target_modules: str = ",".join(TARGETS)
    eval_every: int = 0
    save_every: int = 0

    def train_settings(self) -> dict[str, Any]:
        return {"target_modules": self.target_modules, "eval_every": self.eval_every, "save_every": self.save_every}


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a plain transformers folder (``torch_singlora.assets``; converted once)."""
    from torch_singlora.assets import smollm2_path as locate

    return locate()


def tiny_llama(work: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, for ``--quick`` smoke runs.

    Same structure as SmolLM2 where the study depends on it: GQA (k/v 32 -> 16), a wider MLP (32 <-> 48), tied
    embeddings, pad = eos = ``<|im_end|>``. Built once under ``work``.
    """
    folder = work / "tiny_llama"
    if (folder / "config.json").is_file():
        return str(folder)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


QUICK_SPLIT = Split(train_per_class=4, val_per_class=2, test_per_class=2, task="titles")


def make_llm_bench(work: Path, split: Split, quick: bool) -> Bench:
    """SmolLM2 on the headline ``split`` (``quick``: the tiny random Llama)."""
    if quick:
        return Bench(tiny_llama(work), make_split(work, split), work, "llm_quick", "titles")
    label = f"smollm2_titles_{split.train_per_class}_{split.val_per_class}_{split.test_per_class}"
    return Bench(smollm2_path(), make_split(work, split), work, label, "titles")


def projection_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each of the seven projections of one Llama layer, from its ``config.json``."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden), "v_proj": (kv * head_dim, hidden),
            "o_proj": (hidden, heads * head_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def adapter_params(config: dict[str, Any], method: str, r: int = 8) -> int:
    """Adapter parameters of ``method`` on all seven projections of every layer (the formula, not a model)."""
    total = 0
    for d_out, d_in in projection_shapes(config).values():
        if method == "singlora":
            total += max(d_in, d_out) * r
        elif method in ("lora", "loraplus"):
            total += (d_in + d_out) * r
        elif method == "dora":
            total += (d_in + d_out) * r + d_out
        else:
            raise ValueError(f"no adapter parameter formula for method {method!r}")
    return total * config["num_hidden_layers"]


# LLaMA-7B's shapes (the paper's model), for the "60 %" check: 32 layers, 4096 hidden, 11008 MLP, no GQA.
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "num_hidden_layers": 32}


def read_rows(path: Path) -> list[dict[str, str]]:
    """The ``{"text", "label"}`` rows of a split file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def normalise_answer(text: str) -> str:
    """Lower case, surrounding white space and punctuation removed: ``" Sports."`` -> ``"sports"``."""
    return text.strip().strip(string.punctuation + string.whitespace).lower()


@torch.no_grad()
def zero_shot(model_path: str, rows: list[dict[str, str]], labels: list[str], *, batch_size: int = 16,
              max_new_tokens: int = 5) -> dict[str, Any]:
    """The base instruct model on ``rows`` through its chat template: exact match and ranked choice.

    Exact match: the greedy answer (``max_new_tokens``, up to ``<|im_end|>``), normalised by ``normalise_answer``,
    equals the label word. Ranked choice: the label ``w`` with the highest log-probability of the whole answer
    ``w<|im_end|>`` given the prompt (computed from one prompt pass whose KV cache is shared by the five answers).
    Returns both accuracies, the rate of answers that are one of the label words, and each example's answer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    answers: list[str] = []
    ranked: list[int] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [chat_prompt(tokenizer, row["text"]) for row in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch["input_ids"].shape[1]:]
        answers += [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
        ranked += answer_log_probs(model, tokenizer, batch, labels).argmax(-1).tolist()
    gold = [labels.index(row["label"]) for row in rows]
    exact = [normalise_answer(a) == row["label"] for a, row in zip(answers, rows)]
    valid = [normalise_answer(a) in labels for a in answers]
    return {
        "examples": len(rows), "exact_match": sum(exact) / len(rows),
        "ranked_choice": sum(p == g for p, g in zip(ranked, gold)) / len(rows),
        "valid_answer_rate": sum(valid) / len(rows), "prompt": PROMPT, "max_new_tokens": max_new_tokens,
        "answers": [{"headline": row["text"], "label": row["label"], "answer": a, "ranked": labels[p]}
                    for row, a, p in zip(rows, answers, ranked)],
    }


def chat_prompt(tokenizer: Any, headline: str) -> str:
    """``PROMPT`` as the user turn of the chat template, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": PROMPT.format(headline=headline)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_log_probs(model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], labels: list[str]) -> torch.Tensor:
    """``log p(label word + <|im_end|> | prompt)`` for each prompt of ``batch`` (left-padded) and label: (B, L).

    One pass over the prompts fills a KV cache; it is repeated once per label and the answers, right-padded to the
    longest, go through in one more pass. Positions follow the attention mask (left padding shifts them).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n_batch, n_labels = ids.shape[0], len(labels)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = prompt.logits[:, -1].log_softmax(-1)  # (B, V): the answer's first token
    answers = [tokenizer(w, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for w in labels]
    length = max(len(a) for a in answers)
    tokens = torch.full((n_labels, length), tokenizer.pad_token_id, dtype=torch.long)
    for i, answer in enumerate(answers):
        tokens[i, : len(answer)] = torch.tensor(answer)
    cache = prompt.cache
    cache.batch_repeat_interleave(n_labels)  # (B, ...) -> (B * L, ...), example-major
    rest = model(
        input_ids=tokens.repeat(n_batch, 1),
        attention_mask=torch.cat([mask.repeat_interleave(n_labels, 0), torch.ones(n_batch * n_labels, length,
                                                                                    dtype=mask.dtype)], 1),
        position_ids=positions[:, -1:].repeat_interleave(n_labels, 0) + 1 + torch.arange(length),
        cache=cache, use_cache=True,
    ).logits.log_softmax(-1).view(n_batch, n_labels, length, -1)
    scores = torch.zeros(n_batch, n_labels)
    for i, answer in enumerate(answers):
        scores[:, i] = first[:, answer[0]]
        for j in range(1, len(answer)):  # token j is predicted at the answer's position j - 1
            scores[:, i] += rest[:, i, j - 1, answer[j]]
    return scores


def zero_shot_cached(work: Path, bench: Bench, labels: list[str]) -> dict[str, Any]:
    """``zero_shot`` on the test split, cached in the work folder per model and split."""
    path = work / "runs" / bench.label / "zero_shot.json"
    if path.is_file():
        return json.loads(path.read_text())
    from studies.common import write_json

    result = zero_shot(bench.model, read_rows(bench.data["test"]), labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


def training_curve(bench: Bench, spec: RunSpec) -> dict[str, list[list[float]]]:
    """``{"loss": [[step, training loss], ...], "val": [[step, validation accuracy], ...]}`` of a finished run."""
    from torch_singlora.train.metrics import read_metrics

    records = read_metrics(bench.run_dir(spec))
    return {"loss": [[r["step"], r["loss"]] for r in records if r["kind"] == "train"],
            "val": [[r["step"], r["accuracy"]] for r in records if r["kind"] == "eval"]}


def final_loss(curve: dict[str, list[list[float]]], last: int = 8) -> float | None:
    """Mean training loss over the last ``last`` logged steps of ``training_curve``'s output (None if none)."""
    losses = [loss for _, loss in curve["loss"]]
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


def train_run(bench: Bench, spec: RunSpec) -> dict[str, Any]:
    """``bench.run(spec)``, with a run stopped by non-finite loss or weights recorded as diverged (not retried).

    A diverged run scores what a constant prediction scores (accuracy 1/5 on these balanced splits); the result
    says ``"diverged": true`` and the error, and is cached like any other.
    """
    from torch_singlora.errors import SingLoRAError

    try:
        return bench.run(spec)
    except SingLoRAError as exc:
        if "non-finite" not in str(exc):
            raise
        error = str(exc)
    from studies.common import write_json
    from torch_singlora.train.metrics import classification_metrics

    scores = {}
    for part in ("val", "test"):
        labels = sorted({row["label"] for row in read_rows(bench.data[part])})
        gold = torch.tensor([labels.index(row["label"]) for row in read_rows(bench.data[part])])
        scores[part] = classification_metrics(torch.zeros_like(gold), gold, len(labels))
    result = {"spec": dataclasses.asdict(spec), "diverged": True, "error": error,
              "val_accuracy": scores["val"]["accuracy"], "val_macro_f1": scores["val"]["macro_f1"],
              "test_accuracy": scores["test"]["accuracy"], "test_macro_f1": scores["test"]["macro_f1"],
              "trainable_params": None, "adapter_params": None, "seconds_per_step": None, "steps": None,
              "ramp_steps": None, "wall_s": 0.0}
    bench.run_dir(spec).mkdir(parents=True, exist_ok=True)
    write_json(bench.run_dir(spec) / "result.json", result)
    print(f"  {spec.key()}: DIVERGED ({error})", flush=True)
    return result
