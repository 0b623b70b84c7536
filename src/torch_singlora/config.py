"""``SingLoRAConfig``: one typed config, validated once, in one place."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from .errors import SingLoRAError
from .functional import scaling
from .linear_regex import compile_pattern, fullmatch

INIT_METHODS = ("normal", "kaiming_uniform", "gaussian")
# T by default: 1% of the run's optimizer steps, the paper's setting (its ablation finds 0.5% to 8% equally good).
# The same default for the Python API and every command; it needs the run's total_steps (see ramp_up_steps).
DEFAULT_RAMP_UP_STEPS = 0.01

# Default targets per transformers ``model_type`` (attention query + value, as the paper's GLUE runs).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
}


def _is_int(value: Any) -> bool:
    """An int that fits int64 (steps are int64 buffers; larger ints overflow float conversion)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_number(value: Any) -> bool:
    """A float, or an int that fits int64 (so ``math.isfinite`` and float arithmetic cannot overflow)."""
    return isinstance(value, float) or _is_int(value)


_STEPS_OR_FRACTION = ("must be a number of optimizer steps (an int >= 0, e.g. 100) or a fraction of the total "
                      "steps (a number with a '.', in [0, 1], e.g. 0.01)")


def parse_steps_or_fraction(value: str | int | float, name: str) -> int | float:
    """The one reading of "a number of optimizer steps, or a fraction of the run's total steps".

    Used for ``SingLoRAConfig.ramp_up_steps`` and every command-line option of that kind (``--ramp-up-steps``,
    ``--warmup``). Returns an ``int`` (steps) or a ``float`` (fraction); resolve it with ``resolve_steps``.

    - an ``int``, or a string of digits (``"100"``): that many optimizer steps, >= 0;
    - a ``float``, or any other number string (``"0.01"``, ``"1e-2"``, ``"1.0"``): a fraction of the total steps,
      in [0, 1]. ``1.0`` / ``"1.0"`` is the whole run, never one step.

    Anything else (a bool, a negative or non-finite number, a fraction above 1, other text) raises
    ``SingLoRAError`` naming ``name`` and the value.
    """
    original = value
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            value = int(text)
        else:
            try:
                value = float(text)
            except ValueError:
                raise SingLoRAError(f"{name}={original!r} {_STEPS_OR_FRACTION}") from None
            if math.isfinite(value) and value > 1 and value.is_integer():
                raise SingLoRAError(f"{name}={original!r}: a number with a '.' or an exponent is a fraction of the "
                                    f"total steps, in [0, 1]; write {int(value)} steps as an int")
    if _is_int(value) and value >= 0:
        return value
    if isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return value
    raise SingLoRAError(f"{name}={original!r} {_STEPS_OR_FRACTION}")


def resolve_steps(value: int | float, total_steps: int | None) -> int | None:
    """Optimizer steps of a ``parse_steps_or_fraction`` value: an int as is; a fraction ``f`` of ``total_steps``
    as ``round(f * total_steps)``, at least 1 when ``f > 0`` (a positive fraction never becomes 0 steps); ``None``
    for a fraction when ``total_steps`` is unknown (``None``)."""
    if _is_int(value):
        return value
    if total_steps is None:
        return None
    return max(1, round(value * total_steps)) if value > 0 else 0


def rank_and_pattern(ranks: Mapping[str, int]) -> tuple[int, dict[str, int]]:
    """``(r, rank_pattern)`` that give each module of ``{module name: rank}`` its rank: ``r`` is the most common
    rank (a tie goes to the smallest, whatever the order of ``ranks``) and every other module gets an exact-name
    entry (``re.escape(name)``, a full match for ``rank_pattern`` and for PEFT). ``(1, {})`` for no module."""
    counts = Counter(ranks.values())
    r = min(counts, key=lambda rank: (-counts[rank], rank)) if counts else 1
    return r, {re.escape(name): rank for name, rank in sorted(ranks.items()) if rank != r}


