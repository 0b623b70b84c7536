"""``TrainConfig`` and ``train()``: fine-tune a transformers model on ``accelerate`` (one process, ``accelerate
launch`` or ``torchrun``, unchanged).

Order of the work, per optimizer step: ``grad_accum`` micro-batches (forward, backward of loss / group size, no
gradient sync but on the last), gradient clipping, ``optimizer.step()`` (SingLoRA's ramp t advances through a
post-hook on the real optimizer, so t counts optimizer steps only), ``scheduler.step()``, logging, eval, checkpoint.

Determinism: the example order of epoch e is a permutation drawn from ``seed + e`` (not from the global RNG), and
a checkpoint stores the global RNG, so a resumed run replays exactly the batches and dropout masks that the
uninterrupted run would have seen: on CPU the final adapter is bitwise identical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SingLoRAError
from . import data as D
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, restore_parameters, save_checkpoint
from .evaluate import evaluate_model
from .methods import METHODS, MethodConfig, build, head_names, load_base, parse_ramp, parse_targets, write_run_info
from .metrics import METRICS_FILE, SUMMARY_FILE, MetricsLog, summary_table

SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")
# Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("resume", "quiet", "save_every", "name", "plot", "on_nonfinite")
NONFINITE_ACTIONS = ("stop", "skip")
NONFINITE_SKIP_LIMIT = 10  # consecutive skipped steps before ``--on-nonfinite skip`` gives up


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Options of ``singlora train`` (each field is a ``--flag``; its help is the text given here)."""

    model: str = _help("local folder of a transformers model (config.json + weights)", default="")
    train_data: str = _help("training data: .csv / .jsonl file or folder of class subfolders (classification), "
                            ".txt / .jsonl / folder of .txt (causal-lm)", default="")
    output_dir: str = _help("where the adapter, metrics.jsonl, summary.json, checkpoint.pt and plots go", default="")
    task: str = _help("classification or causal-lm", default="classification")
    eval_data: str | None = _help("evaluation data (same formats); default: --eval-split of the training data",
                                  default=None)
    eval_split: float = _help("fraction of the training data held out for evaluation when no --eval-data "
                              "(stratified by label; 0 = no evaluation)", default=0.0)
    split_seed: int = _help("seed of the train/eval split and of --max-train-samples (fixed split)", default=0)
    max_train_samples: int = _help("use at most this many training examples (0 = all)", default=0)
    text_column: str = _help("text column of CSV / JSONL data", default="text")
    label_column: str = _help("label column of CSV / JSONL data", default="label")
    encoding: str | None = _help("text encoding of the data files (default: UTF-8, else latin-1)", default=None)
    tokenizer: str | None = _help("tokenizer folder (default: --model)", default=None)
    method: str = _help(f"one of {', '.join(METHODS)}", default="singlora")
    target_modules: str | None = _help("modules to adapt: comma-separated names/suffixes, 'all-linear', or "
                                       "'re:<regex>' (default: per architecture, e.g. query,value for BERT)",
                                       default=None)
    r: int = _help("rank", default=8)
    alpha: float = _help("scale numerator: s = alpha / r", default=8.0)
    adapter_dropout: float = _help("dropout on the adapter input", default=0.0)
    ramp_up: str = _help("SingLoRA ramp-up T: int optimizer steps, or a fraction of the total steps", default="0.01")
    init: str = _help("SingLoRA init of A: normal (N(0, 1/n)) or kaiming_uniform (as public implementations)",
                      default="normal")
    loraplus_lr_ratio: float = _help("LoRA+: learning-rate ratio of B to A", default=16.0)
    lr: float = _help("peak learning rate", default=1e-3)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    scheduler: str = _help(f"learning-rate schedule: {', '.join(SCHEDULERS)}", default="linear")
    warmup: str = _help("warm-up: int optimizer steps or a fraction of the total steps", default="0.06")
    epochs: int = _help("epochs (ignored when --max-steps is set)", default=1)
    max_steps: int = _help("total optimizer steps (0 = --epochs)", default=0)
    batch_size: int = _help("micro-batch size per process", default=16)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    max_length: int = _help("maximum tokens per example (classification) or per block (causal-lm)", default=128)
    max_grad_norm: float = _help("gradient clipping (0 = off)", default=1.0)
    eval_every: int = _help("evaluate every N optimizer steps (0 = only at the end)", default=0)
    eval_batch_size: int = _help("batch size for evaluation", default=32)
    save_every: int = _help("write checkpoint.pt every N optimizer steps (0 = never)", default=100)
    log_every: int = _help("log training loss every N optimizer steps", default=1)
    seed: int = _help("seed of initialisation, example order and dropout", default=0)
    precision: str = _help(f"mixed precision: {', '.join(PRECISIONS)}", default="no")
    gradient_checkpointing: bool = _help("recompute activations in backward (less memory)", default=False)
    resume: bool = _help("continue from <output-dir>/checkpoint.pt", default=False)
    quiet: bool = _help("no progress bar, no table (errors still go to stderr)", default=False)
    plot: bool = _help("write <output-dir>/curves.png at the end", default=True)
    name: str | None = _help("run name in tables and plots (default: the method)", default=None)
    on_nonfinite: str = _help("on a NaN/Inf loss or gradient: stop (error naming the step, no adapter written, the "
                              f"last checkpoint kept) or skip that optimizer step (at most {NONFINITE_SKIP_LIMIT} "
                              "in a row)", default="stop")

    def validate(self) -> None:
        """Check the fields; errors name the flag."""
        for flag in ("model", "train_data", "output_dir"):
            if not getattr(self, flag):
                raise SingLoRAError(f"--{flag.replace('_', '-')} is required")
        if self.task not in D.TASKS:
            raise SingLoRAError(f"--task={self.task!r} must be one of {D.TASKS}")
        if self.method not in METHODS:
            raise SingLoRAError(f"--method={self.method!r} must be one of {METHODS}")
        if self.scheduler not in SCHEDULERS:
            raise SingLoRAError(f"--scheduler={self.scheduler!r} must be one of {SCHEDULERS}")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise SingLoRAError(f"--on-nonfinite={self.on_nonfinite!r} must be one of {NONFINITE_ACTIONS}")
        if self.precision not in PRECISIONS:
            raise SingLoRAError(f"--precision={self.precision!r} must be one of {PRECISIONS}")
        for flag in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every"):
            if getattr(self, flag) < 1:
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be >= 1")
        for flag in ("epochs", "max_steps", "eval_every", "save_every", "max_train_samples"):
            if getattr(self, flag) < 0:
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be >= 0")
        if self.epochs == 0 and self.max_steps == 0:
            raise SingLoRAError("--epochs=0 and --max-steps=0: nothing to train")
        if self.eval_data and self.eval_split:
            raise SingLoRAError("can't give both --eval-data and --eval-split")
        if self.r < 1:
            raise SingLoRAError(f"--r={self.r} must be >= 1")
        for flag in ("lr", "alpha", "loraplus_lr_ratio"):
            if not (math.isfinite(getattr(self, flag)) and getattr(self, flag) > 0):
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be a finite number > 0")
        for flag in ("max_grad_norm", "weight_decay"):  # a negative clip norm would flip the gradients
            if not (math.isfinite(getattr(self, flag)) and getattr(self, flag) >= 0):
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be a finite number >= 0")
        for flag in ("eval_split", "adapter_dropout"):
            if not 0 <= getattr(self, flag) < 1:
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be in [0, 1)")
        parse_ramp(self.ramp_up)
        _steps_or_fraction(self.warmup, "--warmup", 1)


