"""Fuzzing harness (hypothesis or atheris) for the adapter loader and the config parser.

Three targets, each fed by a hypothesis strategy or by atheris (libFuzzer, coverage-guided); an input passes if it
loads, or is refused with a ``SingLoRAError`` (``AdapterFileError`` for files) and leaves the model exactly as it
was. Anything else (another exception type, a half-changed model, a loaded adapter with NaN/Inf) is a *finding*,
recorded with its input.

- ``config``: ``SingLoRAConfig.from_dict`` on random dicts of known and unknown fields with values of every JSON
  type (and NaN/Inf floats), then ``resolve_ramp_up_steps``, ``rank_for``, ``scale_for``, the ``to_dict`` round trip and
  ``names.resolve`` on a small model.
- ``config_file``: a saved adapter whose ``adapter_config.json`` is replaced by mutated JSON (random edits of a
  valid document) or random bytes, loaded into a model.
- ``weights``: a saved adapter whose ``adapter_model.safetensors`` is mutated structurally (dtype, shape, offsets,
  keys, metadata, header length, truncation, extension) and byte-wise, loaded into a model.

Engines (``make test`` runs a few hundred inputs per target of each via tests/test_fuzz.py):

- ``hypothesis`` (default; the ``dev`` extra): the strategies above, deterministic for a ``--seed``::

      .venv/bin/python -m fuzzing --examples 20000 --seed 1

- ``atheris`` (the ``fuzz`` extra: ``pip install 'torch-singlora[fuzz]'``): libFuzzer mutates raw bytes, guided by the
  coverage of the file layer, model, config and targets modules (``INSTRUMENTED``, instrumented at start), with
  a dictionary of the seed files' JSON strings. ``weights``: the bytes are the safetensors file (seed corpus: the
  valid file and structural mutations, ``weight_seeds``; a structure-aware mutator, ``safetensors_mutator``,
  mutates the header JSON or the data alone and re-encodes tensors as other dtypes); ``config_file``: the bytes
  are ``adapter_config.json`` (``config_seeds``); ``config``: a dict drawn through ``atheris.FuzzedDataProvider``.
  Each target runs in a child process (libFuzzer ends the process it runs in) for ``--seconds``
  (``-max_total_time``) and/or ``--examples`` inputs (``-atheris_runs``)::

      .venv/bin/python -m fuzzing --engine atheris --seconds 600 --targets weights config_file \\
          --artifacts fuzz-out --reasons 5

Both print one table row per target (inputs, loaded, refused, findings, seconds) and exit 1 on any finding. Each
finding's input is saved as ``<artifacts>/finding-<target>-<sha1>.{safetensors,json,bin}`` (default artifacts
folder: ``$TMPDIR/singlora-fuzz``). With atheris the folder also holds ``corpus-<target>/`` (a later run continues
from it), ``<target>-libfuzzer.log``, and ``libfuzzer-<target>-crash-*`` / ``-timeout-*`` / ``-oom-*`` when the
child process itself died (a hang over 60 s, over 2 GB of memory), which is reported as a finding too.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable

import torch

from torch_singlora.adapter_file import CONFIG_FILE, META_FIELDS, WEIGHTS_FILE
from torch_singlora.atomic import atomic_write_text
from torch_singlora.config import INIT_METHODS, SingLoRAConfig
from torch_singlora.errors import SingLoRAError
from torch_singlora.names import resolve

ROOT = Path(__file__).resolve().parents[1]  # the repository: fuzzing/ beside tests/, benchmarks/, studies/
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
from adapter_fixtures import FuzzModel, fresh_model, same, snapshot, valid_adapter  # noqa: E402

from fuzzing.more_targets import MORE_TARGETS, hypothesis_tests  # noqa: E402

ATHERIS_TARGETS = ("config", "config_file", "weights")
TARGETS = ATHERIS_TARGETS + MORE_TARGETS
ARTIFACT_SUFFIX = {"config": ".bin", "config_file": ".json", "weights": ".safetensors", "run_info": ".json",
                   "checkpoint": ".pt", "commands": ".safetensors"}
FIELDS = [f.name for f in dataclasses.fields(SingLoRAConfig)]
# Words a config plausibly holds: module names of the fuzz model, regex fragments, traversal, field values.
WORDS = ["proj", "conv", "emb", "head", "other", "0", "all-linear", ".*", "(a+)+", "(", "proj|conv", "../../x",
         "normal", "gaussian", "kaiming_uniform", "singlora", "", "\x00", "default", "proj.singlora_A"]


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
    """Counts inputs per target and outcome; records findings (unexpected behaviour) with their inputs, and saves
    each recorded finding's raw input under ``artifacts`` (when given) so that it can be replayed."""

    def __init__(self, artifacts: Path | None = None) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.findings: list[dict[str, str]] = []
        self.reasons: dict[str, dict[str, int]] = {}  # target -> refusal message shape -> count
        self.artifacts = artifacts

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "findings": self.findings, "reasons": self.reasons}

    def merge(self, other: dict[str, Any]) -> None:
        """Add the counts, findings and refusal reasons of another campaign's ``to_dict()``."""
        for target, counts in other["counts"].items():
            bucket = self.counts.setdefault(target, dict.fromkeys(counts, 0))
            for outcome, count in counts.items():
                bucket[outcome] = bucket.get(outcome, 0) + count
        for target, reasons in other["reasons"].items():
            mine = self.reasons.setdefault(target, {})
            for reason, count in reasons.items():
                mine[reason] = mine.get(reason, 0) + count
        self.findings += other["findings"]

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

    def finding(self, target: str, problem: str, given: Any, raw: bytes | None = None) -> None:
        """Record a finding (at most 5 per target and problem); ``raw``, the input's bytes, goes to a file."""
        self.record(target, "findings")
        if sum(f["target"] == target and f["problem"] == problem for f in self.findings) < 5:
            item = {"target": target, "problem": problem, "input": repr(given)[:500]}
            if raw is not None and self.artifacts is not None:
                self.artifacts.mkdir(parents=True, exist_ok=True)
                name = f"finding-{target}-{hashlib.sha1(raw).hexdigest()[:12]}{ARTIFACT_SUFFIX[target]}"
                path = self.artifacts / name
                path.write_bytes(raw)
                item["artifact"] = str(path)
            self.findings.append(item)


