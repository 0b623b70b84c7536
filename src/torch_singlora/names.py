"""Names, in one place: which modules of a model there are to adapt, how a name entry matches a module or parameter
name, what a config selects, and which adapter names are allowed.

- ``walk_adaptable(model)``: the model's modules as its user sees them: each of singlora's wrappers stands for the
  module it wraps, and what it holds inside (``base_layer``, adapters, copies) is not walked.
- ``name_matches(name, entry)``: the rule for names in lists (``target_modules``, ``exclude_modules``,
  ``modules_to_save``, ``target_parameters``): the full name, or a dotted suffix of it (``"query"`` matches
  ``encoder.layer.0.attention.self.query``, not ``...self.my_query``), as PEFT matches them. ``matches`` adds the
  other form: a string is a regex that fully matches the name (``linear_regex``: linear time).
- ``resolve(model, config)``: the modules, expert parameters and ``modules_to_save`` a config selects, once (the
  plan reads them from here). Every entry must match something and every pattern must select something: a no-op
  pattern is an error, never silence.
- ``check_adapter_name(name)``: the adapter-name rule of the model and the bank; ``mixed.BASE`` (PEFT's
  ``"__base__"``) is reserved: in a mixed batch it means "no adapter". ``as_names``: one name or a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Union

from torch import nn

from .config import DEFAULT_TARGETS, SingLoRAConfig, key_pattern
from .copies import TrainableCopy
from .errors import SingLoRAError
from .experts import SingLoRAExperts, expert_layout
from .layers import SingLoRALayer, layer_kind
from .linear_regex import fullmatch
from .mixed import BASE

Patterns = Union[list[str], str]


# ---- adapter names ----------------------------------------------------------------------------------------------


def check_adapter_name(name: Any, *, dots: bool = False) -> str:
    """``name`` if it can name an adapter: a non-empty string other than ``BASE`` and, unless ``dots``, without a
    '.' (an adapter whose modules are kept in ``nn.ModuleDict``s under its name cannot have one: every adapter of a
    ``SingLoRAModel``, and a bank adapter with ``modules_to_save``). ``SingLoRAError`` naming the rule otherwise."""
    if not isinstance(name, str) or not name or name == BASE:
        raise SingLoRAError(f"adapter name {name!r} must be a non-empty string other than {BASE!r} (reserved: in "
                            "adapter_names= it means the base model, no adapter)")
    if not dots and "." in name:
        raise SingLoRAError(f"adapter {name!r} needs a name without '.' (its modules are kept under its name in "
                            "nn.ModuleDict, whose keys cannot hold a '.')")
    return name


def as_names(value: Any, field: str) -> list[str]:
    """``str | list[str]`` -> list of adapter names; ``SingLoRAError`` naming ``field`` and the value otherwise."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SingLoRAError(f"{field}={value!r} must be an adapter name or a list of adapter names")


# ---- walking and matching ---------------------------------------------------------------------------------------


def walk_adaptable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of ``model`` (the root as ``""``), seen through singlora's wrappers: a
    ``SingLoRALayer`` or ``SingLoRAExperts`` is yielded as its ``base_layer``, a ``TrainableCopy`` as its
    ``original_module``, under the wrapper's name; nothing inside a wrapper is walked."""
    inside: str | None = None  # "wrapper." while walking a wrapper's modules (contiguous: named_modules is pre-order)
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if isinstance(module, (SingLoRALayer, SingLoRAExperts)):
            inside, module = name + ".", module.base_layer
        elif isinstance(module, TrainableCopy):
            inside, module = name + ".", module.original_module
        yield name, module


def name_matches(name: str, entry: str) -> bool:
    """``entry`` is ``name`` or a dotted suffix of it."""
    return name == entry or name.endswith("." + entry)


def unmatched_entries(entries: list[str], names: list[str]) -> list[str]:
    """The entries of a name list (``name_matches``) that match none of ``names``, in order; ``names`` are indexed
    by their last component, so this stays fast for long lists (a file's config may list thousands)."""
    by_last: dict[str, list[str]] = {}
    for name in names:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return [entry for entry in entries
            if not any(name_matches(n, entry) for n in by_last.get(entry.rsplit(".", 1)[-1], ()))]


