"""Module-name patterns are matched in linear time (``torch_singlora.linear_regex``): no crafted pattern, in a file
or from a user, can hang loading, export, merge or inspect."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_singlora import SingLoRAConfig, SingLoRAError
from torch_singlora.linear_regex import compile_pattern, fullmatch

EVIL = ".*" * 10 + "X"  # issue 11: ~14 s per module name with Python's backtracking re
ATOMS = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", "(a|b)", "(?:ab|a)", "x", "^", "$", r"\Z", r"\A", "()",
         "(a*)", "[0-9]", "q_proj"]
QUANTIFIERS = ["", "*", "+", "?", "{2}", "{1,3}", "*?", "{0,2}", "+?"]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.tuples(st.sampled_from(ATOMS), st.sampled_from(QUANTIFIERS)), min_size=1, max_size=5))
    pattern = "".join(atom + quantifier for atom, quantifier in parts)
    if draw(st.booleans()):
        pattern = f"({pattern}){draw(st.sampled_from(QUANTIFIERS))}|{draw(st.sampled_from(ATOMS))}"
    return pattern


@settings(max_examples=300, deadline=None)
@given(patterns(), st.lists(st.text("ab.x1_\nq", max_size=8), min_size=1, max_size=10))
def test_answers_exactly_as_python_re(pattern: str, names: list[str]) -> None:
    try:
        re.compile(pattern)
    except re.error:
        return
    compiled = compile_pattern(pattern)
    for name in names:
        assert compiled.fullmatch(name) == (re.fullmatch(pattern, name) is not None), (pattern, name)


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)a", r"(?!b)a", r"(?<=a)b", r"(?(1)a|b)", r"(?>a)", r"a*+",
                                     r"(?i)a", r"(?i:a)b", r"\ba", "(a{100}){200}"])
def test_constructs_without_a_linear_automaton_are_refused(pattern: str) -> None:
    with pytest.raises(SingLoRAError, match=re.escape(repr(pattern))):
        compile_pattern(pattern)
    with pytest.raises(SingLoRAError, match="target_modules"):
        SingLoRAConfig(target_modules=pattern)


def test_the_issue_pattern_is_linear_in_the_name() -> None:
    """Python's re needs ~14 s for one 60-character name; here 1,000 names of 200 characters are one pass each."""
    compiled = compile_pattern(r"(.*\.)?" + EVIL)
    assert not any(compiled.fullmatch(f"model.layers.{i}.self_attn." + "q" * 170) for i in range(1000))
    assert fullmatch(EVIL, "a.b.cX") and not fullmatch(EVIL, "a.b.c")


LOAD_EVIL = """
import json, torch
from torch import nn
from torch_singlora import SingLoRAConfig, get_singlora_model, SingLoRAModel
from torch_singlora.export import export_lora
NAMES = ["model_layers_0_self_attention_query_projection", "model_layers_0_self_attention_value_projection"]
class Net(nn.Module):  # module names as long as a real model's (backtracking cost grows as len(name) ** 10)
    def __init__(self):
        super().__init__()
        for name in NAMES:
            self.add_module(name, nn.Linear(8, 8))
EVIL = {evil!r}
adapted = get_singlora_model(Net(), SingLoRAConfig(r=2, target_modules=NAMES, ramp_up_steps=0))
adapted.save_adapter({folder!r})
path = {folder!r} + "/adapter_config.json"
document = json.load(open(path))
document.update(target_modules="(" + EVIL + ")|" + "|".join(NAMES), exclude_modules=EVIL, rank_pattern={{EVIL: 2}},
                alpha_pattern={{EVIL: 3.0}})
json.dump(document, open(path, "w"))
loaded = SingLoRAModel.from_pretrained(Net(), {folder!r})
assert sorted(n for n, _ in loaded.singlora_layers()) == NAMES
export_lora({folder!r}, {folder!r} + "-lora", base_model=Net())
print("ok")
"""


def test_crafted_patterns_in_a_file_do_not_hang_loading_or_export(tmp_path: Path) -> None:
    """The issue's pattern in every pattern field of adapter_config.json: loaded and exported at once. A generous
    limit in a child process, not a timing assertion: with backtracking this took hours (measured: killed at 60 s)."""
    script = LOAD_EVIL.format(evil=EVIL, folder=str(tmp_path / "adapter"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
