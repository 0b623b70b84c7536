"""``train(config)``: fine-tune a transformers model on ``accelerate`` (one process, ``accelerate launch`` or
``torchrun``, unchanged). It reads top to bottom:

1. ``prepare``: the output folder (a new run, or ``--resume``), tokenizer, data (the task), base model, the
   method's trainable model, optimizer, scheduler, and the checkpoint's state when resuming.
2. the steps (``train_epoch``): per optimizer step, ``grad_accum`` micro-batches, then ``OptimizerStep.step``
   (non-finite policy, clipping, optimizer, scheduler); then ``after_step``: log, evaluate, checkpoint.
3. ``finish``: the final evaluation, the adapter folder (+ run_info.json), summary.json, curves.png.

What depends on the data and the objective is the task's (``tasks.Task``); what depends on SingLoRA / PEFT / full
fine-tuning is the method's (``methods.Method``); the loop knows neither.

Determinism: the example order of epoch e is a permutation drawn from ``seed + e`` (not from the global RNG),
evaluation leaves the global RNG as it found it, and a checkpoint stores the global RNG, so a resumed run replays
exactly the batches and dropout masks that the uninterrupted run would have seen: on CPU the final adapter is
bitwise identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import resolve_steps
from ..errors import SingLoRAError
from ..hf import check_model_folder
from ..runs import (RunFolder, check_resumable, data_fingerprint, folder_fingerprint, model_fingerprint,
                    write_run_info)
from .checkpoint import TrainingState, load_checkpoint, restore_parameters, save_checkpoint
from .config import NONFINITE_SKIP_LIMIT, RESUMABLE_CHANGES, TrainConfig
from .methods import Method, MethodSettings, check_init_adapter, method_class, parse_targets
from .metrics import MetricsLog, summary_table
from .packing import example_length, length_grouped_order
from .registry import get_task
from .run_config import resolved, to_yaml
from .schedule import make_scheduler, short_run_warnings
from .step import OptimizerStep
from .tracking import Trackers, parse_report_to
from .tasks import Task, TaskData


@dataclass
class Run:
    """A run in progress: what ``prepare`` builds, and the position the steps advance."""

    config: TrainConfig
    task: Task
    folder: RunFolder
    accelerator: Any
    tokenizer: Any
    data: TaskData
    collate: Any  # the task's collator
    method: Method
    model: nn.Module  # the module to call (``method.model`` prepared by accelerate)
    optimizer: Any
    scheduler: Any
    stepper: OptimizerStep
    eval_loader: Any
    batches_per_epoch: int
    total_steps: int
    identity: dict[str, str]
    log: MetricsLog | None = None  # on the main process only
    trackers: Trackers | None = None  # --report-to, on the main process only
    progress: Any = None
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch: int = 0  # micro-batches of that epoch already done
    base_metrics: dict[str, Any] | None = None
    step_seconds: list[float] = field(default_factory=list)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # ``Task.loss`` statistics of the current step

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config``; returns the run summary (also written to ``<output_dir>/summary.json``)."""
    run = prepare(config)
    try:
        if run.task.evaluate_base and run.eval_loader is not None and run.step == 0:
            with run.method.reference():  # the score of the model the run starts from (base, or --init-adapter)
                run.base_metrics = evaluate(run)
        run.model.train()
        while run.step < run.total_steps:
            train_epoch(run)
        run.progress.close()
        return finish(run)
    finally:
        if run.trackers is not None:
            run.trackers.close()


# ---- 1. prepare -------------------------------------------------------------------------------------------------