def check_config(campaign: Campaign, data: dict[str, Any], raw: bytes | None = None) -> None:
    """``from_dict`` and every config method: a config or ``SingLoRAError``, nothing else (``raw``: the bytes
    ``data`` was made from, saved with a finding)."""
    try:
        config = SingLoRAConfig.from_dict(data, source="fuzz")
        config.resolve_ramp_up_steps()
        for name in ("proj", "a.b.proj", ""):
            config.rank_for(name)
            scale = config.scale_for(name)
            if not math.isfinite(scale) or scale <= 0:
                return campaign.finding("config", f"scale_for gave {scale}", data, raw)
        if SingLoRAConfig.from_dict(config.to_dict()) != config:
            return campaign.finding("config", "to_dict/from_dict round trip differs", data, raw)
        resolve(FuzzModel(), config)
    except SingLoRAError as exc:
        return campaign.refused("config", exc)
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything else
        return campaign.finding("config", f"{type(exc).__name__}: {exc}"[:200], data, raw)
    campaign.record("config", "loaded")


def check_load(campaign: Campaign, target: str, directory: Path, given: Any, raw: bytes | None = None) -> None:
    """Load ``directory`` into a fresh model: loads (finite, step >= 0) or refuses leaving the model unchanged.
    ``given`` is shown with a finding; ``raw`` (the mutated file's bytes) is saved with it."""
    model = fresh_model()
    before = snapshot(model)
    try:
        model.load_adapter(directory, "new")
    except SingLoRAError as exc:
        if not same(before, snapshot(model)):
            return campaign.finding(target, "refused but the model changed", given, raw)
        return campaign.refused(target, exc)
    except Exception as exc:  # noqa: BLE001
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return campaign.finding(target, detail[:200], given, raw)
    tensors = [p for p in model.parameters()]
    if not all(torch.isfinite(p).all() for p in tensors):
        return campaign.finding(target, "loaded an adapter with NaN/Inf", given, raw)
    campaign.record(target, "loaded")


