"""Fuzzing harness (hypothesis) for the adapter loader and the config parser.

Three targets, each fed by a hypothesis strategy; an input passes if it loads, or is refused with a
``SingLoRAError`` (``AdapterFileError`` for files) and leaves the model exactly as it was. Anything else (another
exception type, a half-changed model, a loaded adapter with NaN) is a *finding*, recorded with its input.

- ``config``: ``SingLoRAConfig.from_dict`` on random dicts of known and unknown fields with values of every JSON
  type (and NaN/Inf floats), then ``ramp_steps``, ``rank_for``, ``scale_for``, the ``to_dict`` round trip and
  ``resolve_targets`` on a small model.
- ``config_file``: a saved adapter whose ``adapter_config.json`` is replaced by mutated JSON (random edits of a
  valid document) or random bytes, loaded into a model.
- ``weights``: a saved adapter whose ``adapter_model.safetensors`` is mutated structurally (dtype, shape, offsets,
  keys, metadata, header length, truncation, extension) and byte-wise, loaded into a model.

Run (a longer campaign; ``make test`` runs a few hundred inputs per target via tests/test_fuzz.py)::

    .venv/bin/python -m singlora.fuzz --examples 20000 --seed 1

Needs ``hypothesis`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import struct
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapter_file import CONFIG_FILE, WEIGHTS_FILE
from .config import INIT_METHODS, SingLoRAConfig
from .errors import SingLoRAError
from .model import SingLoRAModel, get_singlora_model
from .targets import resolve_targets

FIELDS = [f.name for f in dataclasses.fields(SingLoRAConfig)]
META_FIELDS = ["format", "format_version", "ramp_step", "base_model_name_or_path"]
# Words a config plausibly holds: module names of the fuzz model, regex fragments, traversal, field values.
WORDS = ["proj", "conv", "emb", "head", "other", "0", "all-linear", ".*", "(a+)+", "(", "proj|conv", "../../x",
         "normal", "gaussian", "kaiming_uniform", "singlora", "", "\x00", "default", "proj.singlora_A"]


class FuzzModel(nn.Module):
    """The model every fuzz input is loaded into: Embedding, Linear, Conv1d, and a head for ``modules_to_save``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv1d(5, 4, 3)
        self.head = nn.Linear(4, 3)
        self.other = nn.Linear(6, 6)


def fresh_model() -> SingLoRAModel:
    """A deterministic wrapped ``FuzzModel`` that already holds an adapter named ``keep``."""
    torch.manual_seed(0)
    return get_singlora_model(FuzzModel(), SingLoRAConfig(r=1, target_modules=["other"], ramp_up_steps=0), "keep")


def snapshot(model: nn.Module) -> tuple[Any, ...]:
    """Everything a failed load must leave unchanged: module tree, tensors, requires_grad flags, adapters."""
    return (
        [(name, type(m).__name__) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        sorted(getattr(model, "configs", {})),
    )


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1]
    )


def valid_adapter(directory: Path) -> None:
    """Write the seed adapter (every layer kind, ``modules_to_save``, a ramp step) into ``directory``."""
    torch.manual_seed(1)
    config = SingLoRAConfig(r=2, alpha=4.0, target_modules=["proj", "conv", "emb"], modules_to_save=["head"],
                            ramp_up_steps=10)
    model = get_singlora_model(FuzzModel(), config)
    model.step(4)
    model.save_adapter(directory)


# ---- strategies -------------------------------------------------------------------------------------------------


def _strategies() -> dict[str, Any]:
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 20), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, 1e308, 2**31, 2**63, 2**64, 10**400]), st.sampled_from(WORDS),
        st.text(max_size=12),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(WORDS), inner, max_size=3)),
        max_leaves=8,
    )
    names = st.sampled_from(WORDS)
    patterns = st.one_of(st.none(), st.lists(names, max_size=3), names)
    plausible = {  # per field: values near the valid range, so that many configs get past validation
        "r": st.integers(-1, 8), "alpha": st.one_of(st.floats(-1, 100), st.integers(0, 16)),
        "target_modules": patterns, "exclude_modules": patterns,
        "modules_to_save": st.one_of(st.none(), st.lists(names, max_size=2)),
        "dropout": st.floats(-0.5, 1.5), "ramp_up_steps": st.one_of(st.integers(-2, 100), st.floats(-0.5, 1.5)),
        "total_steps": st.one_of(st.none(), st.integers(-1, 1000)), "init": st.sampled_from(INIT_METHODS + ("x",)),
        "init_std": st.one_of(st.none(), st.floats(-1, 1)),
        "rank_pattern": st.dictionaries(names, st.integers(-1, 8), max_size=2),
        "alpha_pattern": st.dictionaries(names, st.floats(-1, 16), max_size=2), "use_rslora": st.booleans(),
    }

    @st.composite
    def config_dicts(draw: Callable[[Any], Any]) -> dict[str, Any]:
        data: dict[str, Any] = {"r": 2, "target_modules": ["proj"], "ramp_up_steps": 0}
        for _ in range(draw(st.integers(0, 4))):
            field = draw(st.one_of(*[st.sampled_from(FIELDS)] * 4, st.text(max_size=6)))  # mostly known fields
            data[field] = draw(st.one_of(plausible.get(field, values), values) if draw(st.booleans()) else
                               plausible.get(field, values))
        return data

    return {"values": values, "config_dicts": config_dicts(), "st": st}