def prepare(config: TrainConfig) -> Run:
    """Everything the steps need; on ``--resume`` restored from the checkpoint. Nothing is written into the output
    folder before the data and the model have loaded."""
    from transformers.utils import logging as hf_logging

    from ..integrations.quantized import quiet_bitsandbytes

    quiet_bitsandbytes()
    config.validate()
    task = get_task(config.task)
    if config.quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    folder = RunFolder(config.output_dir)
    folder.check_inputs(config.inputs())  # also under --overwrite and --resume
    if config.resume:
        folder.check_resumable_folder()
    state = load_checkpoint(folder.checkpoint) if config.resume else None
    if state is None:
        folder.check_new_run(config.overwrite)
    else:
        check_resumable(folder.checkpoint, state.config, comparable_settings(config), "settings")
    accelerator = make_accelerator(config)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    check_model_folder(config.model)
    tokenizer = task.load_tokenizer(config.tokenizer or config.model, {},
                                    "--tokenizer" if config.tokenizer else "--model")
    data = task.load_data(config, tokenizer)
    collate = task.collator(tokenizer, data.info)
    batches_per_epoch = len(epoch_loader(config, accelerator, data, collate, 0))
    steps_per_epoch = -(-batches_per_epoch // config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    eval_loader = None
    if data.eval is not None:
        from torch.utils.data import DataLoader

        eval_loader = accelerator.prepare(DataLoader(data.eval, batch_size=config.eval_batch_size, collate_fn=collate,
                                                     generator=torch.Generator()))  # leaves the global RNG alone

    method = make_method(config, task, data, tokenizer, total_steps)
    optimizer = method.make_optimizer(config.lr, config.weight_decay)
    method.bind_ramp(optimizer)
    warmup = resolve_steps(config.warmup, total_steps)
    scheduler = make_scheduler(config.scheduler, optimizer, warmup_steps=warmup, total_steps=total_steps)
    if accelerator.is_main_process and not config.quiet:
        for warning in short_run_warnings(total_steps, warmup, method.ramp_up_steps()):
            print(f"singlora train: warning: {warning}", file=sys.stderr)
    model, optimizer = accelerator.prepare(method.model, optimizer)
    parameters = list(method.named_trainable().values())

    stepper = OptimizerStep(
        accelerator, model, optimizer, scheduler, parameters, max_grad_norm=config.max_grad_norm,
        on_nonfinite=config.on_nonfinite, skip_limit=NONFINITE_SKIP_LIMIT, check_gradients=config.precision != "fp16",
        advice=lambda: f"{folder.resume_advice()} (--on-nonfinite skip drops such steps; or lower --lr={config.lr})")
    identity = {"data": data_fingerprint([data.train, data.eval]), "model": model_fingerprint(config.model)}
    if config.init_adapter:
        identity["init_adapter"] = folder_fingerprint(config.init_adapter)
    run = Run(config, task, folder, accelerator, tokenizer, data, collate, method, model, optimizer, scheduler, stepper,
              eval_loader, batches_per_epoch, total_steps, identity)
    if state is not None:
        restore(run, state)
    start_output(run, state)
    return run


def make_method(config: TrainConfig, task: Task, data: TaskData, tokenizer: Any, total_steps: int) -> Method:
    """The base model (the task's class) made trainable by the method (SingLoRA, PEFT or full)."""
    base = task.load_model(config.model, data.info)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if config.gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = MethodSettings(
        method=config.method, r=config.r, alpha=config.alpha, dropout=config.adapter_dropout,
        targets=parse_targets(config.target_modules),
        ramp_up_steps=config.ramp_up_steps,
        total_steps=total_steps, loraplus_lr_ratio=config.loraplus_lr_ratio, init=config.init,
        init_adapter=config.init_adapter,
    )
    method = method_class(config.method)
    if config.init_adapter:
        check_init_adapter(method, settings, base, task.heads(base))
    return method.wrap(base, settings, task.heads(base))


def comparable_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings that must not change when resuming."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}


def make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator

    if config.precision == "fp16" and not torch.cuda.is_available():
        raise SingLoRAError("--precision fp16 needs a CUDA GPU (fp16 autocast and loss scaling); on this machine use "
                            "--precision bf16 or no")
    # Several processes and no GPU (torchrun on CPU): accelerate only goes multi-CPU (gloo) when told ``cpu=True``.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=config.precision, cpu=multi_cpu)


def epoch_loader(config: TrainConfig, accelerator: Any, data: TaskData, collate: Any, epoch: int) -> Any:
    """The micro-batches of ``epoch``: a permutation drawn from ``seed + epoch``, not from the global RNG
    (``--group-by-length``: regrouped so that batches hold examples of similar lengths)."""
    from torch.utils.data import DataLoader, Subset

    generator = torch.Generator().manual_seed(config.seed + epoch)
    order = torch.randperm(len(data.train), generator=generator).tolist()
    if config.group_by_length:
        lengths = [example_length(data.train[i]) for i in range(len(data.train))]
        order = length_grouped_order(order, lengths, config.batch_size)
    # The loader draws its base seed from ``generator``, not from the global RNG that dropout uses.
    return accelerator.prepare(DataLoader(Subset(data.train, order), batch_size=config.batch_size,
                                          collate_fn=collate, generator=generator))


def restore(run: Run, state: TrainingState) -> None:
    """Continue from ``state``: the same inputs (else an error), weights, optimizer, scheduler, ramp, RNG, position."""
    check_resumable(run.folder.checkpoint, state.identity, run.identity,
                    "inputs (tokenized data / base model / init adapter)")
    restore_parameters(run.method.named_trainable(), state.trainable, run.folder.checkpoint)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    run.method.set_ramp_step(state.ramp_step)
    torch.set_rng_state(state.rng["torch"])
    if "cuda" in state.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.rng["cuda"])
    run.step, run.epoch, run.batch = state.step, state.epoch, state.batch
    run.stepper.skipped, run.base_metrics = state.skipped, state.base_metrics