def seed_files(directory: Path) -> tuple[bytes, bytes]:
    """Save the seed adapter into ``directory``; returns its ``(adapter_config.json, safetensors)`` bytes."""
    valid_adapter(directory)
    return (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes()


def write_case(case: Path, config_bytes: bytes, weights_bytes: bytes) -> Path:
    """An adapter directory ``case`` (emptied first) holding exactly these two files."""
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    (case / CONFIG_FILE).write_bytes(config_bytes)
    (case / WEIGHTS_FILE).write_bytes(weights_bytes)
    return case


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
        field = draw(st.sampled_from(FIELDS + list(META_FIELDS) + ["unknown"]))
        if draw(st.booleans()):
            document[field] = draw(values)
        else:
            document.pop(field, None)
    text = json.dumps(document, allow_nan=True).encode()
    if draw(st.integers(0, 9)) == 0:  # raw edits: truncation, random bytes, a 5,000-digit number
        text = draw(st.one_of(st.binary(max_size=64), st.just(text[: draw(st.integers(0, len(text)))]),
                              st.just(text[:-1] + b', "r": ' + b"9" * 5000 + b"}")))
    return text


# ---- atheris engine (coverage-guided; optional: the ``fuzz`` extra) -------------------------------------------------

INSTRUMENTED = ("torch_singlora.adapter_file", "torch_singlora.untrusted", "torch_singlora.model", "torch_singlora.config",
                "torch_singlora.names")


def instrument(atheris: Any, module_names: tuple[str, ...] = INSTRUMENTED) -> int:
    """Add atheris coverage instrumentation to every function and method defined in these (already imported)
    modules; returns how many were instrumented. (``instrument_imports`` only sees modules imported after it.)"""
    seen: set[int] = set()
    for module_name in module_names:
        for obj in list(vars(sys.modules[module_name]).values()):
            members = list(vars(obj).values()) if isinstance(obj, type) and obj.__module__ == module_name else [obj]
            for member in members:
                func = getattr(member, "__func__", member)  # classmethod / staticmethod
                if isinstance(func, types.FunctionType) and func.__module__ == module_name and id(func) not in seen:
                    seen.add(id(func))
                    atheris.instrument_func(func)
    return len(seen)


def _with_header(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def weight_seeds(blob: bytes) -> list[bytes]:
    """The valid safetensors file, the same tensors as F64 (another valid encoding), and structural mutations
    that each stop at a different check."""
    from safetensors.torch import load, save

    header, data = _header(blob)
    as_f64 = save({k: v.double() if v.is_floating_point() else v for k, v in load(blob).items()},
                  metadata=header["__metadata__"])
    key = sorted(k for k in header if k != "__metadata__")[0]

    def edited(change: Callable[[dict[str, Any]], Any]) -> bytes:
        copy = json.loads(json.dumps(header))
        change(copy)
        return _with_header(copy, data)

    (length,) = struct.unpack("<Q", blob[:8])
    return [
        blob, as_f64, blob[:-4], blob + b"\0", struct.pack("<Q", length + 1) + blob[8:],
        edited(lambda h: h[key].update(dtype="F16")), edited(lambda h: h[key].update(shape=h[key]["shape"][::-1])),
        edited(lambda h: h.pop("__metadata__")), edited(lambda h: h.pop(key)),
    ]


def config_seeds(text: bytes) -> list[bytes]:
    """The valid ``adapter_config.json`` and one-field edits of it (some load, some do not fit the weights)."""
    document = json.loads(text)
    edits: list[dict[str, Any]] = [{}, {"r": 1}, {"target_modules": "proj|conv|emb"}, {"rank_pattern": {"conv": 1}},
                                   {"modules_to_save": None}, {"ramp_step": -1}, {"alpha_pattern": {"proj": 2.5}}]
    return [json.dumps({**document, **edit}).encode() for edit in edits] + [text[: len(text) // 2]]


def recast(blob: bytes, dtype: torch.dtype) -> bytes:
    """``blob`` with its floating tensors re-encoded as ``dtype``, if it is a readable safetensors file (else as is)."""
    from safetensors.torch import load, save

    try:
        header, _ = _header(blob)
        tensors = load(blob)
    except Exception:  # noqa: BLE001 - a mutant that safetensors cannot read stays as it is
        return blob
    metadata = header.get("__metadata__")
    return save({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                metadata=metadata if isinstance(metadata, dict) else None)


def _header_length(blob: bytes) -> int | None:
    """The header length a safetensors file declares, if the file holds that many bytes after the prefix."""
    (length,) = struct.unpack("<Q", blob[:8]) if len(blob) >= 8 else (2**64,)
    return length if 8 + length <= len(blob) else None


def safetensors_mutator(atheris: Any, valid: bytes) -> Callable[[bytes, int, int], bytes]:
    """A libFuzzer custom mutator for safetensors files that keeps most mutants well-formed, so that they reach
    the checks past the header. By ``seed``: libFuzzer's own mutation of the whole file (1 in 4), of the header
    JSON only (the length prefix then follows it), of the data section only (its size kept), or one data byte set,
    after re-encoding the tensors as another float dtype half of the time (F64 values beyond float32's range).
    A corpus entry whose length prefix is broken is replaced by the ``valid`` file half of the time (else the
    corpus drifts to inputs that all stop at the first check)."""

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        choice = rng.randrange(4)
        if _header_length(data) is None and rng.random() < 0.5:
            data = valid
        if choice == 3 and rng.random() < 0.5:
            data = recast(data, rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.float32]))
        length = _header_length(data)
        if choice == 0 or length is None:
            return atheris.Mutate(data, max_size)
        header, body = data[8 : 8 + length], data[8 + length :]
        if choice == 1 or not body:
            header = atheris.Mutate(header, max(0, max_size - 8 - len(body)))
        elif choice == 2:
            body = atheris.Mutate(body, len(body)).ljust(len(body), b"\0")
        else:
            position = rng.randrange(len(body))
            body = body[:position] + bytes([rng.randrange(256)]) + body[position + 1 :]
        return struct.pack("<Q", len(header)) + header + body

    return mutate


def write_dictionary(path: Path, blobs: list[bytes]) -> Path:
    """A libFuzzer ``-dict`` file: the JSON strings of the seed files, field names, dtypes and odd numbers."""
    words = FIELDS + list(META_FIELDS) + WORDS + ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "dtype", "shape",
                                            "data_offsets", "__metadata__", "format", "singlora"]
    tokens = {json.dumps(word).encode() for word in words}
    tokens |= {b"null", b"true", b"false", b"NaN", b"-1", b"1e999", b"2147483648", b"18446744073709551616", b"[]"}
    for blob in blobs:
        tokens.update(re.findall(rb'"[^"\\]{1,60}"', blob))
    lines = ['"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token) + '"'
             for token in sorted(tokens)]
    path.write_text("\n".join(lines) + "\n")
    return path


def provided_value(fdp: Any, depth: int = 2) -> Any:
    """One JSON-like value drawn from atheris's ``FuzzedDataProvider``: every scalar type (NaN/Inf, ints of any
    size, module words, text), and lists / dicts while ``depth`` lasts."""
    kind = fdp.ConsumeIntInRange(0, 8 if depth > 0 else 6)
    if kind == 7:
        return [provided_value(fdp, depth - 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 8:
        return {fdp.PickValueInList(WORDS): provided_value(fdp, depth - 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    scalars: list[Callable[[], Any]] = [
        lambda: None, fdp.ConsumeBool, lambda: fdp.ConsumeIntInRange(-3, 20), lambda: fdp.ConsumeInt(9),
        fdp.ConsumeFloat, lambda: fdp.PickValueInList(WORDS), lambda: fdp.ConsumeUnicodeNoSurrogates(12),
    ]
    return scalars[kind]()


def config_from_provider(fdp: Any) -> dict[str, Any]:
    """A config dict from a ``FuzzedDataProvider``: a valid base with up to 4 fields (known or not) set."""
    data: dict[str, Any] = {"r": 2, "target_modules": ["proj"], "ramp_up_steps": 0}
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        data[fdp.PickValueInList(FIELDS + ["unknown"])] = provided_value(fdp)
    return data


def atheris_target(atheris: Any, target: str, campaign: Campaign, case: Path, config_bytes: bytes,
                   weights_bytes: bytes) -> Callable[[bytes], None]:
    """The libFuzzer callback of ``target``: its bytes become the weights file, the config file, or (through a
    ``FuzzedDataProvider``) a config dict, checked by ``check_load`` / ``check_config``."""

    def one_input(data: bytes) -> None:
        if target == "config":
            check_config(campaign, config_from_provider(atheris.FuzzedDataProvider(data)), data)
        elif target == "config_file":
            check_load(campaign, target, write_case(case, data, weights_bytes), data[:300], data)
        else:
            check_load(campaign, target, write_case(case, config_bytes, data), data[:300], data)

    return one_input


def atheris_child(target: str, seconds: int | None, examples: int | None, seed: int, artifacts: Path,
                  result: Path) -> None:
    """Fuzz one target under libFuzzer, which takes this process over and ends it (after ``seconds`` or
    ``examples`` inputs, or at a crash); the campaign goes to ``result`` as JSON every 5 s and at exit. The corpus
    (seeds + what libFuzzer finds) grows in ``artifacts/corpus-<target>``: a later run continues from it."""
    import atheris

    torch.set_num_threads(1)
    instrument(atheris)
    campaign = Campaign(artifacts)
    workdir = Path(tempfile.mkdtemp(prefix="singlora-fuzz-"))
    atexit.register(shutil.rmtree, workdir, True)
    config_bytes, weights_bytes = seed_files(workdir / "seed")
    seeds = {"weights": weight_seeds(weights_bytes), "config_file": config_seeds(config_bytes),
             "config": [bytes(64), bytes(range(256))]}[target]
    corpus = artifacts / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for blob in seeds:
        (corpus / f"seed-{hashlib.sha1(blob).hexdigest()[:12]}").write_bytes(blob)
    check = atheris_target(atheris, target, campaign, workdir / "case", config_bytes, weights_bytes)
    saved = [time.monotonic()]

    def save() -> None:
        atomic_write_text(result, json.dumps(campaign.to_dict()))  # libFuzzer may kill the child mid-write
        saved[0] = time.monotonic()

    def one_input(data: bytes) -> None:
        check(data)
        if time.monotonic() - saved[0] > 5:
            save()

    atexit.register(save)  # libFuzzer's exit runs Python's atexit handlers
    # -len_control=0: mutate whole files from the start (they are structured, not grown byte by byte)
    flags = [f"-seed={seed}", "-timeout=60", "-len_control=0", "-use_value_profile=1",
             f"-max_len={max(4096, 2 * max(map(len, seeds)))}",
             f"-dict={write_dictionary(workdir / 'tokens.dict', [config_bytes, weights_bytes])}",
             f"-artifact_prefix={artifacts}/libfuzzer-{target}-"]
    flags += [f"-max_total_time={seconds}"] if seconds else []
    flags += [f"-atheris_runs={examples}"] if examples else []
    mutator = safetensors_mutator(atheris, weights_bytes) if target == "weights" else None
    atheris.Setup([sys.argv[0], *flags, str(corpus)], one_input, custom_mutator=mutator)
    atheris.Fuzz()


def run_atheris(seconds: int | None = None, examples: int | None = None, seed: int = 0,
                targets: tuple[str, ...] = ATHERIS_TARGETS,
                artifacts: Path = Path(tempfile.gettempdir()) / "singlora-fuzz",
                launcher: tuple[str, ...] = (sys.executable, "-m", "fuzzing")) -> Campaign:
    """Fuzz each target with atheris for ``seconds`` and/or ``examples`` inputs, each in a child process
    (``launcher`` + arguments; libFuzzer ends the process it runs in). A child that dies (a crash, a hang over
    60 s, over 2 GB of memory) is a finding; libFuzzer's log is ``artifacts/<target>-libfuzzer.log``."""
    campaign = Campaign(artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    for target in targets:
        result, log = artifacts / f"{target}-campaign.json", artifacts / f"{target}-libfuzzer.log"
        result.unlink(missing_ok=True)
        command = [*launcher, "--engine", "atheris", "--targets", target, "--seed", str(seed),
                   "--artifacts", str(artifacts), "--child-result", str(result)]
        command += ["--seconds", str(seconds)] if seconds else []
        command += ["--examples", str(examples)] if examples else []
        with log.open("wb") as handle:
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # finds fuzzing/
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}).returncode
        if result.exists():
            campaign.merge(json.loads(result.read_text()))
        if code != 0:
            campaign.finding(target, f"the fuzzing process exited with code {code} (crash, hang or out of memory; "
                             f"libFuzzer's input: {artifacts}/libfuzzer-{target}-*, log: {log})", "")
    return campaign


# ---- runner -----------------------------------------------------------------------------------------------------


def run(examples: int = 200, seed: int = 0, targets: tuple[str, ...] = TARGETS,
        artifacts: Path | None = None) -> Campaign:
    """Run ``examples`` inputs per target (deterministic for a ``seed``); returns the counts and findings (their
    inputs saved under ``artifacts`` when given)."""
    from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings

    strategies = _strategies()
    st, values = strategies["st"], strategies["values"]
    campaign = Campaign(artifacts)
    options = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                       suppress_health_check=list(HealthCheck), phases=("generate",))
    workdir = Path(tempfile.mkdtemp(prefix="singlora-fuzz-"))
    try:
        config_bytes, weights_blob = seed_files(workdir / "seed")
        config_doc = json.loads(config_bytes)
        case = workdir / "case"

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
            check_load(campaign, "config_file", write_case(case, text, weights_blob), text, text)

        @hypothesis_seed(seed)
        @options
        @given(st.data())
        def fuzz_weights(data: Any) -> None:
            blob = mutate_weights(data.draw, st, weights_blob)
            check_load(campaign, "weights", write_case(case, config_bytes, blob), blob[:300], blob)

        more = hypothesis_tests(campaign, st, values, workdir, config_bytes, weights_blob, mutate_config,
                                mutate_weights, write_case)

        def fuzz_more(check: Callable[[Any], None]) -> Callable[[], None]:
            return hypothesis_seed(seed)(options(given(st.data())(check)))

        tests = {"config": fuzz_config, "config_file": fuzz_config_file, "weights": fuzz_weights,
                 **{name: fuzz_more(check) for name, check in more.items()}}
        for name, test in tests.items():
            if name in targets:
                test()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return campaign


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis",
                        help="hypothesis (default; the dev extra) or atheris (coverage-guided; the fuzz extra)")
    parser.add_argument("--examples", type=int, help="inputs per target (hypothesis default 2000)")
    parser.add_argument("--seconds", type=int, help="atheris: seconds per target (default 60 without --examples)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed; libFuzzer seed (0: random)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "singlora-fuzz",
                        help="folder for the inputs of findings (atheris: also its corpus and logs)")
    parser.add_argument("--reasons", type=int, default=0, help="print the N most common refusal messages per target")
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)  # run_atheris's child process
    args = parser.parse_args(argv)
    for name in ("examples", "seconds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    if args.engine == "hypothesis" and args.seconds is not None:
        parser.error("--seconds needs --engine atheris (hypothesis runs --examples inputs)")
    if args.engine == "atheris" and args.seconds is None and args.examples is None:
        args.seconds = 60
    if args.engine == "atheris" and set(args.targets) - set(ATHERIS_TARGETS):
        if args.targets == list(TARGETS):
            args.targets = list(ATHERIS_TARGETS)
        else:
            parser.error(f"--engine atheris fuzzes {ATHERIS_TARGETS}; {MORE_TARGETS} run with hypothesis")
    if args.engine == "atheris" and importlib.util.find_spec("atheris") is None:
        parser.error("--engine atheris needs atheris: pip install 'torch-singlora[fuzz]' (or: pip install atheris)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    torch.set_num_threads(1)
    if args.child_result is not None:
        atheris_child(args.targets[0], args.seconds, args.examples, args.seed, args.artifacts, args.child_result)
        return 0  # not reached: libFuzzer exits the process
    print(f"| target | inputs | loaded | refused | findings | seconds |  ({args.engine}, seed {args.seed})", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    findings = []
    for target in args.targets:  # one row as each target finishes
        start = time.perf_counter()
        if args.engine == "atheris":
            campaign = run_atheris(args.seconds, args.examples, args.seed, (target,), args.artifacts)
        else:
            campaign = run(args.examples or 2000, args.seed, (target,), args.artifacts)
        c = campaign.counts.get(target, {"inputs": 0, "loaded": 0, "refused": 0, "findings": 0})
        print(f"| {target} | {c['inputs']} | {c['loaded']} | {c['refused']} | {c['findings']} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
        findings += campaign.findings
        ranked = sorted(campaign.reasons.get(target, {}).items(), key=lambda item: -item[1])
        for reason, count in ranked[: args.reasons]:
            print(f"|   {count} x {reason} |", flush=True)
    for item in findings:
        saved = f"\n    saved: {item['artifact']}" if "artifact" in item else ""
        print(f"FINDING [{item['target']}] {item['problem']}\n    input: {item['input']}{saved}")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
