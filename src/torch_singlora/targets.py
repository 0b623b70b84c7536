"""Which modules of a model to adapt: matching ``target_modules`` / ``exclude_modules`` / ``modules_to_save``."""

from __future__ import annotations

from typing import Union

from torch import nn

from .config import DEFAULT_TARGETS, SingLoRAConfig, key_pattern
from .errors import SingLoRAError
from .experts import SingLoRAExperts, resolve_target_parameters
from .copies import TrainableCopy
from .layers import SingLoRALayer, layer_kind
from .linear_regex import fullmatch

Patterns = Union[list[str], str]


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def unmatched_entries(entries: list[str], names: list[str]) -> list[str]:
    """The entries of a name list (each an exact name or a dotted suffix, as ``target_modules``) that match none of
    ``names``, in order; names are indexed by their last component, so this stays fast for long lists."""
    by_last: dict[str, list[str]] = {}
    for name in names:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return [entry for entry in entries
            if not any(_name_matches(n, entry) for n in by_last.get(entry.rsplit(".", 1)[-1], ()))]


def matches(name: str, patterns: Patterns | None) -> bool:
    """A string is a regex that fully matches ``name``; a list matches a name exactly or by dotted suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return fullmatch(patterns, name)
    return any(_name_matches(name, entry) for entry in patterns)


def _candidates(model: nn.Module) -> list[str]:
    """Short, distinct suffixes of adaptable modules, for error messages."""
    suffixes = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if layer_kind(module) is not None}
    return sorted(suffixes)


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the model's output layer (lm head), never adapted by ``all-linear`` (as PEFT)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return {name for name, module in model.named_modules() if output is not None and module is output}


def module_names(model: nn.Module) -> list[str]:
    """Names of the model's modules, minus the insides of our own wrappers (``base_layer``, adapters, copies)."""
    wrapper_types = (SingLoRALayer, TrainableCopy, SingLoRAExperts)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, wrapper_types)]
    return [n for n, _ in model.named_modules() if n and not any(n.startswith(w + ".") for w in wrappers)]


def resolve_targets(model: nn.Module, config: SingLoRAConfig) -> list[str]:
    """Names of the modules ``config`` adapts in ``model``; raises ``SingLoRAError`` on any no-op pattern."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise SingLoRAError(
                f"target_modules=None: no default for model_type={model_type!r}; give target_modules "
                f"(e.g. 'all-linear' or names among {_candidates(model)})"
            )
        targets = DEFAULT_TARGETS[model_type]
    saved = config.modules_to_save or []
    names = module_names(model)

    def excluded(name: str) -> bool:  # excluded, or inside a module that trains fully
        return matches(name, config.exclude_modules) or any(
            _name_matches(scope, s) for scope in [name, *_prefixes(name)] for s in saved
        )

    modules = dict(model.named_modules())
    parameters = resolve_target_parameters(model, config.target_parameters)  # experts.py
    if targets == [] and parameters:  # only expert parameters (config.validate allows [] only with them)
        found = []
    elif targets == "all-linear":
        output = _output_layer_names(model)
        found = [n for n in names if layer_kind(getattr(modules[n], "base_layer", modules[n])) in ("linear", "conv1d_t")]
        found = [n for n in found if n not in output and not excluded(n)]
    else:
        found = [n for n in names if matches(n, targets) and not excluded(n)]
        if isinstance(targets, list):
            for entry in targets:
                if not any(_name_matches(n, entry) for n in names):
                    raise SingLoRAError(
                        f"target_modules entry {entry!r} matches no module; adaptable modules end in {_candidates(model)}"
                    )
    if not found and targets != []:  # [] only comes with target_parameters
        raise SingLoRAError(f"target_modules={targets!r}{_no_match_hint(names, targets, config.exclude_modules)}; "
                            f"adaptable modules end in {_candidates(model)}")
    for name in found:
        module = modules[name]
        if not isinstance(module, SingLoRALayer) and layer_kind(module) is None:
            raise SingLoRAError(
                f"target module {name!r} is a {type(module).__name__}, which SingLoRA cannot adapt "
                "(Linear, transformers Conv1D, Conv1d/2d, Embedding)"
            )
    if isinstance(config.exclude_modules, list):
        for entry in config.exclude_modules:
            if not any(_name_matches(n, entry) for n in names):
                raise SingLoRAError(f"exclude_modules entry {entry!r} matches no module")
    for field_name, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if not any(fullmatch(key_pattern(key), n) for n in found + parameters):
                raise SingLoRAError(f"{field_name} key {key!r} matches no targeted module")
    return found


def _no_match_hint(names: list[str], targets: Patterns, exclude: Patterns | None) -> str:
    """Why ``targets`` selected nothing; for a string that names modules by suffix, the string-vs-list rule."""
    if isinstance(targets, str) and targets != "all-linear":
        by_suffix = [n for n in names if _name_matches(n, targets)]
        if by_suffix and not any(fullmatch(targets, n) for n in names):
            return (f" matches no module: a string is a regex that must match the whole module name (e.g. "
                    f"{by_suffix[0]!r}); to match names or dotted suffixes pass a list: target_modules={[targets]!r}")
    return f" (exclude_modules={exclude!r}) matches no module"


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def resolve_modules_to_save(model: nn.Module, config: SingLoRAConfig) -> list[str]:
    """Names of the ``modules_to_save`` modules; each entry must match at least one module."""
    found: list[str] = []
    names = module_names(model)
    modules = dict(model.named_modules())
    for entry in config.modules_to_save or []:
        hits = [n for n in names if _name_matches(n, entry)]
        if not hits:
            raise SingLoRAError(f"modules_to_save entry {entry!r} matches no module")
        for hit in hits:
            if isinstance(modules[hit], SingLoRALayer):
                raise SingLoRAError(f"modules_to_save entry {entry!r} matches {hit!r}, which is an adapted module")
            if hit not in found:
                found.append(hit)
    return found
