"""The ``singlora`` command: fine-tune, evaluate, merge, export and inspect adapters.

    singlora train --model PATH --train-data DATA --output-dir OUT [--method singlora|lora|dora|loraplus|full] ...
    singlora evaluate OUT/adapter --data DATA
    singlora merge OUT/adapter MERGED_DIR
    singlora export OUT/adapter LORA_DIR [--format peft|diffusers|kohya|gguf]
    singlora inspect OUT/adapter
    singlora report OUT1 OUT2 ... [--plot curves.png]

Each subcommand is a typed function plus an ``add_parser(subparsers)`` that registers it. Other modules add
subcommands the same way: list them in ``EXTERNAL_SUBCOMMANDS`` (imported only if they exist).
Errors about user input (``SingLoRAError``) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .adapter_file import SAVE_DTYPES
from .cli_options import add_dataclass_arguments, add_task_options, task_options
from .errors import SingLoRAError

# Modules exposing ``add_parser(subparsers)``; skipped when not installed/written yet.
EXTERNAL_SUBCOMMANDS = ["torch_singlora.diffusion.cli", "torch_singlora.llm.cli", "torch_singlora.serving.cli"]


# ---- subcommands ------------------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> None:
    from .train.loop import train
    from .train.run_config import resolved, to_yaml

    config = train_config(args)
    if args.print_config:
        config.validate()
        print(to_yaml(resolved(config)), end="")
        return
    train(config)


def train_config(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of ``singlora train``: the ``--config`` file's values, overridden by the flags given on
    the command line (the train parser leaves the others out), the rest the defaults."""
    from .train.config import TrainConfig
    from .train.run_config import check_task_options, file_values, train_fields

    values, options = file_values(args.config) if args.config else ({}, {})
    if options:
        check_task_options(options, values.get("task", TrainConfig.task), f"--config {args.config}")
    values.update({name: getattr(args, name) for name in train_fields() if hasattr(args, name)})
    options.update(task_options(args, values.get("task", TrainConfig.task)))
    args.output_dir = values.get("output_dir", "")  # for the Ctrl-C message
    return TrainConfig(**values, task_options=options, config_file=args.config)


def _add_train(subparsers: Any) -> None:
    from .train.config import TrainConfig  # light: no transformers import at module level

    parser = subparsers.add_parser("train", help="fine-tune a transformers model (SingLoRA, LoRA, DoRA, LoRA+, full)",
                                   description="Fine-tune a local transformers model with SingLoRA (or LoRA, DoRA, "
                                   "LoRA+ through PEFT, or fully) for one of the tasks (--task). "
                                   "--model, --train-data and --output-dir are required.")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="read the flags from this YAML / TOML / JSON file (keys: the flag names, e.g. lr, "
                        "max_steps, beta); flags given on the command line override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML: every flag, defaults filled in, paths absolute) and "
                        "exit without training; a run keeps it in <output-dir>/config.yaml")
    add_dataclass_arguments(parser, TrainConfig, suppress=True)  # absent flags: the config file's or the default
    add_task_options(parser)
    parser.set_defaults(func=cmd_train)