def _check_patterns(name: str, value: Any, allow_none: bool = True) -> None:
    """A pattern field is a regex string (full match) or a list of names/suffixes."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        if not value:
            raise SingLoRAError(f"{name}='' is empty: give module names, a regex, or 'all-linear'")
        if value != "all-linear":
            try:
                compile_pattern(value)
            except SingLoRAError as exc:
                raise SingLoRAError(f"{name}={value!r}: {exc}") from None
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        if not value:
            raise SingLoRAError(f"{name}=[] is empty: give at least one module name")
        return
    raise SingLoRAError(f"{name}={value!r} must be a regex string or a list of non-empty module names")


def key_pattern(key: str) -> str:
    """The regex a ``rank_pattern`` / ``alpha_pattern`` key stands for: the key, after any dotted prefix."""
    return rf"(.*\.)?{key}"


@dataclass
class SingLoRAConfig:
    """How to adapt a model with SingLoRA: ``W = W0 + s * u(t) * A @ A.T``.

    Attributes:
        r: Rank of ``A`` (n, r). 1 <= r <= n for every targeted layer.
        alpha: Scale numerator: ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        target_modules: Which modules to adapt. A list matches module names exactly or by dotted suffix
            (``"query"`` matches ``encoder.layer.0.attention.self.query``); each entry must match something.
            A string is a regex that must fully match a module name. ``"all-linear"``: every Linear / Conv1D but
            the output layer. ``None``: a default for known transformers ``model_type`` values.
        exclude_modules: Same forms as ``target_modules``; matching modules are not adapted.
        target_parameters: 3-D expert parameters to adapt (``experts.py``), as PEFT's ``target_parameters``:
            ``<module>.<parameter>`` names or dotted suffixes (``"mlp.experts.gate_up_proj"``); each entry must
            match something. With it, ``target_modules=[]`` adapts no module.
        modules_to_save: Modules (name or suffix) trained fully and saved with the adapter, e.g. a classifier.
        dropout: Dropout probability applied to the adapter's input.
        ramp_up_steps: ``T``, the ramp length of ``u = min(t / T, 1)`` (t = ``ramp_step``, optimizer steps taken).
            An int is a number of optimizer steps (0 = no ramp, u = 1); a float in [0, 1] is a fraction of
            ``total_steps`` (``parse_steps_or_fraction``). Default: 0.01, the paper's 1% of the run.
        total_steps: Total optimizer steps of the run; resolves a fractional ``ramp_up_steps``. May stay ``None``
            until training starts: ``bind_optimizer(optimizer, total_steps=...)``, ``set_total_steps``, or the
            Trainer integration (from ``max_steps``) fill it in. Until then ``u = 0`` and ``t`` cannot advance.
        init: ``normal`` (N(0, 1/n), default), ``kaiming_uniform`` (what public implementations do; for their
            checkpoints) or ``gaussian`` (N(0, init_std^2)).
        init_std: Standard deviation for ``init="gaussian"``.
        rank_pattern: ``{module name or suffix regex: r}`` overriding ``r`` for matching modules.
        alpha_pattern: ``{module name or suffix regex: alpha}`` overriding ``alpha`` for matching modules.
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    r: int = 8
    alpha: float = 8.0
    target_modules: Union[list[str], str, None] = None
    exclude_modules: Union[list[str], str, None] = None
    target_parameters: Union[list[str], None] = None
    modules_to_save: Union[list[str], None] = None
    dropout: float = 0.0
    ramp_up_steps: Union[int, float] = DEFAULT_RAMP_UP_STEPS
    total_steps: Union[int, None] = None
    init: str = "normal"
    init_std: Union[float, None] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_parameters, tuple):
            self.target_parameters = list(self.target_parameters)
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``SingLoRAError`` naming the field and value."""
        if not _is_int(self.r) or self.r < 1:
            raise SingLoRAError(f"r={self.r!r} must be an int >= 1")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise SingLoRAError(f"alpha={self.alpha!r} must be a finite number > 0")
        if not (self.target_parameters and self.target_modules == []):  # [] = no module, only the parameters
            _check_patterns("target_modules", self.target_modules)
        _check_patterns("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise SingLoRAError(f"modules_to_save={self.modules_to_save!r} must be a list of module names")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise SingLoRAError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        if self.target_parameters is not None:
            if not (isinstance(self.target_parameters, list) and self.target_parameters
                    and all(isinstance(p, str) and p for p in self.target_parameters)):
                raise SingLoRAError(f"target_parameters={self.target_parameters!r} must be a non-empty list of "
                                    "parameter names (e.g. ['mlp.experts.gate_up_proj'])")
            if self.dropout:
                raise SingLoRAError(f"dropout={self.dropout!r} cannot apply to target_parameters (the update is folded "
                                    "into the expert weights for the module's own forward, as in PEFT); use dropout=0")
        if self.total_steps is not None and (not _is_int(self.total_steps) or self.total_steps < 1):
            raise SingLoRAError(f"total_steps={self.total_steps!r} must be an int >= 1 or None")
        if not _is_number(self.ramp_up_steps):  # typed: strings are for command lines (parse_steps_or_fraction)
            raise SingLoRAError(f"ramp_up_steps={self.ramp_up_steps!r} must be an int (steps) or a float (fraction)")
        parse_steps_or_fraction(self.ramp_up_steps, "ramp_up_steps")
        if self.init not in INIT_METHODS:
            raise SingLoRAError(f"init={self.init!r} must be one of {INIT_METHODS}")
        if self.init == "gaussian":
            if not _is_number(self.init_std) or not math.isfinite(self.init_std) or self.init_std <= 0:
                raise SingLoRAError(f"init_std={self.init_std!r} must be a number > 0 when init='gaussian'")
        elif self.init_std is not None:
            raise SingLoRAError(f"init_std={self.init_std!r} is only used with init='gaussian' (init={self.init!r})")
        for name, pattern, check in (
            ("rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v >= 1),
            ("alpha_pattern", self.alpha_pattern, lambda v: _is_number(v) and math.isfinite(v) and v > 0),
        ):
            if not isinstance(pattern, dict):
                raise SingLoRAError(f"{name}={pattern!r} must be a dict of {{module pattern: value}}")
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    raise SingLoRAError(f"{name} key {key!r} must be a non-empty string")
                try:
                    compile_pattern(key_pattern(key))
                except SingLoRAError as exc:
                    raise SingLoRAError(f"{name} key {key!r}: {exc}") from None
                if not check(value):
                    raise SingLoRAError(f"{name}[{key!r}]={value!r} is not a valid {'r' if name[0] == 'r' else 'alpha'}")
        if not isinstance(self.use_rslora, bool):
            raise SingLoRAError(f"use_rslora={self.use_rslora!r} must be a bool")

    def resolve_ramp_up_steps(self) -> int | None:
        """``T`` in optimizer steps (``resolve_steps``): a fraction resolved against ``total_steps``; ``None`` for a
        fraction while ``total_steps`` is unknown (the ramp then waits at u = 0: ``SingLoRAModel.bind_optimizer``)."""
        return resolve_steps(self.ramp_up_steps, self.total_steps)

    def _pattern_value(self, pattern: dict[str, Any], module_name: str, default: Any) -> Any:
        for key, value in pattern.items():
            if fullmatch(key_pattern(key), module_name):
                return value
        return default

    def rank_for(self, module_name: str) -> int:
        """``r`` for a module, after ``rank_pattern``."""
        return self._pattern_value(self.rank_pattern, module_name, self.r)

    def scale_for(self, module_name: str) -> float:
        """``s`` for a module, after ``rank_pattern`` and ``alpha_pattern``."""
        alpha = self._pattern_value(self.alpha_pattern, module_name, self.alpha)
        return scaling(self.rank_for(module_name), alpha, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "SingLoRAConfig":
        """Build from a dict (e.g. ``adapter_config.json``); unknown fields are an error naming ``source``."""
        if not isinstance(data, dict):
            raise SingLoRAError(f"{source}: expected an object of config fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SingLoRAError(f"{source}: unknown config field(s) {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except SingLoRAError as exc:
            raise SingLoRAError(f"{source}: {exc}") from None
