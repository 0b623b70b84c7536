"""A brief run of the fuzzing harness (``fuzzing/``, beside the package) in ``make test``, plus regressions for what
it found.

The longer campaigns: ``.venv/bin/python -m fuzzing --examples 20000 --seed 1`` (hypothesis) and
``.venv/bin/python -m fuzzing --engine atheris --seconds 600 --targets weights config_file`` (atheris, the
``fuzz`` extra; its tests here skip without it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torch_singlora.untrusted as untrusted
from torch_singlora import SingLoRAConfig, SingLoRAError
from torch_singlora.adapter_file import WEIGHTS_FILE
from torch_singlora.names import resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds fuzzing/
from adapter_fixtures import FuzzModel, fresh_model, same, snapshot, valid_adapter  # noqa: E402
from fuzzing.harness import (ATHERIS_TARGETS, MORE_TARGETS, Campaign, check_load, config_seeds, run,  # noqa: E402
                             run_atheris, seed_files, weight_seeds, write_case)

EXAMPLES = 120
MORE_EXAMPLES = 30


def test_brief_fuzz_campaign_finds_nothing() -> None:
    campaign = run(examples=EXAMPLES, seed=0, targets=ATHERIS_TARGETS)
    campaign.merge(run(examples=MORE_EXAMPLES, seed=0, targets=MORE_TARGETS).to_dict())
    assert campaign.findings == []
    assert set(campaign.counts) == set(ATHERIS_TARGETS + MORE_TARGETS)
    for target, counts in campaign.counts.items():
        assert counts["inputs"] == (EXAMPLES if target in ATHERIS_TARGETS else MORE_EXAMPLES), target
        assert counts["refused"] > 0, target  # the mutations reach the checks
    # Some inputs must get all the way through, or the harness only exercises the first check.
    assert campaign.counts["config"]["loaded"] > 0
    assert campaign.counts["config_file"]["loaded"] > 0
    assert all(campaign.counts[target]["loaded"] > 0 for target in MORE_TARGETS)


def test_more_targets_detect_planted_bugs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new targets report what their oracles exist for: a run_info reader that accepts a document breaking
    its schema, and a command raising something other than SingLoRAError."""
    import torch_singlora.export as export
    import torch_singlora.runs as runs

    monkeypatch.setattr(runs, "read_run_info", lambda folder: {"task": "nope", "method": "x", "base_model": 1})
    monkeypatch.setattr(export, "peft_config", lambda adapter: 1 / 0)
    campaign = run(examples=20, seed=0, targets=("run_info", "commands"))
    problems = {f["target"]: f["problem"] for f in campaign.findings}
    assert "breaks its schema" in problems.get("run_info", ""), problems
    assert "export raised something other than SingLoRAError" in problems.get("commands", ""), problems


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
    ``resolve`` raised ``re.error``."""
    with pytest.raises(SingLoRAError, match=rf"{field} key '\(': .* is not a valid regex"):
        SingLoRAConfig(target_modules=["proj"], **{field: {"(": 2}})
    config = SingLoRAConfig(target_modules=["proj"], **{field: {"pro.": 2}})
    assert resolve(FuzzModel(), config).modules == ["proj"]


def test_found_huge_json_integer_refused(tmp_path) -> None:  # noqa: ANN001
    """Found by the fuzzer: a 5,000-digit integer in adapter_config.json raised Python's plain ValueError."""
    from torch_singlora import AdapterFileError
    from torch_singlora.adapter_file import CONFIG_FILE, read_adapter_config

    valid_adapter(tmp_path)
    path = tmp_path / CONFIG_FILE
    path.write_text(path.read_text().rstrip()[:-1] + ', "r": ' + "9" * 5000 + "}")
    with pytest.raises(AdapterFileError, match="not valid JSON: Exceeds the limit"):
        read_adapter_config(tmp_path)


def planted_read_data(path: Path, entries: dict) -> dict:
    """A planted bug: reading the data of a file that passed every header check raises KeyError."""
    raise KeyError("planted")