# ---- targets ----------------------------------------------------------------------------------------------------


class Campaign:
    """Counts inputs per target and outcome; records findings (unexpected behaviour) with their inputs."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.findings: list[dict[str, str]] = []
        self.reasons: dict[str, dict[str, int]] = {}  # target -> refusal message shape -> count

    def refused(self, target: str, error: Exception) -> None:
        """Count a refusal under the shape of its message (paths, quoted values and numbers blanked)."""
        text = re.sub(r"\S*/\S*|'[^']*'|\"[^\"]*\"|-?\d+(\.\d+)?(e-?\d+)?", "_", str(error))
        reasons = self.reasons.setdefault(target, {})
        reasons[text[:70]] = reasons.get(text[:70], 0) + 1
        self.record(target, "refused")

    def record(self, target: str, outcome: str) -> None:
        bucket = self.counts.setdefault(target, {"inputs": 0, "loaded": 0, "refused": 0, "findings": 0})
        bucket["inputs"] += 1
        bucket[outcome] += 1

    def finding(self, target: str, problem: str, given: Any) -> None:
        self.record(target, "findings")
        if sum(f["target"] == target and f["problem"] == problem for f in self.findings) < 5:
            self.findings.append({"target": target, "problem": problem, "input": repr(given)[:500]})


def check_config(campaign: Campaign, data: dict[str, Any]) -> None:
    """``from_dict`` and every config method: a config or ``SingLoRAError``, nothing else."""
    try:
        config = SingLoRAConfig.from_dict(data, source="fuzz")
        config.ramp_steps() if isinstance(config.ramp_up_steps, int) or config.total_steps else None
        for name in ("proj", "a.b.proj", ""):
            config.rank_for(name)
            scale = config.scale_for(name)
            if not math.isfinite(scale) or scale <= 0:
                return campaign.finding("config", f"scale_for gave {scale}", data)
        if SingLoRAConfig.from_dict(config.to_dict()) != config:
            return campaign.finding("config", "to_dict/from_dict round trip differs", data)
        resolve_targets(FuzzModel(), config)
    except SingLoRAError as exc:
        return campaign.refused("config", exc)
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything else
        return campaign.finding("config", f"{type(exc).__name__}: {exc}"[:200], data)
    campaign.record("config", "loaded")


def check_load(campaign: Campaign, target: str, directory: Path, given: Any) -> None:
    """Load ``directory`` into a fresh model: loads (finite, step >= 0) or refuses leaving the model unchanged."""
    model = fresh_model()
    before = snapshot(model)
    try:
        model.load_adapter(directory, "new")
    except SingLoRAError as exc:
        if not same(before, snapshot(model)):
            return campaign.finding(target, "refused but the model changed", given)
        return campaign.refused(target, exc)
    except Exception as exc:  # noqa: BLE001
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return campaign.finding(target, detail[:200], given)
    tensors = [p for p in model.parameters()]
    if not all(torch.isfinite(p).all() for p in tensors):
        return campaign.finding(target, "loaded an adapter with NaN/Inf", given)
    campaign.record(target, "loaded")


def _header(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def mutate_weights(draw: Callable[[Any], Any], st: Any, blob: bytes) -> bytes:
    """A structurally mutated safetensors file: edits to the header JSON, then to the raw bytes."""
    header, data = _header(blob)
    keys = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(keys))
        edit = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "rename", "metadata", "entry"]))
        if edit in ("dtype", "shape", "offsets") and not isinstance(header.get(key), dict):
            continue
        if edit == "dtype":
            header[key]["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8", "X", 3]))
        elif edit == "shape":
            header[key]["shape"] = draw(st.one_of(
                st.lists(st.integers(-2, 12), max_size=3), st.just([2**40, 2**40]), st.just("6"), st.just([6.0, 2]),
            ))
        elif edit == "offsets":
            header[key]["data_offsets"] = draw(st.one_of(
                st.lists(st.integers(-8, len(data) + 8), min_size=2, max_size=2), st.just([0, 2**64]), st.just(None),
            ))
        elif edit == "drop":
            header.pop(key, None)
        elif edit == "add":
            header[draw(st.sampled_from(["x.singlora_A", "../../etc/passwd", "head.bias2", "", "proj.singlora_A "]))] = (
                dict(header[key]) if isinstance(header.get(key), dict) else {})
        elif edit == "rename" and key in header:
            header[key + draw(st.sampled_from(["x", ".", "/.."]))] = header.pop(key)
        elif edit == "metadata":
            header["__metadata__"] = draw(st.sampled_from([{}, {"format": "pt"}, {"format": 1}, [], None]))
        elif edit == "entry" and key in header:
            header[key] = draw(st.sampled_from([None, [], {}, {"dtype": "F32"}, "x"]))
    text = json.dumps(header).encode()
    def sometimes() -> bool:  # ~30%: most inputs keep a true length, the whole file, no flips, to reach deep checks
        return draw(st.integers(0, 9)) >= 7

    length = draw(st.sampled_from([0, 7, len(text) - 1, len(text) + 1, 2**63, 2**64 - 1])) if sometimes() else len(text)
    out = bytearray(struct.pack("<Q", length) + text + data)
    for _ in range(draw(st.integers(1, 3)) if sometimes() else 0):  # byte flips anywhere
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(out))) if sometimes() else len(out)
    tail = draw(st.binary(min_size=1, max_size=16)) if sometimes() else b""
    return bytes(out[:cut]) + tail


def mutate_config(draw: Callable[[Any], Any], st: Any, values: Any, document: dict[str, Any]) -> bytes:
    """A mutated ``adapter_config.json``: field edits of a valid document, or raw text edits."""
    document = dict(document)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS + META_FIELDS + ["unknown"]))
        if draw(st.booleans()):
            document[field] = draw(values)
        else:
            document.pop(field, None)
    text = json.dumps(document, allow_nan=True).encode()
    if draw(st.integers(0, 9)) == 0:  # raw edits: truncation, random bytes, a 5,000-digit number
        text = draw(st.one_of(st.binary(max_size=64), st.just(text[: draw(st.integers(0, len(text)))]),
                              st.just(text[:-1] + b', "r": ' + b"9" * 5000 + b"}")))
    return text


# ---- runner -----------------------------------------------------------------------------------------------------


def run(examples: int = 200, seed: int = 0, targets: tuple[str, ...] = ("config", "config_file", "weights"),
        ) -> Campaign:
    """Run ``examples`` inputs per target (deterministic for a ``seed``); returns the counts and findings."""
    from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings

    strategies = _strategies()
    st, values = strategies["st"], strategies["values"]
    campaign = Campaign()
    options = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                       suppress_health_check=list(HealthCheck), phases=("generate",))
    workdir = Path(tempfile.mkdtemp(prefix="singlora-fuzz-"))
    try:
        seed_dir = workdir / "seed"
        valid_adapter(seed_dir)
        config_doc = json.loads((seed_dir / CONFIG_FILE).read_text())
        weights_blob = (seed_dir / WEIGHTS_FILE).read_bytes()
        case = workdir / "case"

        def with_files(config_bytes: bytes, weights_bytes: bytes) -> Path:
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir()
            (case / CONFIG_FILE).write_bytes(config_bytes)
            (case / WEIGHTS_FILE).write_bytes(weights_bytes)
            return case

        @hypothesis_seed(seed)
        @options
        @given(strategies["config_dicts"])
        def fuzz_config(data: dict[str, Any]) -> None:
            check_config(campaign, data)

        @hypothesis_seed(seed)
        @options
        @given(st.data())
        def fuzz_config_file(data: Any) -> None:
            text = mutate_config(data.draw, st, values, config_doc)
            check_load(campaign, "config_file", with_files(text, weights_blob), text)

        @hypothesis_seed(seed)
        @options
        @given(st.data())
        def fuzz_weights(data: Any) -> None:
            blob = mutate_weights(data.draw, st, weights_blob)
            check_load(campaign, "weights", with_files((seed_dir / CONFIG_FILE).read_bytes(), blob), blob[:300])

        for name, test in (("config", fuzz_config), ("config_file", fuzz_config_file), ("weights", fuzz_weights)):
            if name in targets:
                test()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="inputs per target (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--targets", nargs="+", default=["config", "config_file", "weights"],
                        choices=["config", "config_file", "weights"])
    parser.add_argument("--reasons", type=int, default=0, help="print the N most common refusal messages per target")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"--examples={args.examples} must be >= 1")
    torch.set_num_threads(1)
    print(f"| target | inputs | loaded | refused | findings | seconds |  (seed {args.seed})", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    findings = []
    for target in args.targets:  # one row as each target finishes
        start = time.perf_counter()
        campaign = run(args.examples, args.seed, (target,))
        c = campaign.counts[target]
        print(f"| {target} | {c['inputs']} | {c['loaded']} | {c['refused']} | {c['findings']} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
        findings += campaign.findings
        ranked = sorted(campaign.reasons.get(target, {}).items(), key=lambda item: -item[1])
        for reason, count in ranked[: args.reasons]:
            print(f"|   {count} x {reason} |", flush=True)
    for item in findings:
        print(f"FINDING [{item['target']}] {item['problem']}\n    input: {item['input']}")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
