"""Regex full-matching in time linear in the name: module-name patterns can never hang singlora.

Python's ``re`` backtracks: ``".*" * 10 + "X"`` takes seconds per module name, and a crafted ``target_modules`` or
``rank_pattern`` key in an adapter file hung every loader. Here a pattern is parsed by the standard library's own
regex parser (so the syntax is exactly Python's) and compiled to a Thompson NFA, simulated state-set by state-set
(a lazily built DFA, as RE2 does): time O(len(name) * states), no backtracking, whatever the pattern.
``fullmatch`` answers exactly as ``re.fullmatch(pattern, name) is not None`` for every pattern it accepts.

Why not RE2 (``google-re2``): it would add a compiled dependency to a core that needs only torch and safetensors
(and, optional, it would leave the default install unprotected); its syntax and ``\\d``/``\\w`` classes also differ
from Python's ``re``, which PEFT users' patterns are written for.

Refused (``SingLoRAError``), since no automaton matches them in linear time: backreferences, lookarounds,
conditionals, atomic groups and possessive repeats; also inline flags (``(?i)`` ...), ``\\b``/``\\B``, and patterns
whose automaton would exceed ``MAX_STATES`` states (e.g. ``(a{1000}){1000}``).
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import SingLoRAError

try:  # the stdlib's own regex parser
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

MAX_STATES = 10_000  # NFA states per pattern
_CACHE_LIMIT = 4_096  # DFA transitions kept per pattern (cleared when full, as RE2 does)
_REFUSED = {"GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group", "ASSERT": "a lookaround",
            "ASSERT_NOT": "a lookaround", "ATOMIC_GROUP": "an atomic group", "POSSESSIVE_REPEAT": "a possessive repeat",
            "GROUPREF_IGNORE": "a backreference"}


def _category(name: str, ch: str) -> bool:
    """Python ``re``'s Unicode classes (``\\d``, ``\\s``, ``\\w`` and their negations), as ``_sre`` defines them."""
    if name.endswith("DIGIT"):
        found = ch.isdecimal()
    elif name.endswith("SPACE"):
        found = ch.isspace()
    elif name.endswith("WORD"):
        found = ch.isalnum() or ch == "_"
    else:
        raise SingLoRAError(f"unsupported character class {name}")
    return not found if "_NOT_" in name else found


