"""What multi-adapter LLM engines (vLLM, LoRAX) can load from this library's exact LoRA export, checked before
exporting, so a deployment fails here with the reasons, not later in the engine.

    check_engine_export("runs/alice/adapter", base_model, engine="vllm", max_lora_rank=16)
    # singlora export runs/alice/adapter lora/ --for vllm --max-lora-rank 16

The engines serve LoRA on the linear layers of a transformer (vLLM's ``PEFTHelper`` refuses ``modules_to_save``
("vLLM only supports modules_to_save being None") and any rank above the server's ``--max-lora-rank``). So an
adapter is refused, with every reason listed, when it

- adapts a layer that is not an ``nn.Linear`` (embeddings, convolutions, GPT-2's ``Conv1D``),
- trains modules fully (``modules_to_save``: full copies are not LoRA),
- has a rank above ``max_lora_rank`` (vLLM's default is 16: start it with ``--max-lora-rank`` >= the rank).

The export itself folds ``s * u`` into the factors (``lora_alpha = r``), so rsLoRA scaling, rank and alpha patterns
need nothing from the engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from torch import nn

from .adapter_file import plan_adapter_file, read_adapter_config
from .errors import SingLoRAError
from .model import SingLoRAModel
from .plan import AdapterPlan, plan_adapter

ENGINES = ("vllm", "lorax")
DEFAULT_MAX_LORA_RANK = 16  # vLLM's --max-lora-rank default
KIND_NAMES = {"embedding": "an Embedding", "conv": "a convolution", "conv1d_t": "a transformers Conv1D",
              "experts": "a stack of expert weights"}


def engine_problems(plan: AdapterPlan, *, engine: str = "vllm",
                    max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> list[str]:
    """Why ``engine`` could not serve the exact LoRA export of the adapter ``plan`` describes (empty: it can)."""
    if engine not in ENGINES:
        raise SingLoRAError(f"engine={engine!r} must be one of {ENGINES}")
    if not isinstance(max_lora_rank, int) or isinstance(max_lora_rank, bool) or max_lora_rank < 1:
        raise SingLoRAError(f"max_lora_rank={max_lora_rank!r} must be an int >= 1")
    problems = [f"module {name!r} is {KIND_NAMES[m.kind]}: {engine} serves LoRA on linear layers only (leave it "
                "out of target_modules)" for name, m in plan.modules.items() if m.kind != "linear"]
    if plan.saved_modules:
        problems.append(f"modules_to_save {list(plan.saved_modules)}: {engine} loads no fully trained modules "
                        "(vLLM: 'only supports modules_to_save being None')")
    too_big = {name: m.r for name, m in plan.modules.items() if m.r > max_lora_rank}
    if too_big:
        rank = max(too_big.values())
        problems.append(f"rank {rank} (module {next(n for n, r in too_big.items() if r == rank)!r}, {len(too_big)} "
                        f"module(s) above {max_lora_rank}) exceeds --max-lora-rank {max_lora_rank}: start {engine} "
                        f"with --max-lora-rank {rank} or more (vLLM accepts 8, 16, 32, 64, ...)")
    return problems


def check_engine_export(
    source: Union[SingLoRAModel, str, os.PathLike], base_model: nn.Module | None = None, *, engine: str = "vllm",
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK, adapter_name: str | None = None,
) -> None:
    """Raise ``SingLoRAError`` listing every reason ``engine`` could not load the exported adapter (one line, the
    reasons joined by "; ": the command line prints an error as one line): ``source`` is a
    ``SingLoRAModel`` (``adapter_name``, default the first active) or an adapter folder read against
    ``base_model``. Reads configs only; writes nothing."""
    if isinstance(source, SingLoRAModel):
        name = adapter_name or source.default_adapter()
        source.require_adapters([name])
        plan, where = plan_adapter(source.model, source.configs[name]), f"adapter {name!r}"
    else:
        if base_model is None:
            raise SingLoRAError(f"checking the adapter directory {source}: pass base_model=")
        config, _ = read_adapter_config(source)
        plan, where = plan_adapter_file(base_model, Path(source), config)[0], str(Path(source))  # as loading
    problems = engine_problems(plan, engine=engine, max_lora_rank=max_lora_rank)
    if problems:
        raise SingLoRAError(f"{where} cannot be served by {engine} from its LoRA export: {'; '.join(problems)}")