def evaluate(adapter: str | None, data: str, *, model: str | None = None, task: str | None = None,
             options: dict[str, Any] | None = None, batch_size: int = 32, encoding: str | None = None,
             output: str | None = None, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Metrics of a trained output folder (``<output-dir>/adapter``) on ``data`` (same formats as training), or of
    a base model (``model`` + ``task``, no adapter) where the task can evaluate one (``Task.base_info``).
    ``output``: also write them there (an existing file only with ``overwrite``)."""
    from torch.utils.data import DataLoader

    from .atomic import atomic_write_text, check_output_file
    from .runs import load_trained, read_run_info
    from .train.registry import get_task

    if output:
        recorded = read_run_info(adapter) if adapter is not None else {}
        check_output_file(output, flag="--output", overwrite=overwrite, inputs={
            "adapter folder": adapter, "--data": data, "--model": model or recorded.get("base_model"),
            "tokenizer": recorded.get("tokenizer"), **(get_task(task).inputs(options or {}) if task else {})})
    with no_loading_bars():
        if adapter is not None:
            if task is not None or options:
                raise SingLoRAError("--task and task options come from the adapter's run_info.json; give them only "
                                    "without an adapter folder")
            trained, info = load_trained(adapter, model)
            the_task = get_task(info["task"])
            tokenizer = the_task.load_tokenizer(info["tokenizer"], info)
        else:
            if model is None or task is None:
                raise SingLoRAError("without an adapter folder, give the base model: --model and --task")
            the_task = get_task(task)
            info = the_task.base_info(the_task.parse_options(options or {}))
            tokenizer = the_task.load_tokenizer(model, info, "--model")
            trained = the_task.load_model(model, info)
    dataset = the_task.read_eval_data(data, tokenizer, info, encoding)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=the_task.collator(tokenizer, info))
    metrics = the_task.evaluate(trained, loader, dataset=dataset, tokenizer=tokenizer, info=info)
    metrics["examples"] = len(dataset)
    if output:
        atomic_write_text(output, json.dumps(metrics, indent=2) + "\n")
    if not quiet:
        print(json.dumps(metrics, indent=2))
    return metrics


def _add_evaluate(subparsers: Any) -> None:
    parser = subparsers.add_parser("evaluate", help="metrics of a trained adapter (or of a base model) on a dataset")
    parser.add_argument("adapter", nargs="?", default=None,
                        help="adapter folder written by `singlora train` (<output-dir>/adapter); leave out to "
                        "evaluate the base model given by --model and --task")
    parser.add_argument("--data", required=True, help="dataset (same formats as --train-data)")
    parser.add_argument("--model", default=None, help="base model folder (default: the one recorded at training)")
    parser.add_argument("--task", default=None, help="the task, when evaluating a base model without an adapter")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoding", default=None, help="text encoding (default: UTF-8, else latin-1)")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    parser.add_argument("--quiet", action="store_true")
    add_task_options(parser)
    parser.set_defaults(func=lambda a: evaluate(
        a.adapter, a.data, model=a.model, task=a.task, options=task_options(a, a.task or ""),
        batch_size=a.batch_size, encoding=a.encoding, output=a.output, quiet=a.quiet, overwrite=a.overwrite))


def merge(adapter: str, output: str, *, model: str | None = None, quiet: bool = False,
          overwrite: bool = False) -> Path:
    """Fold a trained adapter into its base model and save a standalone transformers folder (+ tokenizer).

    ``output`` goes through the output-folder policy (``atomic.output_folder``): refused if it holds anything but
    an earlier merge (unless ``overwrite``), and always if it holds the adapter, the base model or the tokenizer.
    """
    from .atomic import check_output_folder, output_folder
    from .train.methods import method_class
    from .train.registry import get_task
    from .runs import load_trained, read_run_info

    info = read_run_info(adapter)
    inputs = {"adapter": adapter, "base model": model or info["base_model"], "tokenizer": info["tokenizer"]}
    check_output_folder(output, command="merge", inputs=inputs, overwrite=overwrite)  # before the slow part
    with no_loading_bars():
        trained, info = load_trained(adapter, model)
        plain = method_class(info["method"]).merged(trained)
        tokenizer = get_task(info["task"]).load_tokenizer(info["tokenizer"], info)
        out = Path(output)
        with output_folder(out, command="merge", inputs=inputs, overwrite=overwrite) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    if not quiet:
        print(f"merged model written to {out}")
    return out


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off inside the block: the commands
    that load a model to do one thing (merge, export, evaluate, generate, chat) print their own result line, not
    a bar per load and save (``--quiet`` silences that line too)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _adapter_to_folder_parser(subparsers: Any, name: str, help_text: str, output_help: str) -> Any:
    """A subcommand reading ``adapter`` (a ``singlora train`` output) and writing the folder ``output``."""
    parser = subparsers.add_parser(name, help=help_text)
    parser.add_argument("adapter", help="adapter folder written by `singlora train` (<output-dir>/adapter)")
    parser.add_argument("output", help=output_help)
    parser.add_argument("--model", default=None, help="base model folder (default: the one recorded at training)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace OUTPUT even if it holds files an earlier `singlora {name}` did not write "
                        "(everything in it goes; a folder holding the adapter or the base model is never replaced)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def _add_merge(subparsers: Any) -> None:
    parser = _adapter_to_folder_parser(subparsers, "merge", "base + adapter -> a standalone transformers model folder",
                                       "folder for the merged model")
    parser.set_defaults(func=lambda a: merge(a.adapter, a.output, model=a.model, quiet=a.quiet, overwrite=a.overwrite))


def export(adapter: str, output: str, *, format: str = "peft", model: str | None = None, quiet: bool = False,
           engine: str | None = None, max_lora_rank: int | None = None, overwrite: bool = False,
           save_dtype: str | None = None) -> Path:
    """Write a SingLoRA adapter as an exact plain LoRA (``torch_singlora.export.export_lora``; ``output`` under the
    output-folder policy, as ``merge``); with ``engine``, first refuse what that serving engine could not load
    (``torch_singlora.engines``). ``save_dtype``: storage dtype of the factors, every format (None: float32)."""
    from .adapter_file import storage_dtype
    from .atomic import check_output_folder
    from .engines import DEFAULT_MAX_LORA_RANK, check_engine_export
    from .export import export_lora
    from .runs import read_run_info
    from .train.registry import get_task

    dtype = storage_dtype(save_dtype)  # checked before anything loads
    if max_lora_rank is not None and engine is None:
        raise SingLoRAError("--max-lora-rank is the serving engine's limit: give --for vllm (or lorax) with it")
    info = read_run_info(adapter)
    if info["method"] != "singlora":
        raise SingLoRAError(f"{adapter}: method {info['method']!r} is not a SingLoRA adapter; nothing to export")
    inputs = {"adapter": adapter, "base model": model or info["base_model"]}
    check_output_folder(output, command="export", inputs=inputs, overwrite=overwrite)  # before loading the model
    with no_loading_bars():
        base = get_task(info["task"]).load_model(model or info["base_model"], info)
    if engine is not None:
        check_engine_export(adapter, base, engine=engine, max_lora_rank=max_lora_rank or DEFAULT_MAX_LORA_RANK)
    written = export_lora(adapter, output, format=format, base_model=base, overwrite=overwrite, dtype=dtype)
    if not quiet:
        print(f"plain LoRA ({format}) written to {written}")
    return written


def _add_export(subparsers: Any) -> None:
    parser = _adapter_to_folder_parser(subparsers, "export", "SingLoRA adapter -> exact plain LoRA (PEFT, diffusers, "
                                       "kohya, GGUF for llama.cpp)", "folder for the LoRA files")
    parser.add_argument("--format", default="peft", choices=["peft", "diffusers", "kohya", "gguf"])
    parser.add_argument("--for", dest="engine", choices=["vllm", "lorax"], default=None,
                        help="refuse what this serving engine cannot load (non-linear targets, modules_to_save, "
                        "ranks above --max-lora-rank) before writing anything")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="with --for: the engine's --max-lora-rank (default: 16, vLLM's)")
    parser.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default=None,
                        help="storage dtype of the exported factors, every --format (as train --save-dtype): "
                        "float32 (default, exact), bfloat16 or float16 (half the file; values beyond float16's "
                        "range are refused, nothing written)")
    parser.set_defaults(func=lambda a: export(a.adapter, a.output, format=a.format, model=a.model, quiet=a.quiet,
                                              engine=a.engine, max_lora_rank=a.max_lora_rank, overwrite=a.overwrite,
                                              save_dtype=a.save_dtype))


def _add_inspect(subparsers: Any) -> None:
    parser = subparsers.add_parser("inspect", help="an adapter's config, step, u, parameters, shapes and norms")
    parser.add_argument("adapter", help="a SingLoRA adapter folder")
    parser.add_argument("--json", action="store_true", help="print JSON")

    def run(args: argparse.Namespace) -> None:
        from .adapter_file import CONFIG_FILE
        from .inspection import format_inspection, inspect_adapter
        from .runs import run_folder_hint

        hint = run_folder_hint(args.adapter)
        if hint and not (Path(args.adapter) / CONFIG_FILE).exists():
            raise SingLoRAError(f"{args.adapter}: not an adapter folder{hint}")
        report = inspect_adapter(args.adapter)
        print(json.dumps(report, indent=2) if args.json else format_inspection(report))

    parser.set_defaults(func=run)


def report(runs: Sequence[str], plot: str | None = None, names: Sequence[str] | None = None,
           overwrite: bool = False) -> str:
    """Summary table of finished runs (their output folders), and optionally their curves side by side in the PNG
    ``plot`` (an existing file only with ``overwrite``)."""
    from .train.metrics import read_summary, summary_table

    if plot:
        from .atomic import check_output_file
        from .train.metrics import METRICS_FILE, SUMMARY_FILE

        check_output_file(plot, flag="--plot", overwrite=overwrite,
                          inputs=[Path(run) / name for run in runs for name in (SUMMARY_FILE, METRICS_FILE)])
    summaries = [read_summary(run) for run in runs]
    if names:
        for summary, name in zip(summaries, names):
            summary["name"] = name
    table = summary_table(summaries)
    print(table)
    if plot:
        from .train.plots import plot_runs

        print(f"curves: {plot_runs(runs, plot, [s['name'] for s in summaries])}")
    return table


def _add_report(subparsers: Any) -> None:
    parser = subparsers.add_parser("report", help="compare finished runs: a table and side-by-side curves")
    parser.add_argument("runs", nargs="+", help="output folders of `singlora train`")
    parser.add_argument("--plot", default=None, help="write the curves of all runs to this PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace the --plot file if it exists")
    parser.set_defaults(func=lambda a: report(a.runs, a.plot, overwrite=a.overwrite))


# ---- entry point ------------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any], None]] = [_add_train, _add_evaluate, _add_merge, _add_export, _add_inspect,
                                            _add_report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="singlora", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    for module_name in EXTERNAL_SUBCOMMANDS:
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) and importlib.util.find_spec(module_name):
            importlib.import_module(module_name).add_parser(subparsers)
    parser.set_defaults(subcommand_parsers=subparsers.choices)  # for errors under the subcommand's usage
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """The one line printed when Ctrl-C stops a command; for ``train``, how to continue."""
    if args.command != "train":
        return f"singlora {args.command}: interrupted"
    from .runs import CHECKPOINT_FILE

    checkpoint = Path(args.output_dir) / CHECKPOINT_FILE
    if checkpoint.is_file():
        return (f"singlora train: interrupted; {checkpoint} holds the last checkpoint: the same command with "
                "--resume continues from it")
    return ("singlora train: interrupted before its first checkpoint (--save-every): nothing to resume; the same "
            "command with --overwrite starts it again")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, parsed. What the first pass leaves over (positionals after an option, as in ``generate BASE
    --adapter X "a prompt"``, or a mistake, then reported under the subcommand's usage) goes to the subcommand's own
    parser, intermixed (there are no global options: ``argv[0]`` is the command)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        start = argparse.Namespace(command=args.command, subcommand_parsers=args.subcommand_parsers)
        args = args.subcommand_parsers[args.command].parse_intermixed_args(list(argv)[1:], start)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 on a user-input error, 130 on Ctrl-C)."""
    from .integrations.quantized import quiet_bitsandbytes

    quiet_bitsandbytes()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except SingLoRAError as exc:
        from .inspection import shown  # file-provided text must not reach the terminal raw, nor a 1 MiB name whole

        print(f"singlora {args.command}: error: {shown(exc, limit=4000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every file is written atomically: what is on disk is whole
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