def _in_class(items: list[tuple[Any, Any]], ch: str) -> bool:
    """Whether ``ch`` is in a ``[...]`` set (the parser's IN items)."""
    negate, found, code = False, False, ord(ch)
    for op, arg in items:
        name = str(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            found = found or code == arg
        elif name == "RANGE":
            found = found or arg[0] <= code <= arg[1]
        elif name == "CATEGORY":
            found = found or _category(str(arg), ch)
    return found != negate


class LinearRegex:
    """A compiled pattern. ``fullmatch(name)`` is ``re.fullmatch(pattern, name) is not None``, in linear time."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._nodes: list[list[Any]] = []  # [kind, arg, next...]: "char" test, "split" targets, "assert" kind, "match"
        self._cache: dict[tuple[frozenset[int], str, bool, bool], frozenset[int]] = {}
        try:
            parsed = _parser.parse(pattern)
        except Exception as exc:  # re.error, or a parser internal on odd input
            raise SingLoRAError(f"{pattern!r} is not a valid regex: {exc}") from None
        if parsed.state.flags & ~int(_c.SRE_FLAG_UNICODE):
            raise SingLoRAError(f"{pattern!r}: inline flags such as (?i) are not supported in module patterns")
        self._start = self._sequence(list(parsed), self._add(["match"]))

    def _add(self, node: list[Any]) -> int:
        if len(self._nodes) >= MAX_STATES:
            raise SingLoRAError(f"{self.pattern!r} is too complex (over {MAX_STATES} automaton states)")
        self._nodes.append(node)
        return len(self._nodes) - 1

    def _sequence(self, items: list[tuple[Any, Any]], after: int) -> int:
        for op, arg in reversed(items):
            after = self._item(str(op), arg, after)
        return after

    def _item(self, op: str, arg: Any, after: int) -> int:
        if op in _REFUSED:
            raise SingLoRAError(f"{self.pattern!r}: {_REFUSED[op]} cannot be matched in linear time; module patterns "
                                "may not use one")
        if op in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
            return self._add(["char", (op, arg), after])
        if op == "SUBPATTERN":
            if arg[1] or arg[2]:
                raise SingLoRAError(f"{self.pattern!r}: inline flags such as (?i:...) are not supported")
            return self._sequence(list(arg[3]), after)
        if op == "BRANCH":
            return self._add(["split", [self._sequence(list(branch), after) for branch in arg[1]]])
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same set of full matches
            low, high, sub = arg
            if high == _c.MAXREPEAT:  # a loop: split -> (sub -> split) | after
                loop = self._add(["split", []])
                self._nodes[loop][1] = [self._sequence(list(sub), loop), after]
                current = loop
            else:  # (high - low) nested optional copies
                current = after
                for _ in range(high - low):
                    current = self._add(["split", [self._sequence(list(sub), current), after]])
            for _ in range(low):
                current = self._sequence(list(sub), current)
            return current
        if op == "AT":
            where = str(arg)
            if where not in ("AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"):
                raise SingLoRAError(f"{self.pattern!r}: {where} (e.g. \\b) is not supported in module patterns")
            return self._add(["assert", where, after])
        raise SingLoRAError(f"{self.pattern!r}: {op} is not supported in module patterns")

    def _closure(self, nodes: frozenset[int] | list[int], at_start: bool, at_end: bool, before_newline: bool
                 ) -> frozenset[int]:
        """The consuming and match nodes reachable from ``nodes`` through splits and assertions true here."""
        seen: set[int] = set()
        kept: set[int] = set()
        stack = list(nodes)
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            node = self._nodes[index]
            if node[0] == "split":
                stack.extend(node[1])
            elif node[0] == "assert":
                where = node[1]
                holds = at_start if "BEGINNING" in where else at_end or (where == "AT_END" and before_newline)
                if holds:
                    stack.append(node[2])
            else:
                kept.add(index)
        return frozenset(kept)

    def _accepts(self, node: list[Any], ch: str) -> bool:
        kind, arg = node[1]
        if kind == "LITERAL":
            return ord(ch) == arg
        if kind == "NOT_LITERAL":
            return ord(ch) != arg
        if kind == "ANY":
            return ch != "\n"
        return _in_class(arg, ch)

    def fullmatch(self, name: str) -> bool:
        """Whether the whole of ``name`` matches the pattern."""
        size = len(name)
        states = self._closure([self._start], True, size == 0, size == 1 and name == "\n")
        for position, ch in enumerate(name, start=1):
            at_end = position == size
            before_newline = position == size - 1 and name[-1] == "\n"
            key = (states, ch, at_end, before_newline)
            found = self._cache.get(key)
            if found is None:
                moved = [self._nodes[i][2] for i in states if self._nodes[i][0] == "char"
                         and self._accepts(self._nodes[i], ch)]
                found = self._closure(moved, False, at_end, before_newline)
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[key] = found
            states = found
            if not states:
                return False
        return any(self._nodes[i][0] == "match" for i in states)


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> LinearRegex:
    """``LinearRegex(pattern)``, cached; ``SingLoRAError`` naming the pattern if it is invalid or refused."""
    if not isinstance(pattern, str):
        raise SingLoRAError(f"pattern {pattern!r} must be a string")
    return LinearRegex(pattern)


def fullmatch(pattern: str, name: str) -> bool:
    """``re.fullmatch(pattern, name) is not None``, in time linear in ``len(name)``."""
    return compile_pattern(pattern).fullmatch(name)