def _steps_or_fraction(text: str, flag: str, total: int) -> int:
    """An int number of steps, or a fraction (with a dot) of ``total``."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise SingLoRAError(f"{flag}={text!r} must be an int (steps) or a fraction like 0.06") from None
    if value < 0 or (isinstance(value, float) and value > 1):
        raise SingLoRAError(f"{flag}={text!r}: steps must be >= 0, a fraction in [0, 1]")
    return round(value * total) if isinstance(value, float) else value


@dataclass
class Datasets:
    train: D.TokenizedDataset
    eval: D.TokenizedDataset | None
    labels: list[str] | None


def load_tokenizer(path: str) -> Any:
    """A tokenizer that can pad (pad = EOS when the tokenizer has no pad token)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise SingLoRAError(f"tokenizer folder {path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise SingLoRAError(f"tokenizer {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_datasets(config: TrainConfig, tokenizer: Any) -> Datasets:
    """Read, split and tokenize the training (and eval) data of ``config``."""
    rng = random.Random(config.split_seed)
    if config.task == "classification":
        texts, names = D.read_classification(config.train_data, config.text_column, config.label_column, config.encoding)
        labels = sorted(set(names))
        if len(labels) < 2:
            raise SingLoRAError(f"{config.train_data}: classification needs >= 2 labels, found {labels}")
        if config.eval_data:
            eval_texts, eval_names = D.read_classification(
                config.eval_data, config.text_column, config.label_column, config.encoding
            )
            extra = sorted(set(eval_names) - set(labels))
            if extra:
                raise SingLoRAError(
                    f"label set mismatch: --eval-data {config.eval_data} has label(s) {extra[:10]} that "
                    f"--train-data {config.train_data} does not have ({labels})"
                )
        else:
            eval_texts, eval_names = [], []
        train_idx = list(range(len(texts)))
        if config.eval_split:
            train_idx, held = D.split_indices(names, config.eval_split, config.split_seed)
            eval_texts, eval_names = [texts[i] for i in held], [names[i] for i in held]
        if config.max_train_samples:
            rng.shuffle(train_idx)
            train_idx = sorted(train_idx[: config.max_train_samples])
        ids = D.label_ids(names, labels, config.train_data)
        train = D.tokenize_classification(tokenizer, [texts[i] for i in train_idx], [ids[i] for i in train_idx],
                                          config.max_length)
        evaluation = None
        if eval_texts:
            evaluation = D.tokenize_classification(
                tokenizer, eval_texts, D.label_ids(eval_names, labels, config.eval_data or config.train_data),
                config.max_length,
            )
        return Datasets(train, evaluation, labels)
    train = D.tokenize_lm(tokenizer, D.read_texts(config.train_data, config.text_column, config.encoding),
                          config.max_length)
    evaluation = None
    if config.eval_data:
        evaluation = D.tokenize_lm(tokenizer, D.read_texts(config.eval_data, config.text_column, config.encoding),
                                   config.max_length)
    elif config.eval_split:
        keep, held = D.split_indices(len(train), config.eval_split, config.split_seed)
        train, evaluation = D.TokenizedDataset([train.input_ids[i] for i in keep]), D.TokenizedDataset(
            [train.input_ids[i] for i in held])
    if config.max_train_samples:
        order = list(range(len(train)))
        rng.shuffle(order)
        train = D.TokenizedDataset([train.input_ids[i] for i in sorted(order[: config.max_train_samples])])
    return Datasets(train, evaluation, None)


def _comparable(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}


def _all_finite(tensors: list[torch.Tensor | None]) -> bool:
    """Whether no tensor holds NaN/Inf (one host sync)."""
    present = [t for t in tensors if t is not None]
    return not present or bool(torch.stack([torch.isfinite(t).all() for t in present]).all())


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config``; returns the run summary (also written to ``<output_dir>/summary.json``)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    config.validate()
    if config.quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    output = Path(config.output_dir)
    checkpoint_path = output / CHECKPOINT_FILE
    state = load_checkpoint(checkpoint_path) if config.resume else None
    if state is not None:
        changed = sorted(k for k, v in _comparable(config).items() if state["config"].get(k) != v)
        if changed:
            raise SingLoRAError(f"--resume: {checkpoint_path} was written with different settings for {changed}")
    # Several processes and no GPU (torchrun on CPU): accelerate only goes multi-CPU (gloo) when told ``cpu=True``.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=config.precision, cpu=multi_cpu)
    main = accelerator.is_main_process
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    tokenizer = load_tokenizer(config.tokenizer or config.model)
    datasets = load_datasets(config, tokenizer)
    causal = config.task == "causal-lm"
    collate = D.Collator(tokenizer.pad_token_id, causal)

    def epoch_loader(epoch: int) -> Any:
        generator = torch.Generator().manual_seed(config.seed + epoch)
        order = torch.randperm(len(datasets.train), generator=generator)
        # The loader draws its base seed from ``generator``, not from the global RNG that dropout uses.
        loader = DataLoader(Subset(datasets.train, order.tolist()), batch_size=config.batch_size, collate_fn=collate,
                            generator=generator)
        return accelerator.prepare(loader)

    batches_per_epoch = len(epoch_loader(0))
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    eval_loader = None
    if datasets.eval is not None:
        eval_loader = accelerator.prepare(DataLoader(datasets.eval, batch_size=config.eval_batch_size, collate_fn=collate,
                                                  generator=torch.Generator()))  # evaluation leaves the RNG alone

    base = load_base(config.model, config.task, datasets.labels)
    if tokenizer.pad_token_id is not None and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if config.gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    heads = head_names(base) if config.task == "classification" and config.method != "full" else []
    head_params = sum(p.numel() for h in heads for p in base.get_submodule(h).parameters())
    method = MethodConfig(
        method=config.method, r=config.r, alpha=config.alpha, dropout=config.adapter_dropout,
        targets=parse_targets(config.target_modules), ramp_up=parse_ramp(config.ramp_up), total_steps=total_steps,
        loraplus_lr_ratio=config.loraplus_lr_ratio, init=config.init,
    )
    trainable = build(base, method, heads)
    optimizer = trainable.make_optimizer(config.lr, config.weight_decay)
    trainable.bind_ramp(optimizer)
    scheduler = get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=_steps_or_fraction(config.warmup, "--warmup", total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(trainable.model, optimizer)
    parameters = list(trainable.named_trainable().values())

    step, start_epoch, start_batch = 0, 0, 0
    if state is not None:
        restore_parameters(trainable.named_trainable(), state["trainable"], checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        trainable.set_ramp_step(state["ramp_step"])
        step, start_epoch, start_batch = state["step"], state["epoch"], state["batch"]
        _set_rng_state(state["rng"])
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SingLoRAError(f"--output-dir {output}: cannot create it: {exc.strerror}") from exc
    if main:  # temp files of writes a killed run never finished (the files they were replacing are intact)
        from ..atomic import remove_stale_temps

        for stale in remove_stale_temps(output) + remove_stale_temps(output / "adapter"):
            print(f"singlora train: removed {stale}, left by an interrupted write", file=sys.stderr)
    log = MetricsLog(output / METRICS_FILE, truncate_after_step=step if state is not None else None) if main else None

    def run_eval() -> dict[str, float]:
        assert eval_loader is not None
        metrics = evaluate_model(model, eval_loader, config.task, len(datasets.labels or []), accelerator)
        if log is not None:
            log.write({"kind": "eval", "step": step, **metrics})
        return metrics

    def write_checkpoint(epoch: int, batch: int) -> None:
        if main:
            save_checkpoint(checkpoint_path, {
                "trainable": {k: v.detach().cpu() for k, v in trainable.named_trainable().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ramp_step": trainable.ramp_step(), "rng": _rng_state(),
                "step": step, "epoch": epoch, "batch": batch, "config": _comparable(config),
            })
        accelerator.wait_for_everyone()

    progress = tqdm(total=total_steps, initial=step, disable=config.quiet or not main, desc=config.name or config.method)
    step_seconds: list[float] = []
    skipped, in_a_row = 0, 0

    def nonfinite(what: str, epoch: int, first: int, last: int) -> None:
        """Stop (``SingLoRAError`` naming the step) or, under ``--on-nonfinite skip``, drop this step's gradients."""
        nonlocal skipped, in_a_row
        optimizer.zero_grad(set_to_none=True)
        where = f"optimizer step {step + 1} (epoch {epoch}, micro-batches {first}-{last})"
        if config.on_nonfinite == "skip" and in_a_row < NONFINITE_SKIP_LIMIT:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if main:
                print(f"singlora train: warning: {what} at {where}; step skipped", file=sys.stderr)
            return
        kept = (f"the last checkpoint ({checkpoint_path}) is intact: resume with --resume" if checkpoint_path.exists()
                else "no checkpoint was written yet")
        raise SingLoRAError(
            f"{what} at {where}{f' after {in_a_row} skipped steps in a row' if in_a_row else ''}; stopped without "
            f"writing an adapter; {kept} (--on-nonfinite skip drops such steps; or lower --lr={config.lr})"
        )

    model.train()
    epoch = start_epoch
    while step < total_steps:
        loader = epoch_loader(epoch)
        skip = start_batch if epoch == start_epoch else 0
        micro = accelerator.skip_first_batches(loader, skip) if skip else loader
        running, started = torch.zeros(()), time.perf_counter()
        for index, batch in enumerate(micro, start=skip):
            group_start = index - index % config.grad_accum
            group_size = min(config.grad_accum, batches_per_epoch - group_start)
            sync = index + 1 == group_start + group_size
            with nullcontext() if sync else accelerator.no_sync(model):
                loss = model(**batch).loss
                accelerator.backward(loss / group_size)
            running += loss.detach().float().cpu() / group_size
            if not sync:
                continue
            # NaN/Inf loss or gradients (fp16: the GradScaler handles gradients); every process decides alike.
            loss_ok = bool(torch.isfinite(running))
            grads_ok = config.precision == "fp16" or _all_finite([p.grad for p in parameters])
            bad = accelerator.reduce(torch.tensor(float(not (loss_ok and grads_ok)), device=accelerator.device), "sum")
            if float(bad) > 0:
                what = f"non-finite loss ({float(running)})" if not loss_ok else "non-finite gradients"
                nonfinite(what, epoch, group_start, index)
                running, started = torch.zeros(()), time.perf_counter()
                continue
            in_a_row = 0
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            if not _all_finite(parameters):
                raise SingLoRAError(f"non-finite weights after optimizer step {step + 1} (epoch {epoch}); stopped "
                                    f"without writing an adapter; lower --lr={config.lr}")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds.append(time.perf_counter() - started)
            mean_loss = float(accelerator.reduce(running.to(accelerator.device), "mean"))
            lr, u = scheduler.get_last_lr()[0], trainable.u()
            if log is not None and (step % config.log_every == 0 or step == total_steps):
                log.write({"kind": "train", "step": step, "loss": mean_loss, "lr": lr, "u": u, "epoch": epoch})
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **({"u": f"{u:.2f}"} if u is not None else {}))
            if config.eval_every and eval_loader is not None and step % config.eval_every == 0 and step < total_steps:
                run_eval()
            if config.save_every and step % config.save_every == 0:
                write_checkpoint(epoch, index + 1)
            if step >= total_steps:
                break
            running, started = torch.zeros(()), time.perf_counter()
        epoch += 1
    progress.close()

    final = run_eval() if eval_loader is not None else {}
    unwrapped = accelerator.unwrap_model(model)
    adapter_dir = output / "adapter"
    summary: dict[str, Any] = {}
    if main:
        weights = trainable.save(adapter_dir, unwrapped)
        if trainable.method == "full":
            tokenizer.save_pretrained(adapter_dir)
        write_run_info(adapter_dir, {
            "task": config.task, "method": config.method, "base_model": str(Path(config.model).resolve()),
            "tokenizer": str(Path(config.tokenizer or config.model).resolve()), "labels": datasets.labels,
            "max_length": config.max_length, "text_column": config.text_column, "label_column": config.label_column,
            "target_modules": trainable.target_names,
        })
        n_trainable = sum(p.numel() for p in parameters)
        summary = {
            "name": config.name or config.method, "method": config.method, "task": config.task, **final,
            "trainable_params": n_trainable, "adapter_params": None if config.method == "full" else n_trainable - head_params,
            "adapter_file_bytes": weights.stat().st_size, "steps": step, "total_steps": total_steps,
            "skipped_steps": skipped,
            "seconds_per_step": sum(step_seconds) / len(step_seconds) if step_seconds else None,
            "adapted_modules": len(trainable.target_names), "ramp_steps": _ramp_steps(trainable),
            "config": dataclasses.asdict(config),
        }
        from ..atomic import atomic_write_text

        text = json.dumps(summary, indent=2) + "\n"
        atomic_write_text(output / SUMMARY_FILE, text)
        if config.plot:
            from .plots import plot_runs

            plot_runs([output], output / "curves.png")
        if not config.quiet:
            print(summary_table([summary]))
    accelerator.wait_for_everyone()
    return summary


def _ramp_steps(trainable: Any) -> int | None:
    for _, layer in getattr(trainable.model, "singlora_layers", lambda: [])():
        return next(iter(layer.singlora.values())).ramp_steps
    return None
