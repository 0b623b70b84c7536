"""What is trained: the ``Task`` protocol, and the two tasks of ``singlora train`` (``classification``,
``causal-lm``). A new task plugs in by subclassing ``Task`` and adding one line to ``registry.TASKS``; the loop
never changes.

A task owns everything that depends on the data and the objective:

    load_tokenizer(path, info, flag)              the tokenizer (default: ``hf.load_tokenizer``)
    load_data(config, tokenizer) -> TaskData      read + check + split + tokenize; ``info`` goes to run_info.json
    read_eval_data(path, tokenizer, info, ...)    the same for ``singlora evaluate`` (settings from run_info.json)
    base_info(options)                            ``info`` for ``singlora evaluate`` of a base model (no adapter)
    collator(tokenizer, info)                     examples -> a batch of tensors with ``labels``
    loss(model, batch, info) -> (loss, stats)     the training loss of one micro-batch (default: model(**batch).loss)
                                                  and statistics logged with the step (e.g. DPO's rewards)
    load_model(path, info, dtype)                 the transformers model class (and head) to load
    heads(model)                                  modules trained fully and saved with the adapter (e.g. classifier)
    evaluate(model, batches, dataset=, tokenizer=, info=, accelerator=) -> metrics: floats, plus any JSON value
                                                  (e.g. sample generations); logged at each evaluation
    metrics                                       the metric names ``evaluate`` returns, the headline first
    evaluate_base                                 True: the loop also evaluates at step 0 (the base model's score)
    options                                       a dataclass of the task's own flags (``TrainConfig.task_options``)
    input_options                                 those of its options that name files it reads (``inputs``)
    needs_reference                               True: the objective compares the model with the one the run
                                                  started from (``methods.reference``), so ``--method full`` is refused
    default_max_length                            ``--max-length`` when not given (128)

Modules named in ``registry.TASKS`` are imported to build ``singlora train --help``: keep their top level light
(import transformers / datasets inside the methods).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..errors import SingLoRAError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from .config import TrainConfig

HEAD_NAMES = ("classifier", "score")  # the classification head of transformers' *ForSequenceClassification models


@dataclass
class TaskData:
    """What ``Task.load_data`` returns. ``info``: JSON values recorded in ``run_info.json`` (labels, max length,
    columns, ...) and handed back to ``collator`` / ``load_model`` / ``evaluate`` (in training and in ``singlora
    evaluate``)."""

    train: "Dataset"
    eval: "Dataset | None"
    info: dict[str, Any]


class Task:
    """One kind of training data and objective. Subclasses set ``name`` and ``metrics`` and implement the methods
    that raise ``NotImplementedError``; the others have defaults."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # what ``evaluate`` returns (floats), the headline metric first
    evaluate_base: ClassVar[bool] = False  # evaluate at step 0 too (the base model's score, before training)
    options: ClassVar[type | None] = None  # dataclass of the task's own flags, or None
    input_options: ClassVar[tuple[str, ...]] = ()  # the options naming a file the task reads (e.g. a chat template)
    default_max_length: ClassVar[int] = 128  # --max-length when not given (``TrainConfig.validate`` fills it)
    needs_reference: ClassVar[bool] = False  # the loss needs the starting model (adapters disabled, or a copy)

    def inputs(self, options: dict[str, Any]) -> dict[str, Any]:
        """``{flag: path}`` of the files that ``options`` (task options, as given) make the task read: what no
        output of the command may overwrite (``atomic.check_not_input``)."""
        return {"--" + name.replace("_", "-"): options.get(name) for name in self.input_options}

    def load_tokenizer(self, path: str, info: dict[str, Any], flag: str = "--tokenizer") -> Any:
        """The tokenizer in folder ``path`` (``flag`` names where the path came from). ``info``: the run's
        run_info.json when loading a trained run back; empty when training starts (``load_data`` may then adjust
        the tokenizer and record what it did in ``TaskData.info``)."""
        from ..hf import load_tokenizer

        return load_tokenizer(path, flag)

    def load_data(self, config: "TrainConfig", tokenizer: Any) -> TaskData:
        raise NotImplementedError

    def read_eval_data(self, path: str, tokenizer: Any, info: dict[str, Any], encoding: str | None) -> "Dataset":
        raise NotImplementedError

    def base_info(self, options: Any) -> dict[str, Any]:
        """``info`` to evaluate a base model without a trained run (``options``: ``parse_options``'s result)."""
        raise SingLoRAError(f"--task {self.name}: evaluating needs a trained adapter folder (the model is not "
                            "usable without its trained parts)")

    def collator(self, tokenizer: Any, info: dict[str, Any]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        raise NotImplementedError

    def load_model(self, path: str, info: dict[str, Any], dtype: Any = None) -> "nn.Module":
        raise NotImplementedError

    def loss(self, model: "nn.Module", batch: dict[str, Any],
             info: dict[str, Any]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        """The training loss of one micro-batch (a scalar tensor to back-propagate) and statistics to log with the
        optimizer step (scalar tensors, averaged over the step's micro-batches and processes; none by default)."""
        return model(**batch).loss, {}

    def heads(self, model: "nn.Module") -> list[str]:
        """Modules trained fully and saved with the adapter (full module names)."""
        return []

    def evaluate(self, model: "nn.Module", batches: Any, *, dataset: "Dataset", tokenizer: Any,
                 info: dict[str, Any], accelerator: Any = None) -> dict[str, Any]:
        """Metrics of ``model`` on ``batches`` (the ``collator``'s batches of ``dataset``, sharded over processes
        under ``accelerate``: pass ``accelerator`` to gather). Runs in eval mode, without gradients."""
        raise NotImplementedError

    def parse_options(self, values: dict[str, Any]) -> Any:
        """``values`` (``TrainConfig.task_options``) as the task's options dataclass; unknown names are errors."""
        if self.options is None:
            if values:
                raise SingLoRAError(f"--task {self.name} takes no task options, got {sorted(values)}")
            return None
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
            raise SingLoRAError(f"{flags}: not an option of --task {self.name} (its options: {sorted(known)})")
        return self.options(**values)


# ---- the two built-in tasks -------------------------------------------------------------------------------------


def _keep(count: int, limit: int, seed: int) -> list[int]:
    """``--max-train-samples``: ``limit`` of ``range(count)`` drawn with ``seed`` (sorted; all when limit is 0)."""
    order = list(range(count))
    if limit:
        random.Random(seed).shuffle(order)
        order = sorted(order[:limit])
    return order


class Classification(Task):
    """Sequence classification: ``(text, label)`` rows -> ``AutoModelForSequenceClassification`` with a fresh head
    for the training labels (the head trains fully). Metrics: accuracy, macro-F1."""

    name = "classification"
    metrics = ("accuracy", "macro_f1")

    def _read(self, path: str, text_column: str, label_column: str, encoding: str | None) -> tuple[list, list]:
        from . import data

        return data.read_classification(path, text_column, label_column, encoding)

    def load_data(self, config: "TrainConfig", tokenizer: Any) -> TaskData:
        from . import data

        texts, names = self._read(config.train_data, config.text_column, config.label_column, config.encoding)
        labels = sorted(set(names))
        if len(labels) < 2:
            raise SingLoRAError(f"{config.train_data}: classification needs >= 2 labels, found {labels}")
        info = {"labels": labels, "max_length": config.max_length, "text_column": config.text_column,
                "label_column": config.label_column}
        train_idx, eval_texts, eval_names = list(range(len(texts))), [], []
        if config.eval_data:
            eval_texts, eval_names = self._read(config.eval_data, config.text_column, config.label_column,
                                                config.encoding)
            extra = sorted(set(eval_names) - set(labels))
            if extra:
                raise SingLoRAError(f"label set mismatch: --eval-data {config.eval_data} has label(s) {extra[:10]} "
                                    f"that --train-data {config.train_data} does not have ({labels})")
        elif config.eval_split:
            train_idx, held = data.split_indices(names, config.eval_split, config.split_seed)
            eval_texts, eval_names = [texts[i] for i in held], [names[i] for i in held]
        train_idx = [train_idx[i] for i in _keep(len(train_idx), config.max_train_samples, config.split_seed)]
        ids = data.label_ids(names, labels, config.train_data)
        train = data.tokenize_classification(tokenizer, [texts[i] for i in train_idx], [ids[i] for i in train_idx],
                                             config.max_length)
        evaluation = None
        if eval_texts:
            evaluation = data.tokenize_classification(tokenizer, eval_texts, data.label_ids(
                eval_names, labels, config.eval_data or config.train_data), config.max_length)
        return TaskData(train, evaluation, info)

    def read_eval_data(self, path: str, tokenizer: Any, info: dict[str, Any], encoding: str | None) -> "Dataset":
        from . import data

        texts, names = self._read(path, info["text_column"], info["label_column"], encoding)
        return data.tokenize_classification(tokenizer, texts, data.label_ids(names, info["labels"], path),
                                            info["max_length"])

    def collator(self, tokenizer: Any, info: dict[str, Any]) -> Callable:
        from .data import Collator

        return Collator(tokenizer.pad_token_id, causal_lm=False)

    def load_model(self, path: str, info: dict[str, Any], dtype: Any = None) -> "nn.Module":
        from transformers import AutoModelForSequenceClassification

        from ..hf import from_pretrained

        labels = info["labels"]
        return from_pretrained(AutoModelForSequenceClassification, path, num_labels=len(labels),
                               id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                               dtype=dtype, new_modules=HEAD_NAMES)  # the run trains the head, the adapter has it

    def heads(self, model: "nn.Module") -> list[str]:
        children = dict(model.named_children())
        return [name for name in HEAD_NAMES if name in children]

    def evaluate(self, model: "nn.Module", batches: Any, *, dataset: "Dataset", tokenizer: Any,
                 info: dict[str, Any], accelerator: Any = None) -> dict[str, Any]:
        from .evaluate import class_predictions
        from .metrics import classification_metrics

        predictions, gold = class_predictions(model, batches, accelerator)
        return classification_metrics(predictions, gold, len(info["labels"]))


class CausalLM(Task):
    """Language modelling on raw text: documents joined with EOS and cut into blocks of ``max_length`` tokens,
    loss on every token -> ``AutoModelForCausalLM``. Metrics: eval loss (mean token cross-entropy), perplexity.
    The loss (training and evaluation) projects only the positions whose next token counts (``lm_loss``)."""

    name = "causal-lm"
    metrics = ("eval_loss", "perplexity")

    def load_data(self, config: "TrainConfig", tokenizer: Any) -> TaskData:
        from . import data

        def blocks(path: str) -> "data.TokenizedDataset":
            texts = data.read_texts(path, config.text_column, config.encoding)
            return data.tokenize_lm(tokenizer, texts, config.max_length)

        train, evaluation = blocks(config.train_data), None
        if config.eval_data:
            evaluation = blocks(config.eval_data)
        elif config.eval_split:
            keep, held = data.split_indices(len(train), config.eval_split, config.split_seed)
            train, evaluation = train.subset(keep), train.subset(held)
        train = train.subset(_keep(len(train), config.max_train_samples, config.split_seed))
        return TaskData(train, evaluation, {"labels": None, "max_length": config.max_length,
                                            "text_column": config.text_column})

    def base_info(self, options: Any) -> dict[str, Any]:
        from .config import TrainConfig

        return {"labels": None, "max_length": self.default_max_length, "text_column": TrainConfig().text_column}

    def read_eval_data(self, path: str, tokenizer: Any, info: dict[str, Any], encoding: str | None) -> "Dataset":
        from . import data

        return data.tokenize_lm(tokenizer, data.read_texts(path, info["text_column"], encoding), info["max_length"])

    def collator(self, tokenizer: Any, info: dict[str, Any]) -> Callable:
        from .data import Collator

        return Collator(tokenizer.pad_token_id, causal_lm=True)

    def load_model(self, path: str, info: dict[str, Any], dtype: Any = None) -> "nn.Module":
        from transformers import AutoModelForCausalLM

        from ..hf import from_pretrained

        return from_pretrained(AutoModelForCausalLM, path, dtype=dtype)

    def loss(self, model: "nn.Module", batch: dict[str, Any],
             info: dict[str, Any]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        """The mean cross-entropy of the trained tokens, projecting only their positions (``lm_loss``)."""
        from .lm_loss import lm_loss

        return lm_loss(model, batch), {}

    def evaluate(self, model: "nn.Module", batches: Any, *, dataset: "Dataset", tokenizer: Any,
                 info: dict[str, Any], accelerator: Any = None) -> dict[str, Any]:
        from .evaluate import token_loss
        from .metrics import lm_metrics

        total, tokens = token_loss(model, batches, accelerator)
        metrics = lm_metrics(total, tokens)
        return {"eval_loss": metrics["loss"], "perplexity": metrics["perplexity"]}