def start_output(run: Run, state: TrainingState | None) -> None:
    """Create the output folder (a new run: after removing the previous one under ``--overwrite``), remove temp
    files a killed run left, open the metrics log (resuming: its first ``log_records`` lines), the progress bar."""
    from tqdm.auto import tqdm

    from ..atomic import atomic_write_text

    config, folder = run.config, run.folder
    if run.main:
        folder.create()
        if state is None and config.overwrite:
            for name in folder.clear():
                print(f"singlora train: --overwrite: removed {folder.path / name}", file=sys.stderr)
        for stale in folder.remove_stale_temps():
            print(f"singlora train: removed {stale}, left by an interrupted write", file=sys.stderr)
        document = resolved(config)
        run.trackers = Trackers(parse_report_to(config.report_to), folder.path, config.name or folder.path.name,
                                document)  # first: one that cannot start leaves no run files
        atomic_write_text(folder.config, to_yaml(document))  # `singlora train --config` repeats the run
        run.log = MetricsLog(folder.metrics, keep_records=state.log_records if state is not None else None,
                             sink=run.trackers.log)
    run.accelerator.wait_for_everyone()
    run.progress = tqdm(total=run.total_steps, initial=run.step, disable=config.quiet or not run.main,
                        desc=config.name or config.method)


# ---- 2. the steps -----------------------------------------------------------------------------------------------


def train_epoch(run: Run) -> None:
    """The optimizer steps of epoch ``run.epoch`` from micro-batch ``run.batch`` on, until the epoch or the run
    ends. The last group of an epoch may hold fewer than ``grad_accum`` micro-batches."""
    config = run.config
    loader = epoch_loader(config, run.accelerator, run.data, run.collate, run.epoch)
    batches = run.accelerator.skip_first_batches(loader, run.batch) if run.batch else loader
    started = time.perf_counter()
    for index, batch in enumerate(batches, start=run.batch):
        first = index - index % config.grad_accum  # the first micro-batch of this optimizer step
        size = min(config.grad_accum, run.batches_per_epoch - first)
        last = index == first + size - 1
        with run.stepper.accumulating(last):
            loss, stats = run.task.loss(run.model, batch, run.data.info)
            run.stepper.backward(loss, size)
        for name, value in stats.items():
            run.stats[name] = run.stats.get(name, 0) + value.detach().float() / size
        if not last:
            continue
        run.batch = index + 1
        lr = run.scheduler.get_last_lr()[0]  # what this step runs at (the scheduler moves on after it)
        loss = run.stepper.step(f"optimizer step {run.step + 1} (epoch {run.epoch}, micro-batches {first}-{index})")
        stats = step_stats(run)
        if loss is not None:  # None: skipped (--on-nonfinite skip)
            run.step += 1
            run.step_seconds.append(time.perf_counter() - started)
            after_step(run, loss, lr, stats)
            if run.step >= run.total_steps:
                return
        started = time.perf_counter()
    run.epoch, run.batch = run.epoch + 1, 0


def step_stats(run: Run) -> dict[str, float]:
    """The ``Task.loss`` statistics of the step just ended: means over its micro-batches and the processes."""
    stats, run.stats = run.stats, {}
    if not stats:
        return {}
    names = sorted(stats)
    means = run.accelerator.reduce(torch.stack([stats[n] for n in names]).to(run.accelerator.device), "mean")
    return dict(zip(names, means.tolist()))


