"""``singlora train --task dpo``: preference tuning of a chat model (Direct Preference Optimization).

    singlora train --task dpo --model SmolLM2-135M-Instruct --train-data pairs.jsonl --eval-data test_pairs.jsonl \\
        --output-dir runs/dpo [--init-adapter runs/sft/adapter] [--beta 0.1] [--loss-type sigmoid|ipo]

Data: TRL's preference shapes (``llm.preference``), tokenized with the chat template and answer masking of
``--task sft``. Per pair, the log-probability of an answer is the sum over its answer tokens (TRL's), for the
policy (the model being trained) and for the reference: the model the run started from, which costs no second
model (``train.methods.reference``): the adapters disabled, or with ``--init-adapter RUN/adapter`` that adapter
loaded a second time, frozen, as adapter ``"ref"`` (TRL's ``ref_adapter_name``). With the log-ratios
``c = logp(chosen) - ref_logp(chosen)`` and ``r = logp(rejected) - ref_logp(rejected)``:

    sigmoid (DPO)   loss = -log sigmoid(beta * (c - r))                              (TRL's loss_type="sigmoid")
    ipo             loss = (c / |chosen| - r / |rejected| - 1 / (2 * beta))^2       (TRL's loss_type="ipo"; |.|:
                                                                                      answer tokens)
    rewards         chosen_reward = beta * c, rejected_reward = beta * r; reward_accuracy = mean(chosen > rejected),
                    reward_margin = mean(chosen - rejected) (TRL's rewards/chosen, rewards/accuracies, ...)
    preference_accuracy = mean(logp(chosen) > logp(rejected)): the model's own preference, reference-free (so
                    a base model, ``singlora evaluate --model BASE --task dpo``, and an SFT model score it too)

At step 0 the policy is its reference (SingLoRA's u(0) = 0, LoRA's B = 0, or the same adapter weights), so the
sigmoid loss is ln 2 and every reward 0. Each training step logs the batch's loss, rewards, reward accuracy and
margin, and log-probabilities; each evaluation (step 0, ``--eval-every``, the end) scores the held-out pairs the same
way, the first ``--eval-train-pairs`` training pairs (``train_pairs_*``), and the greedy answers to the first
``--eval-generations`` held-out prompts against the chosen answers (``exact_match``, ``rouge_l``). As TRL's
``disable_dropout``, the base model's dropout is off (the adapter's ``--adapter-dropout`` applies as given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ..cli_options import check_at_least
from ..errors import SingLoRAError
from ..train.tasks import TaskData
from .task import SFT, ChatOptions, _help

if TYPE_CHECKING:
    from torch import nn

    from ..train.config import TrainConfig
    from .preference import PreferenceDataset, PreferencePair

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class DPOOptions(ChatOptions):
    """The flags of ``--task dpo``."""

    beta: float = _help("DPO's beta: how far the model may move from its reference (TRL's default)", 0.1)
    loss_type: str = _help(f"preference loss: {' or '.join(LOSS_TYPES)} (TRL's names)", "sigmoid")
    packing: bool = _help("pack each batch's 2 x B sequences into rows without padding (--task sft's packing)",
                          False)
    eval_train_pairs: int = _help("training pairs also scored at each evaluation (train_pairs_* metrics; 0 = none)",
                                  64)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 0, "eval_train_pairs")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise SingLoRAError(f"--beta={self.beta} must be a finite number > 0")
        if self.loss_type not in LOSS_TYPES:
            raise SingLoRAError(f"--loss-type={self.loss_type!r} must be one of {LOSS_TYPES}")


# ---- the objective ---------------------------------------------------------------------------------------------


def sequence_logps(model: "nn.Module", batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, tokens)`` (N,): the summed log-probability of each sequence's trained tokens (labels not -100), and
    how many there are, for the N sequences of ``batch`` (padded rows, or packed: ``example_index``). Only those
    positions are projected on the vocabulary (``train.lm_loss.token_logprobs``)."""
    from ..train.lm_loss import token_logprobs

    logprobs, example = token_logprobs(model, batch)  # (M,) over the batch's M trained tokens
    count = int(batch["example_index"].max()) + 1 if "example_index" in batch else batch["input_ids"].shape[0]
    logps = logprobs.new_zeros(count).index_add(0, example, logprobs)
    tokens = torch.zeros(count, dtype=torch.long, device=example.device).index_add(0, example,
                                                                                   torch.ones_like(example))
    return logps, tokens


