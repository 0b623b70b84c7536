"""A brief run of the fuzzing harness (``singlora.fuzz``) in ``make test``, plus regressions for what it found.

The longer campaign: ``.venv/bin/python -m singlora.fuzz --examples 20000 --seed 1``.
"""

from __future__ import annotations

import pytest

from singlora import SingLoRAConfig, SingLoRAError
from singlora.fuzz import FuzzModel, run
from singlora.targets import resolve_targets

EXAMPLES = 120


def test_brief_fuzz_campaign_finds_nothing() -> None:
    campaign = run(examples=EXAMPLES, seed=0)
    assert campaign.findings == []
    assert set(campaign.counts) == {"config", "config_file", "weights"}
    for target, counts in campaign.counts.items():
        assert counts["inputs"] == EXAMPLES, target
        assert counts["refused"] > 0, target  # the mutations reach the checks
    # Some inputs must get all the way through, or the harness only exercises the first check.
    assert campaign.counts["config"]["loaded"] > 0
    assert campaign.counts["config_file"]["loaded"] > 0


def test_campaign_detects_a_planted_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness must report an exception that is not a SingLoRAError (here: planted in the config parser)."""
    real = SingLoRAConfig.from_dict.__func__

    def buggy(cls, data, source="config"):  # noqa: ANN001
        if data.get("dropout") not in (None, 0.0):
            raise KeyError("planted")
        return real(cls, data, source)

    monkeypatch.setattr(SingLoRAConfig, "from_dict", classmethod(buggy))
    campaign = run(examples=60, seed=0, targets=("config",))
    assert any("KeyError" in f["problem"] for f in campaign.findings)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_found_invalid_regex_pattern_keys_refused(field: str) -> None:
    """Found by the fuzzer: a pattern-dict key that is not a regex passed validation, then ``rank_for`` /
    ``resolve_targets`` raised ``re.error``."""
    with pytest.raises(SingLoRAError, match=rf"{field} key '\(' is not a valid regex"):
        SingLoRAConfig(target_modules=["proj"], **{field: {"(": 2}})
    config = SingLoRAConfig(target_modules=["proj"], **{field: {"pro.": 2}})
    assert resolve_targets(FuzzModel(), config) == ["proj"]


def test_found_huge_json_integer_refused(tmp_path) -> None:  # noqa: ANN001
    """Found by the fuzzer: a 5,000-digit integer in adapter_config.json raised Python's plain ValueError."""
    from singlora import AdapterFileError
    from singlora.adapter_file import CONFIG_FILE, read_adapter_config
    from singlora.fuzz import valid_adapter

    valid_adapter(tmp_path)
    path = tmp_path / CONFIG_FILE
    path.write_text(path.read_text().rstrip()[:-1] + ', "r": ' + "9" * 5000 + "}")
    with pytest.raises(AdapterFileError, match="not valid JSON: Exceeds the limit"):
        read_adapter_config(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("alpha", 10**400), ("init_std", 10**400), ("alpha_pattern", {"proj": 10**400}), ("total_steps", 10**400),
    ("ramp_up_steps", 10**400), ("rank_pattern", {"proj": 2**64}),
])
def test_found_ints_beyond_int64_refused(field: str, value: object) -> None:
    """Found while extending the fuzzer's value pool: ints too large for a float raised OverflowError (alpha,
    init_std, alpha_pattern in validation; total_steps, ramp_up_steps when used)."""
    extra = {"init": "gaussian"} if field == "init_std" else {"ramp_up_steps": 0.5} if field == "total_steps" else {}
    with pytest.raises(SingLoRAError, match=field):
        SingLoRAConfig(target_modules=["proj"], **{field: value}, **extra)