def after_step(run: Run, loss: float, lr: float, stats: dict[str, float]) -> None:
    """Log the step (its loss, the ``lr`` and ``u`` it ran at: ``u`` at rest after step k is the one step k used,
    and its ``stats``), show progress, evaluate and write a checkpoint when they are due."""
    config = run.config
    u = run.method.u()
    if run.log is not None and (run.step % config.log_every == 0 or run.step == run.total_steps):
        run.log.write({"kind": "train", "step": run.step, "loss": loss, "lr": lr, "u": u,
                       "grad_norm": run.stepper.grad_norm, "epoch": run.epoch, **stats})
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **({"u": f"{u:.2f}"} if u is not None else {}))
    if config.eval_every and run.eval_loader is not None and run.step % config.eval_every == 0 \
            and run.step < run.total_steps:
        evaluate(run)
    if config.save_every and run.step % config.save_every == 0:
        save_state(run)


def evaluate(run: Run) -> dict[str, Any]:
    """The task's metrics on the eval data, logged; the global RNG (dropout of the next steps) is left as it was."""
    rng = torch.get_rng_state()
    try:
        metrics = run.task.evaluate(run.model, run.eval_loader, dataset=run.data.eval, tokenizer=run.tokenizer,
                                    info=run.data.info, accelerator=run.accelerator)
    finally:
        torch.set_rng_state(rng)
    if run.log is not None:
        run.log.write({"kind": "eval", "step": run.step, **metrics})
    return metrics


def save_state(run: Run) -> None:
    """Write ``checkpoint.pt`` (main process) with everything ``restore`` needs."""
    if run.main:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_checkpoint(run.folder.checkpoint, TrainingState(
            trainable={k: v.detach().cpu() for k, v in run.method.named_trainable().items()},
            optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
            ramp_step=run.method.ramp_step(), rng=rng, step=run.step, epoch=run.epoch, batch=run.batch,
            skipped=run.stepper.skipped, log_records=run.log.records if run.log else 0,
            base_metrics=run.base_metrics, config=comparable_settings(run.config), identity=run.identity,
        ))
    run.accelerator.wait_for_everyone()


# ---- 3. finish --------------------------------------------------------------------------------------------------


def finish(run: Run) -> dict[str, Any]:
    """The final evaluation; the adapter folder (written whole or not at all), summary.json, curves.png."""
    from ..atomic import atomic_directory, atomic_write_text

    config = run.config
    final = evaluate(run) if run.eval_loader is not None else {}
    summary: dict[str, Any] = {}
    if run.main:
        with atomic_directory(run.folder.adapter) as tmp:
            weights = run.method.save(tmp, run.accelerator.unwrap_model(run.model), run.tokenizer, config.save_dtype)
            write_run_info(tmp, {
                "task": config.task, "method": config.method, "base_model": str(Path(config.model).resolve()),
                "tokenizer": str(Path(config.tokenizer or config.model).resolve()),
                "target_modules": run.method.target_names,
                "init_adapter": str(Path(config.init_adapter).resolve()) if config.init_adapter else None,
                "config": resolved(config), **run.data.info,
            })
            weights_bytes = weights.stat().st_size
        summary = {
            "name": config.name or config.method, "method": config.method, "task": config.task, **final,
            "metrics": list(run.task.metrics), "base": run.base_metrics,
            "trainable_params": sum(p.numel() for p in run.method.named_trainable().values()),
            "adapter_params": run.method.adapter_params(), "adapter_file_bytes": weights_bytes,
            "steps": run.step, "total_steps": run.total_steps, "skipped_steps": run.stepper.skipped,
            "seconds_per_step": sum(run.step_seconds) / len(run.step_seconds) if run.step_seconds else None,
            "adapted_modules": len(run.method.target_names), "ramp_up_steps": run.method.ramp_up_steps(),
            **({"truncated": run.data.info["truncated"]} if "truncated" in run.data.info else {}),
            "config": dataclasses.asdict(config),
        }
        atomic_write_text(run.folder.summary, json.dumps(summary, indent=2) + "\n")
        if config.plot:
            from .plots import plot_runs

            plot_runs([run.folder.path], run.folder.curves)
        if not config.quiet:
            print(summary_table([summary]))
    run.accelerator.wait_for_everyone()
    return summary