@dataclass
class PairScores:
    """Per pair (B,): the loss, the rewards and the policy's log-probabilities of either answer."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    def means(self, prefix: str = "", loss_name: str = "loss") -> dict[str, torch.Tensor]:
        """The logged statistics: means over the pairs (detached)."""
        chosen, rejected = self.chosen_rewards, self.rejected_rewards
        values = {loss_name: self.losses, "reward_accuracy": (chosen > rejected).float(),
                  "reward_margin": chosen - rejected, "chosen_reward": chosen, "rejected_reward": rejected,
                  "preference_accuracy": (self.chosen_logps > self.rejected_logps).float(),
                  "chosen_logps": self.chosen_logps, "rejected_logps": self.rejected_logps}
        return {prefix + name: value.detach().float().mean() for name, value in values.items()}

    @staticmethod
    def cat(parts: list["PairScores"]) -> "PairScores":
        return PairScores(*(torch.cat([getattr(p, f) for p in parts]) for f in PairScores.__dataclass_fields__))


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, *, beta: float,
                    loss_type: str) -> PairScores:
    """The scores of B pairs from the log-probabilities of their 2B sequences, chosen then rejected: ``policy``,
    ``reference`` (2B,) summed log-probabilities, ``tokens`` (2B,) answer tokens (module docstring)."""
    chosen_logps, rejected_logps = policy.chunk(2)
    chosen_ratio, rejected_ratio = (policy - reference).chunk(2)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        chosen_tokens, rejected_tokens = tokens.clamp(min=1).chunk(2)
        losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise SingLoRAError(f"loss_type={loss_type!r} must be one of {LOSS_TYPES}")
    return PairScores(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), chosen_logps.detach(),
                      rejected_logps.detach())


def score_pairs(model: "nn.Module", batch: dict[str, torch.Tensor], *, beta: float, loss_type: str) -> PairScores:
    """The pairs' scores: the reference's log-probabilities first (no gradient), then the policy's. A model without
    adapters (a base model evaluated) is its own reference: one pass."""
    from ..train.methods import has_adapters, reference

    alone = not has_adapters(model)
    if not alone:
        with torch.no_grad(), reference(model):
            reference_logps, _ = sequence_logps(model, batch)
    policy_logps, tokens = sequence_logps(model, batch)
    if alone:
        reference_logps = policy_logps.detach()
    return preference_loss(policy_logps, reference_logps, tokens, beta=beta, loss_type=loss_type)


def scores_over(model: "nn.Module", batches: Any, info: dict[str, Any], accelerator: Any = None) -> PairScores:
    """The scores of every pair in ``batches`` (eval mode, no gradient; gathered over processes)."""
    from ..hf import eval_mode

    parts = []
    with eval_mode(model):
        for batch in batches:
            scores = score_pairs(model, batch, beta=info["beta"], loss_type=info["loss_type"])
            if accelerator is not None:
                scores = PairScores(*accelerator.gather_for_metrics(tuple(vars(scores).values())))
            parts.append(scores)
    return PairScores.cat(parts)


# ---- the task --------------------------------------------------------------------------------------------------


class DPO(SFT):
    """Preference tuning of a causal LM on chosen / rejected pairs (module docstring); the tokenizer, chat template
    and model are ``--task sft``'s."""

    name = "dpo"
    metrics = ("reward_accuracy", "reward_margin", "preference_accuracy", "exact_match")
    options = DPOOptions
    needs_reference = True

    def load_model(self, path: str, info: dict[str, Any], dtype: Any = None) -> "nn.Module":
        """``--task sft``'s model with the base model's dropout off (TRL's ``disable_dropout``)."""
        model = super().load_model(path, info, dtype)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    def _info(self, options: DPOOptions, max_length: int | None) -> dict[str, Any]:
        from .tokenization import read_chat_template

        return {"labels": None, "max_length": max_length, "beta": options.beta, "loss_type": options.loss_type,
                "packing": options.packing,
                "chat_template": None if options.chat_template is None else read_chat_template(options.chat_template),
                "eval_train_pairs": options.eval_train_pairs, "eval_generations": options.eval_generations,
                "max_new_tokens": options.max_new_tokens, "eval_samples": options.eval_samples}

    def _read(self, path: str, info: dict[str, Any], split: str | None,
              encoding: str | None) -> list["PreferencePair"]:
        from .preference import read_pairs

        return read_pairs(path, split=split, encoding=encoding)

    def _tokenize(self, tokenizer: Any, pairs: list["PreferencePair"], info: dict[str, Any]) -> "PreferenceDataset":
        from .preference import tokenize_pairs

        return tokenize_pairs(tokenizer, pairs, max_length=info["max_length"])

    def load_data(self, config: "TrainConfig", tokenizer: Any) -> TaskData:
        """``--task sft``'s reading, splitting and tokenizing, of pairs; the held-out data carries the first
        ``--eval-train-pairs`` training pairs (``probe``), scored at each evaluation too."""
        data = super().load_data(config, tokenizer)
        count = min(data.info["eval_train_pairs"], len(data.train))
        if data.eval is not None and count:
            data.eval.probe = data.train.subset(range(count))
        return data

    def collator(self, tokenizer: Any, info: dict[str, Any]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        from .preference import PreferenceCollator

        return PreferenceCollator(tokenizer.pad_token_id, packing=bool(info.get("packing")))

    def loss(self, model: "nn.Module", batch: dict[str, Any],
             info: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = score_pairs(model, batch, beta=info["beta"], loss_type=info["loss_type"])
        return scores.losses.mean(), scores.means()

    def evaluate(self, model: "nn.Module", batches: Any, *, dataset: "PreferenceDataset", tokenizer: Any,
                 info: dict[str, Any], accelerator: Any = None) -> dict[str, Any]:
        from torch.utils.data import DataLoader

        from ..train.methods import REFERENCE_ADAPTER, add_reference_adapter
        from .generate import GenerationOptions
        from .metrics import generation_metrics

        inner = getattr(model, "module", model)
        adapters = getattr(inner, "configs", None) or getattr(inner, "peft_config", {})
        if info.get("init_adapter") and REFERENCE_ADAPTER not in adapters:  # a trained run loaded back
            add_reference_adapter(inner, info["init_adapter"])
        metrics: dict[str, Any] = {k: float(v) for k, v in scores_over(model, batches, info, accelerator).means(
            loss_name="eval_loss").items()}
        if dataset.probe is not None:
            loader = DataLoader(dataset.probe, batch_size=getattr(batches, "batch_size", None) or 8,
                                collate_fn=self.collator(tokenizer, info))
            if accelerator is not None:
                loader = accelerator.prepare(loader)
            probe = scores_over(model, loader, info, accelerator).means("train_pairs_")
            metrics.update({k: float(probe[k]) for k in ("train_pairs_loss", "train_pairs_reward_accuracy",
                                                         "train_pairs_reward_margin")})
        count = min(info["eval_generations"], len(dataset))
        if count:
            generator = accelerator.unwrap_model(model) if accelerator is not None else model
            options = GenerationOptions(max_new_tokens=info["max_new_tokens"], batch_size=16)
            metrics.update(generation_metrics(generator, tokenizer, [p.chosen for p in dataset.pairs[:count]],
                                              options=options, samples=info["eval_samples"]))
        return metrics