def matches(name: str, patterns: Patterns | None) -> bool:
    """A string is a regex that fully matches ``name``; a list matches a name exactly or by dotted suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return fullmatch(patterns, name)
    return any(name_matches(name, entry) for entry in patterns)


def _candidates(modules: dict[str, nn.Module]) -> list[str]:
    """Short, distinct suffixes of adaptable modules, for error messages."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in modules.items() if layer_kind(module) is not None})


def _output_layer_names(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    """Names of the model's output layer (lm head), never adapted by ``all-linear`` (as PEFT)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return {name for name, module in modules.items() if output is not None and module is output}


# ---- what a config selects --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """What a config selects in a model, in the model's module order.

    Attributes:
        modules: Names of the modules to adapt. parameters: ``<module>.<parameter>`` names of the 3-D expert
            parameters to adapt (``experts.py``). saved: Names of the ``modules_to_save`` modules.
    """

    modules: list[str]
    parameters: list[str]
    saved: list[str]


def resolve(model: nn.Module, config: SingLoRAConfig, names: list[str] | None = None) -> Targets:
    """What ``config`` selects in ``model`` (a base model, or one already holding adapters); changes nothing.

    ``names``: adapt exactly these modules or ``<module>.<parameter>`` expert parameters instead of those the
    config's patterns select (an adapter file's keys name them; its patterns are then metadata, never matched).
    Raises ``SingLoRAError`` for any entry or pattern that matches nothing, a module SingLoRA cannot adapt, or a
    name inside a ``modules_to_save`` module."""
    modules = {name: module for name, module in walk_adaptable(model) if name}
    saved = _modules_to_save(model, modules, config.modules_to_save or [])
    if names is not None:
        return _named(model, modules, names, saved)
    parameters = _target_parameters(model, config.target_parameters)
    found = _target_modules(model, modules, config, saved, bool(parameters))
    for field_name, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if not any(fullmatch(key_pattern(key), n) for n in found + parameters):
                raise SingLoRAError(f"{field_name} key {key!r} matches no targeted module")
    return Targets(found, parameters, saved)


def _inside(name: str, scopes: list[str]) -> bool:
    return any(name == scope or name.startswith(scope + ".") for scope in scopes)


def _target_modules(model: nn.Module, modules: dict[str, nn.Module], config: SingLoRAConfig, saved: list[str],
                    with_parameters: bool) -> list[str]:
    """The modules ``config.target_modules`` selects, minus ``exclude_modules`` and what trains fully."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise SingLoRAError(f"target_modules=None: no default for model_type={model_type!r}; give target_modules "
                                f"(e.g. 'all-linear' or names among {_candidates(modules)})")
        targets = DEFAULT_TARGETS[model_type]
    if targets == [] and with_parameters:  # only expert parameters (config.validate allows [] only with them)
        return []

    def kept(name: str) -> bool:  # not excluded, not inside a module that trains fully
        return not matches(name, config.exclude_modules) and not _inside(name, saved)

    if targets == "all-linear":
        output = _output_layer_names(model, modules)
        found = [n for n, m in modules.items() if layer_kind(m) in ("linear", "conv1d_t") and n not in output]
        found = [n for n in found if kept(n)]
    else:
        found = [n for n in modules if matches(n, targets) and kept(n)]
        for entry in targets if isinstance(targets, list) else []:
            if not any(name_matches(n, entry) for n in modules):
                raise SingLoRAError(f"target_modules entry {entry!r} matches no module; adaptable modules end in "
                                    f"{_candidates(modules)}")
    if not found:
        hint = _no_match_hint(list(modules), targets, config.exclude_modules)
        raise SingLoRAError(f"target_modules={targets!r}{hint}; adaptable modules end in {_candidates(modules)}")
    for name in found:
        if layer_kind(modules[name]) is None:
            raise SingLoRAError(f"target module {name!r} is a {type(modules[name]).__name__}, which SingLoRA cannot "
                                "adapt (Linear, transformers Conv1D, Conv1d/2d, Embedding)")
    for entry in config.exclude_modules if isinstance(config.exclude_modules, list) else []:
        if not any(name_matches(n, entry) for n in modules):
            raise SingLoRAError(f"exclude_modules entry {entry!r} matches no module")
    return found