def test_hypothesis_finding_saves_its_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finding's raw input goes to ``artifacts``: a planted KeyError after the header checks (the unmutated
    seed file gets there) is reported with the file that caused it."""
    monkeypatch.setattr(untrusted, "read_safetensors_data", planted_read_data)
    campaign = run(examples=40, seed=0, targets=("weights",), artifacts=tmp_path / "artifacts")
    planted = [f for f in campaign.findings if "KeyError: 'planted'" in f["problem"]]
    assert planted
    for finding in planted:  # the whole file was saved (not the 300-byte excerpt): its header checks pass
        case = write_case(tmp_path / "case", b"{}", Path(finding["artifact"]).read_bytes())
        _, entries = untrusted.read_safetensors_header(case / WEIGHTS_FILE)
        assert "proj.singlora_A" in entries


def test_atheris_seed_corpus_reaches_different_checks(tmp_path: Path) -> None:
    """The seeds: the valid files load; each mutation is refused, and by a different check."""
    config_bytes, weights_bytes = seed_files(tmp_path / "seed")
    for target, seeds, files in (
        ("weights", weight_seeds(weights_bytes), lambda blob: (config_bytes, blob)),
        ("config_file", config_seeds(config_bytes), lambda blob: (blob, weights_bytes)),
    ):
        campaign = Campaign()
        for blob in seeds:
            check_load(campaign, target, write_case(tmp_path / "case", *files(blob)), blob[:300], blob)
        counts = campaign.counts[target]
        assert campaign.findings == [], target
        assert counts["inputs"] == len(seeds) >= 8, target
        assert counts["loaded"] == (2 if target == "weights" else 3), target
        assert len(campaign.reasons[target]) >= counts["refused"] - 1, (target, campaign.reasons[target])


def test_atheris_child_that_dies_is_a_finding(tmp_path: Path) -> None:
    """A child process that ends with an error (libFuzzer: a crash, a hang, out of memory) is reported."""
    campaign = run_atheris(examples=10, targets=("weights",), artifacts=tmp_path,
                           launcher=(sys.executable, "-c", "import sys; sys.exit(3)"))
    assert [f["target"] for f in campaign.findings] == ["weights"]
    assert "exited with code 3" in campaign.findings[0]["problem"]
    assert campaign.counts["weights"]["findings"] == 1


ATHERIS_EXAMPLES = 300


def test_atheris_brief_campaign_finds_nothing(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    campaign = run_atheris(examples=ATHERIS_EXAMPLES, seed=1, artifacts=tmp_path)
    assert campaign.findings == []
    for target in ("config", "config_file", "weights"):
        counts = campaign.counts[target]
        assert counts["inputs"] == ATHERIS_EXAMPLES, target
        assert counts["refused"] > 0 and counts["loaded"] > 0, (target, counts)
        assert (tmp_path / f"corpus-{target}").is_dir(), target


PLANT = """import sys
import torch_singlora.untrusted as untrusted
def broken(path, entries):
    raise KeyError("planted")
untrusted.read_safetensors_data = broken
from fuzzing.harness import main
sys.exit(main(sys.argv[1:]))
"""


def test_atheris_finding_is_reported_with_its_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The atheris engine reports a bug planted in its child process, and each saved input replays it here."""
    pytest.importorskip("atheris")
    campaign = run_atheris(examples=50, seed=1, targets=("weights",), artifacts=tmp_path / "artifacts",
                           launcher=(sys.executable, "-c", PLANT))
    planted = [f for f in campaign.findings if "KeyError: 'planted'" in f["problem"]]
    assert planted and campaign.counts["weights"]["findings"] >= len(planted)
    monkeypatch.setattr(untrusted, "read_safetensors_data", planted_read_data)
    config_bytes, _ = seed_files(tmp_path / "seed")
    replay = Campaign()
    for finding in planted:
        blob = Path(finding["artifact"]).read_bytes()
        check_load(replay, "weights", write_case(tmp_path / "case", config_bytes, blob), blob[:300], blob)
    assert replay.counts["weights"]["findings"] == len(planted)


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


def _f64_adapter(directory: Path, key: str, value: float) -> dict:
    """The seed adapter re-saved with every tensor as F64 and ``key``'s first element set to ``value``."""
    from safetensors.torch import load_file, save_file

    from torch_singlora.adapter_file import FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE

    valid_adapter(directory)
    tensors = {k: v.double() for k, v in load_file(directory / WEIGHTS_FILE).items()}
    tensors[key].view(-1)[0] = value
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    save_file(tensors, directory / WEIGHTS_FILE, metadata=metadata)
    return tensors


@pytest.mark.parametrize("key", ["proj.singlora_A", "head.weight"])
def test_found_f64_values_beyond_float32_refused(tmp_path: Path, key: str) -> None:
    """Found by the atheris engine (its mutator re-encodes a file's tensors as F64, then sets a data byte): an F64
    value beyond float32's range passed the file's NaN/Inf check and loaded as Inf into the float32 parameter."""
    from torch_singlora import AdapterFileError

    _f64_adapter(tmp_path / "bad", key, 1e300)
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=rf"{key} holds values beyond the range of torch.float32"):
        model.load_adapter(tmp_path / "bad", "new")
    assert same(before, snapshot(model))
    # Within range, F64 loads (cast to float32); an in-place load (a resume) of the bad file then changes nothing.
    good = _f64_adapter(tmp_path / "good", key, 0.25)
    model.load_adapter(tmp_path / "good", "new")
    loaded = {k: v.detach().clone() for k, v in model.adapter_state_dict("new").items()}
    assert all(torch.equal(loaded[k], v.float()) for k, v in good.items())
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=rf"{key} holds values beyond"):
        model.load_adapter_in_place(tmp_path / "bad", "new")
    assert same(before, snapshot(model))
