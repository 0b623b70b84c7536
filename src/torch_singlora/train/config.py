"""``TrainConfig``: every option of ``singlora train`` in one validated dataclass (one field = one ``--flag``, its
help text in the field's metadata). ``--ramp-up-steps`` and ``--warmup`` are "steps or a fraction of the run",
read once, by ``validate`` with the library's one parser (``torch_singlora.config.parse_steps_or_fraction``): after
it the fields hold an ``int`` (steps) or a ``float`` (fraction), whatever text the command line gave.

Task-specific options (e.g. those of ``--task sft``) are not fields here: each task declares its own options
dataclass (``tasks.Task.options``) and the values travel in ``TrainConfig.task_options``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..adapter_file import SAVE_DTYPES
from ..config import DEFAULT_RAMP_UP_STEPS, parse_steps_or_fraction
from ..cli_options import check_at_least
from ..errors import SingLoRAError
from .methods import METHOD_NAMES
from .registry import TASKS, task_class
from .schedule import SCHEDULES
from .tracking import parse_report_to

SCHEDULERS = SCHEDULES
PRECISIONS = ("no", "bf16", "fp16")
NONFINITE_ACTIONS = ("stop", "skip")
NONFINITE_SKIP_LIMIT = 10  # consecutive skipped steps before ``--on-nonfinite skip`` gives up
# Settings that may differ between a run and its resumption: they change neither the data, the model nor the
# result. Paths are not compared as text: the run's identity (fingerprints of the data, the model and the init
# adapter) is (``torch_singlora.runs``).
RESUMABLE_CHANGES = ("resume", "overwrite", "quiet", "save_every", "save_dtype", "name", "plot", "on_nonfinite",
                     "report_to", "output_dir", "model", "tokenizer", "train_data", "eval_data", "init_adapter",
                     "eval_every", "eval_batch_size", "log_every", "config_file")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Options of ``singlora train`` (each field is a ``--flag``; its help is the text given here)."""

    model: str = _help("local folder of a transformers model (config.json + weights)", default="")
    train_data: str = _help("training data: .csv / .jsonl file or folder of class subfolders (classification), "
                            ".txt / .jsonl / folder of .txt (causal-lm); sft: .jsonl / .json / .csv / .parquet or a "
                            "dataset folder (save_to_disk, or files load_dataset reads) of chat rows in TRL's shapes: "
                            "messages ([{role, content}, ...]), prompt-completion (prompt + completion: text or "
                            "messages), alpaca (instruction [+ input] + output), conversations (ShareGPT: [{from, "
                            "value}, ...]); the format is found from the columns (--data-format names it)",
                            default="")
    output_dir: str = _help("where the adapter, metrics.jsonl, summary.json, checkpoint.pt and plots go", default="")
    task: str = _help(f"what to train: {', '.join(TASKS)}", default="classification")
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
    method: str = _help(f"one of {', '.join(METHOD_NAMES)}", default="singlora")
    target_modules: str | None = _help("modules to adapt: comma-separated names/suffixes, 'all-linear', or "
                                       "'re:<regex>' (default: per architecture, e.g. query,value for BERT)",
                                       default=None)
    r: int = _help("rank", default=8)
    alpha: float = _help("scale numerator: s = alpha / r", default=8.0)
    adapter_dropout: float = _help("dropout on the adapter input", default=0.0)
    ramp_up_steps: Union[str, int, float] = field(default=DEFAULT_RAMP_UP_STEPS, metadata={
        "help": "SingLoRA ramp-up T: int optimizer steps, or a fraction of the total steps", "aliases": ["--ramp-up"]})
    init: str = _help("SingLoRA init of A: normal (N(0, 1/n)) or kaiming_uniform (as public implementations)",
                      default="normal")
    loraplus_lr_ratio: float = _help("LoRA+: learning-rate ratio of B to A", default=16.0)
    init_adapter: str | None = _help("start from this trained adapter folder (RUN/adapter of an earlier run of the "
                                     "same --method; its own r, alpha, target modules and ramp are used) instead of "
                                     "a new adapter; it is also loaded a second time, frozen, as adapter 'ref': the "
                                     "step-0 score and DPO's reference", default=None)
    lr: float = _help("peak learning rate", default=1e-3)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    scheduler: str = _help(f"learning-rate schedule after the warm-up: {', '.join(SCHEDULERS)}", default="linear")
    warmup: Union[str, int, float] = _help("warm-up: int optimizer steps or a fraction of the total steps (step k of "
                                           "W runs at lr * k / W)", default=0.06)
    epochs: int = _help("epochs (ignored when --max-steps is set)", default=1)
    max_steps: int = _help("total optimizer steps (0 = --epochs)", default=0)
    batch_size: int = _help("micro-batch size per process", default=16)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    max_length: int | None = _help("maximum tokens per example (classification, sft) or per block (causal-lm); "
                                   "default: per task, 128 (sft: 1024, as TRL's SFTConfig)", default=None)
    max_grad_norm: float = _help("gradient clipping (0 = off)", default=1.0)
    eval_every: int = _help("evaluate every N optimizer steps (0 = only at the end)", default=0)
    eval_batch_size: int = _help("batch size for evaluation", default=32)
    save_every: int = _help("write checkpoint.pt every N optimizer steps (0 = never)", default=100)
    save_dtype: str = _help("storage dtype of the saved SingLoRA adapter: float32, bfloat16 or float16 (half the "
                            "file; loading casts back; values beyond float16's range are refused)", default="float32")
    log_every: int = _help("log training loss every N optimizer steps", default=1)
    seed: int = _help("seed of initialisation, example order and dropout", default=0)
    precision: str = _help(f"mixed precision: {', '.join(PRECISIONS)} (fp16 needs a CUDA GPU; bf16 also runs on "
                           "CPU)", default="no")
    gradient_checkpointing: bool = _help("recompute activations in backward (less memory)", default=False)
    group_by_length: bool = _help("batch examples of similar lengths together (less padding; transformers' "
                                  "group_by_length: the random order sorted within groups of 50 batches)",
                                  default=False)
    resume: bool = _help("continue the run in --output-dir from its checkpoint.pt", default=False)
    overwrite: bool = _help("replace the run already in --output-dir (its adapter, checkpoint, metrics, summary "
                            "and plot; other files stay)", default=False)
    quiet: bool = _help("no progress bar, no table (errors still go to stderr)", default=False)
    plot: bool = _help("write <output-dir>/curves.png at the end", default=True)
    name: str | None = _help("run name in tables, plots and trackers (default: the method)", default=None)
    report_to: str = _help("where the metrics also go (as metrics.jsonl): none, all (the installed ones), or some of "
                           "tensorboard, wandb, mlflow, trackio, comma-separated (transformers' report_to; each an "
                           "optional extra)", default="none")
    on_nonfinite: str = _help("on a NaN/Inf loss or gradient: stop (error naming the step, no adapter written, the "
                              f"last checkpoint kept) or skip that optimizer step (at most {NONFINITE_SKIP_LIMIT} "
                              "in a row)", default="stop")
    task_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "options of the chosen task (its Task.options dataclass; on the command line, its own flags)",
        "cli": False})
    config_file: str | None = field(default=None, metadata={
        "help": "the --config file the values were read from (an input: never overwritten); not kept in the run's "
                "config", "cli": False})

    def inputs(self) -> dict[str, str | None]:
        """``{flag: path}`` of everything the run reads: no file it writes or removes may be one of them
        (``atomic.check_not_input``)."""
        return {"--model": self.model, "--tokenizer": self.tokenizer, "--train-data": self.train_data,
                "--eval-data": self.eval_data, "--init-adapter": self.init_adapter, "--config": self.config_file,
                **task_class(self.task)().inputs(self.task_options)}

    def validate(self) -> None:
        """Check the fields (errors name the flag), read ``ramp_up_steps`` / ``warmup`` into numbers, and fill the
        defaults that depend on the task: ``max_length`` None -> ``Task.default_max_length``, so run_info.json,
        summary.json and the resume check record the values the run used."""
        for flag in ("model", "train_data", "output_dir"):
            if not getattr(self, flag):
                raise SingLoRAError(f"--{flag.replace('_', '-')} is required")
        if self.task not in TASKS:
            raise SingLoRAError(f"--task={self.task!r} must be one of {tuple(TASKS)}")
        if self.max_length is None:
            self.max_length = task_class(self.task).default_max_length
        if self.method not in METHOD_NAMES:
            raise SingLoRAError(f"--method={self.method!r} must be one of {METHOD_NAMES}")
        if self.save_dtype not in SAVE_DTYPES:
            raise SingLoRAError(f"--save-dtype={self.save_dtype!r} must be one of float32, bfloat16, float16")
        if self.save_dtype != "float32" and self.method != "singlora":
            raise SingLoRAError(f"--save-dtype={self.save_dtype} applies to --method singlora (got {self.method})")
        for flag, allowed in (("scheduler", SCHEDULERS), ("on_nonfinite", NONFINITE_ACTIONS),
                              ("precision", PRECISIONS)):
            if getattr(self, flag) not in allowed:
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)!r} must be one of {allowed}")
        check_at_least(self, 1, "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every", "r")
        check_at_least(self, 0, "epochs", "max_steps", "eval_every", "save_every", "max_train_samples")
        if self.epochs == 0 and self.max_steps == 0:
            raise SingLoRAError("--epochs=0 and --max-steps=0: nothing to train")
        if self.eval_data and self.eval_split:
            raise SingLoRAError("can't give both --eval-data and --eval-split")
        self._check_init_adapter()
        if self.resume and self.overwrite:
            raise SingLoRAError("can't give both --resume (continue the run) and --overwrite (replace it)")
        for flag in ("lr", "alpha", "loraplus_lr_ratio"):
            if not (math.isfinite(getattr(self, flag)) and getattr(self, flag) > 0):
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be a finite number > 0")
        for flag in ("max_grad_norm", "weight_decay"):  # a negative clip norm would flip the gradients
            if not (math.isfinite(getattr(self, flag)) and getattr(self, flag) >= 0):
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be a finite number >= 0")
        for flag in ("eval_split", "adapter_dropout"):
            if not 0 <= getattr(self, flag) < 1:
                raise SingLoRAError(f"--{flag.replace('_', '-')}={getattr(self, flag)} must be in [0, 1)")
        parse_report_to(self.report_to)
        self.ramp_up_steps = parse_steps_or_fraction(self.ramp_up_steps, "--ramp-up-steps")
        self.warmup = parse_steps_or_fraction(self.warmup, "--warmup")
        task_class(self.task)().parse_options(self.task_options)

    def _check_init_adapter(self) -> None:
        """``--init-adapter``: an adapter folder of this method (its own r, alpha, targets... are checked against
        the flags once the model has loaded: ``methods.check_init_adapter``); ``--method full`` has no adapter to
        start from, nor, for a task that compares with its starting model (DPO), a copy of that model."""
        if self.method == "full" and task_class(self.task).needs_reference:
            raise SingLoRAError(f"--task {self.task} compares the model with the one the run starts from, kept as the "
                                "adapters disabled (or a frozen copy of --init-adapter): use an adapter method "
                                "(--method singlora, lora, ...), not --method full")
        if not self.init_adapter:
            return
        from ..runs import RUN_INFO, read_run_info, run_folder_hint

        path = Path(self.init_adapter)
        if self.method == "full":
            raise SingLoRAError("--init-adapter starts from a trained adapter; --method full trains the whole model "
                                "(give the earlier run's merged model as --model instead)")
        if not path.is_dir():
            raise SingLoRAError(f"--init-adapter {str(path)!r}: no such folder{run_folder_hint(path)}")
        if (path / RUN_INFO).is_file():
            trained = read_run_info(path)["method"]
            if trained != self.method and {trained, self.method} != {"lora", "loraplus"}:
                raise SingLoRAError(f"--init-adapter {path} was trained with --method {trained}; give --method "
                                    f"{trained} (got {self.method})")