def _no_match_hint(names: list[str], targets: Patterns, exclude: Patterns | None) -> str:
    """Why ``targets`` selected nothing; for a string that names modules by suffix, the string-vs-list rule."""
    if isinstance(targets, str) and targets != "all-linear":
        by_suffix = [n for n in names if name_matches(n, targets)]
        if by_suffix and not any(fullmatch(targets, n) for n in names):
            return (f" matches no module: a string is a regex that must match the whole module name (e.g. "
                    f"{by_suffix[0]!r}); to match names or dotted suffixes pass a list: target_modules={[targets]!r}")
    return f" (exclude_modules={exclude!r}) matches no module"


def _modules_to_save(model: nn.Module, modules: dict[str, nn.Module], entries: list[str]) -> list[str]:
    """Names of the ``modules_to_save`` modules; each entry must match at least one module, none adapted."""
    found: list[str] = []
    for entry in entries:
        hits = [n for n in modules if name_matches(n, entry)]
        if not hits:
            raise SingLoRAError(f"modules_to_save entry {entry!r} matches no module")
        for hit in hits:
            if isinstance(model.get_submodule(hit), (SingLoRALayer, SingLoRAExperts)):
                raise SingLoRAError(f"modules_to_save entry {entry!r} matches {hit!r}, which is an adapted module")
            if hit not in found:
                found.append(hit)
    return found


def _target_parameters(model: nn.Module, entries: list[str] | None) -> list[str]:
    """Full names (``<module>.<parameter>``) of the parameters ``entries`` name (exactly or by dotted suffix, as
    PEFT's ``target_parameters``), in the model's order. Each entry must match a parameter, and each match must be
    a 3-D expert stack; ``SingLoRAError`` naming the entry or parameter otherwise."""
    if not entries:
        return []
    found: list[str] = []
    for owner_name, owner in walk_adaptable(model):
        for parameter_name, _ in owner.named_parameters(recurse=False):
            full = f"{owner_name}.{parameter_name}" if owner_name else parameter_name
            if any(name_matches(full, entry) for entry in entries):
                if not owner_name:
                    raise SingLoRAError(f"target parameter {full!r} belongs to the top-level module, which cannot be "
                                        "wrapped; target a parameter of a submodule")
                expert_layout(owner, parameter_name)  # a 3-D floating-point stack, or an error naming it
                found.append(full)
    for entry in entries:
        if not any(name_matches(name, entry) for name in found):
            stacks = sorted({f"{o.rpartition('.')[2] or o}.{p}" for o, m in walk_adaptable(model)
                             for p, v in m.named_parameters(recurse=False) if v.dim() == 3})
            raise SingLoRAError(f"target_parameters entry {entry!r} matches no parameter; 3-D parameters of this "
                                f"model end in {stacks}")
    return found


def _named(model: nn.Module, modules: dict[str, nn.Module], names: list[str], saved: list[str]) -> Targets:
    """``Targets`` of exactly ``names`` (modules, or expert parameters when not a module name)."""
    targets = [name for name in names if name in modules]
    parameters = [name for name in names if name not in modules]
    for name in parameters:
        try:
            found = _target_parameters(model, [name])
        except SingLoRAError:
            found = []
        if name not in found:
            raise SingLoRAError(f"{name!r} is not a module (or expert parameter) of this model")
    for name in names:
        if _inside(name, saved):
            raise SingLoRAError(f"module {name!r} lies inside modules_to_save module(s) {saved}")
    return Targets(targets, parameters, saved)
