"""``TrainConfig`` (``train/config.py``): defaults of ``singlora train`` that depend on the task (``--max-length`` is
the task's ``default_max_length``: classification and causal-lm 128, sft 1024 as TRL's ``SFTConfig.max_length``),
filled in by ``TrainConfig.validate`` so run_info.json, summary.json and the resume check record the value the run
used; and the "steps or a fraction" flags, read once by ``validate``."""

from __future__ import annotations

from pathlib import Path

import pytest

from torch_singlora import SingLoRAError
from torch_singlora.cli import build_parser, train_config
from torch_singlora.runs import check_resumable
from torch_singlora.train.config import TrainConfig
from torch_singlora.train.loop import comparable_settings


def parsed(*flags: str) -> TrainConfig:
    """The validated ``TrainConfig`` ``singlora train`` builds from ``flags`` (as ``cli.cmd_train``)."""
    args = build_parser().parse_args(["train", "--model", "m", "--train-data", "d", "--output-dir", "o", *flags])
    config = train_config(args)
    config.validate()
    return config


def test_max_length_default_is_the_tasks() -> None:
    assert [parsed("--task", task).max_length for task in ("classification", "causal-lm", "sft")] == [128, 128, 1024]
    assert parsed().max_length == 128  # --task classification by default
    assert parsed("--task", "sft", "--max-length", "256").max_length == 256  # a given value is kept
    assert TrainConfig().max_length is None  # unresolved until validate knows the task
    assert "default: per task, 128 (sft: 1024, as TRL's SFTConfig)" in " ".join(
        build_parser().parse_args(["train"]).subcommand_parsers["train"].format_help().split())
    with pytest.raises(SingLoRAError, match="--max-length=0 must be >= 1"):
        parsed("--task", "sft", "--max-length", "0")


def test_resume_compares_the_resolved_max_length() -> None:
    """A checkpoint records the resolved value: resuming without --max-length, or with the same value spelled out,
    is the same run; an sft checkpoint written with 128 (the old default) is refused, naming the change."""
    saved = comparable_settings(parsed("--task", "sft"))
    assert saved["max_length"] == 1024
    check_resumable(Path("checkpoint.pt"), saved, comparable_settings(parsed("--task", "sft")), "settings")
    check_resumable(Path("checkpoint.pt"), saved, comparable_settings(parsed("--task", "sft", "--max-length",
                                                                             "1024")), "settings")
    old = {**saved, "max_length": 128}
    with pytest.raises(SingLoRAError, match=r"different settings: max_length \(128 -> 1024\)"):
        check_resumable(Path("checkpoint.pt"), old, comparable_settings(parsed("--task", "sft")), "settings")


def test_steps_or_fraction_flags_are_read_once_into_numbers() -> None:
    """``--ramp-up-steps`` / ``--warmup`` text becomes an int (steps) or a float (fraction) in ``validate``; the loop
    uses those numbers (it used to parse the text again)."""
    config = parsed("--ramp-up-steps", "40", "--warmup", "1e-1")
    assert (config.ramp_up_steps, config.warmup) == (40, 0.1) and type(config.ramp_up_steps) is int
    defaults = parsed()
    assert (defaults.ramp_up_steps, defaults.warmup) == (0.01, 0.06) and type(defaults.ramp_up_steps) is float
    with pytest.raises(SingLoRAError, match="--warmup='1.5.0'"):
        parsed("--warmup", "1.5.0")
