"""Hostile and broken adapter files are refused with an error naming the file (and key), before tensor data is
read, and the model is left exactly as it was: same modules, same tensors, same ``requires_grad`` flags."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

import torch_singlora.adapter_file as adapter_file
import torch_singlora.untrusted as untrusted
from torch_singlora import AdapterFileError, SingLoRAError
from torch_singlora.adapter_file import CONFIG_FILE, WEIGHTS_FILE
from adapter_fixtures import FuzzModel, fresh_model, same, snapshot, valid_adapter

@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid adapter (Embedding, Linear, Conv1d adapted; a Linear head saved; ramp step 4) to corrupt."""
    valid_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.fixture
def data_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls into safetensors' parser: header-level attacks must be refused before it runs."""
    calls: list[int] = []
    real = untrusted.load_safetensors_bytes

    def counting(blob: bytes) -> dict[str, torch.Tensor]:
        calls.append(len(blob))
        return real(blob)

    monkeypatch.setattr(untrusted, "load_safetensors_bytes", counting)
    return calls


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def refuse(directory: Path, *fragments: str) -> AdapterFileError:
    """Load into a fresh model: must raise AdapterFileError mentioning every fragment; model unchanged."""
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(AdapterFileError) as info:
        model.load_adapter(directory, "new")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert same(before, snapshot(model))
    return info.value


# ---- the weights file: header-level attacks (refused before safetensors parses anything) -----------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _too_short(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00")


def _header_over_cap(path: Path) -> None:
    header, data = read_raw(path)
    write_raw(path, header, data, length=2**60)


def _header_past_end(path: Path) -> None:
    header, data = read_raw(path)
    write_raw(path, header, data, length=len(json.dumps(header)) + len(data) + 100)


def _not_json(path: Path) -> None:
    write_raw(path, b"\xff\xfe{not json", b"")


def _header_is_list(path: Path) -> None:
    write_raw(path, b"[1, 2]", b"")


def _wrong_dtype(path: Path) -> None:  # same byte count, integer dtype
    header, data = read_raw(path)
    header["proj.singlora_A"]["dtype"] = "I32"
    write_raw(path, header, data)


def _unknown_dtype(path: Path) -> None:
    header, data = read_raw(path)
    header["proj.singlora_A"]["dtype"] = "F128"
    write_raw(path, header, data)


def _shape_lies(path: Path) -> None:  # shape bigger than the bytes its offsets span
    header, data = read_raw(path)
    header["proj.singlora_A"]["shape"][1] += 1
    write_raw(path, header, data)


def _huge_shape(path: Path) -> None:  # 2**40 x 8 float32: 32 TiB declared, a few hundred bytes present
    header, data = read_raw(path)
    entry = header["proj.singlora_A"]
    entry["shape"] = [2**40, 8]
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 2**40 * 8 * 4]
    write_raw(path, header, data)


def _negative_shape(path: Path) -> None:
    header, data = read_raw(path)
    header["proj.singlora_A"]["shape"] = [-6, -2]
    write_raw(path, header, data)


def _many_dims(path: Path) -> None:  # 10,000 dims of 2**62: a product with ~620,000 digits if computed
    header, data = read_raw(path)
    header["proj.singlora_A"]["shape"] = [2**62] * 10_000
    write_raw(path, header, data)


def _overlap(path: Path) -> None:  # two tensors read the same bytes
    header, data = read_raw(path)
    header["conv.singlora_A"]["data_offsets"] = list(header["proj.singlora_A"]["data_offsets"])
    header["conv.singlora_A"]["shape"] = list(header["proj.singlora_A"]["shape"])
    write_raw(path, header, data)


def _duplicate_key(path: Path) -> None:
    header, data = read_raw(path)
    text = json.dumps(header)
    entry = json.dumps(header["proj.singlora_A"])
    write_raw(path, (text[:-1] + f', "proj.singlora_A": {entry}}}').encode(), data)


def _bad_metadata(path: Path) -> None:
    header, data = read_raw(path)
    header["__metadata__"] = {"format": 1}
    write_raw(path, header, data)


def _extra_entry_field(path: Path) -> None:
    header, data = read_raw(path)
    header["proj.singlora_A"]["exec"] = "import os"
    write_raw(path, header, data)


HEADER_ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "truncated"),
    "too short": (_too_short, "too short"),
    "header over cap": (_header_over_cap, "limit"),
    "header past end": (_header_past_end, "truncated"),
    "not json": (_not_json, "UTF-8"),
    "header is a list": (_header_is_list, "expected an object"),
    "wrong dtype": (_wrong_dtype, "proj.singlora_A has dtype I32"),
    "unknown dtype": (_unknown_dtype, "'proj.singlora_A': dtype 'F128'"),
    "shape lies": (_shape_lies, "'proj.singlora_A': shape"),
    "huge shape": (_huge_shape, "'proj.singlora_A'"),
    "negative shape": (_negative_shape, "'proj.singlora_A': shape [-6, -2] must be"),
    "overlapping offsets": (_overlap, "gap or overlap"),
    "many dims": (_many_dims, "at most 32 ints"),
    "duplicate key": (_duplicate_key, "duplicate JSON key 'proj.singlora_A'"),
    "bad metadata": (_bad_metadata, "__metadata__"),
    "extra entry field": (_extra_entry_field, "'proj.singlora_A'"),
}


@pytest.mark.parametrize("attack", sorted(HEADER_ATTACKS))
def test_header_attacks_refused_before_reading_data(saved: Path, data_reads: list[int], attack: str) -> None:
    mutate, fragment = HEADER_ATTACKS[attack]
    mutate(saved / WEIGHTS_FILE)
    refuse(saved, str(saved / WEIGHTS_FILE), fragment)
    assert data_reads == []


# ---- the weights file: well-formed but wrong for this model -------------------------------------------------------

def _resave(path: Path, change: Callable[[dict[str, torch.Tensor]], None], metadata: dict[str, str] | None = None) -> None:
    header, _ = read_raw(path)
    tensors = load_bytes(path.read_bytes())
    change(tensors)
    save_file(tensors, str(path), metadata=header.get("__metadata__") if metadata is None else metadata)


CONTENT_ATTACKS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str, bool]] = {
    # name: (change, fragment, whether the data must have been read to detect it)
    "nan": (lambda t: t["proj.singlora_A"].view(-1).__setitem__(0, float("nan")), "proj.singlora_A contains NaN", True),
    "inf": (lambda t: t["head.weight"].view(-1).__setitem__(1, float("inf")), "head.weight contains NaN or Inf", True),
    "extra key": (lambda t: t.__setitem__("evil.singlora_A", torch.zeros(2, 2)), "'evil' is not a module", False),
    "path traversal key": (lambda t: t.__setitem__("../../etc/passwd.singlora_A", torch.zeros(2, 2)), "../../etc", False),
    "wrong rank": (lambda t: t.__setitem__("proj.singlora_A", torch.zeros(6, 3)), "proj.singlora_A has shape (6, 3)", False),
    "int head": (lambda t: t.__setitem__("head.weight", torch.zeros(3, 4, dtype=torch.int64)), "head.weight has dtype I64", False),
}


@pytest.mark.parametrize("attack", sorted(CONTENT_ATTACKS))
def test_content_attacks_refused(saved: Path, data_reads: list[int], attack: str) -> None:
    change, fragment, reads = CONTENT_ATTACKS[attack]
    _resave(saved / WEIGHTS_FILE, change)
    refuse(saved, str(saved / WEIGHTS_FILE), fragment)
    assert bool(data_reads) == reads


def test_metadata_format_required(saved: Path) -> None:
    _resave(saved / WEIGHTS_FILE, lambda t: None, metadata={})
    refuse(saved, str(saved / WEIGHTS_FILE), "metadata format=None")


def test_fp16_and_fp64_A_accepted(saved: Path) -> None:
    """Floating dtypes other than float32 are legitimate (cast on load); the values must arrive intact."""
    _resave(saved / WEIGHTS_FILE, lambda t: t.__setitem__("proj.singlora_A", t["proj.singlora_A"].half()))
    expected = load_bytes((saved / WEIGHTS_FILE).read_bytes())["proj.singlora_A"]
    model = fresh_model()
    model.load_adapter(saved, "new")
    assert torch.equal(model.model.proj.singlora["new"].A.detach(), expected.float())


def test_an_update_beyond_float32_is_refused_by_module(saved: Path, tmp_path: Path) -> None:
    """Issue 24: ``alpha: 1e308`` loaded, and the model then computed Inf (empty answers, exit 0). The update
    ``s * A[:d_out] A[:d_in]^T`` of each module must stay within its dtype's range: refused at load and at export,
    naming the module; the model unchanged."""
    from torch_singlora.export import export_lora

    _edit_config(saved, lambda d: d.update(alpha=1e308))
    refuse(saved, str(saved / WEIGHTS_FILE), "module 'conv'", "beyond the range of torch.float32")
    with pytest.raises(SingLoRAError, match="module 'conv': its scale"):
        export_lora(saved, tmp_path / "lora", base_model=FuzzModel())
    assert not (tmp_path / "lora").exists()
    _edit_config(saved, lambda d: d.update(alpha=4.0, alpha_pattern={"proj": 1e38}))  # s finite, the product not
    _resave(saved / WEIGHTS_FILE, lambda t: t["proj.singlora_A"].mul_(10))  # |A_i|^2 ~ 30: entries ~ 1e39
    refuse(saved, "module 'proj': its update reaches", "(scale 5e+37)")


def test_the_update_range_check_is_exact_past_its_bound() -> None:
    """The norm bound only decides when the dense product is formed: a product within range passes even when the
    bound is over it (B @ A == 0 here, bound 2 * s); one entry over the range is refused."""
    B, s = torch.tensor([[1.0, 1.0]]), 3e38
    untrusted.check_update_range("m", s, B, torch.tensor([[1.0], [-1.0]]), torch.float32)  # 0 everywhere
    with pytest.raises(AdapterFileError, match="m: its update reaches 6e\\+38"):
        untrusted.check_update_range("m", s, B, torch.tensor([[1.0], [1.0]]), torch.float32)
    untrusted.check_update_range("m", 1e300, B, torch.tensor([[1.0], [1.0]]), torch.float64)


# ---- the config file ----------------------------------------------------------------------------------------------

def _edit_config(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / CONFIG_FILE
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


CONFIG_ATTACKS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "r string": (lambda d: d.__setitem__("r", "2"), "r='2'"),
    "r bool": (lambda d: d.__setitem__("r", True), "r=True"),
    "r negative": (lambda d: d.__setitem__("r", -1), "r=-1"),
    "alpha list": (lambda d: d.__setitem__("alpha", [1]), "alpha=[1]"),
    "dropout 2": (lambda d: d.__setitem__("dropout", 2.0), "dropout=2.0"),
    "unknown field": (lambda d: d.__setitem__("__class__", "os.system"), "unknown config field(s) ['__class__']"),
    "format missing": (lambda d: d.pop("format"), "format=None"),
    "format_version true": (lambda d: d.__setitem__("format_version", True), "format_version=True"),
    "format_version 2": (lambda d: d.__setitem__("format_version", 2), "format_version=2"),
    "ramp_step negative": (lambda d: d.__setitem__("ramp_step", -1), "ramp_step=-1"),
    "ramp_step float": (lambda d: d.__setitem__("ramp_step", 1.5), "ramp_step=1.5"),
    "ramp_step huge": (lambda d: d.__setitem__("ramp_step", 2**70), "ramp_step"),
    "base model int": (lambda d: d.__setitem__("base_model_name_or_path", 3), "base_model_name_or_path=3"),
    "backreference target": (lambda d: d.__setitem__("target_modules", "(p)\\1"), "a backreference"),
    "lookahead key": (lambda d: d.__setitem__("alpha_pattern", {"(?=p)proj": 2.0}), "a lookaround"),
    "bad regex key": (lambda d: d.__setitem__("rank_pattern", {"(": 2}), "rank_pattern key '('"),
    "rank too big": (lambda d: d.__setitem__("rank_pattern", {"proj": 99}), "99"),
    "modules_to_save str": (lambda d: d.__setitem__("modules_to_save", "head"), "modules_to_save='head'"),
    "peft config": (lambda d: d.update(format=None, peft_type="LORA"), "load it with peft"),
    # issue 24: export wrote an all-zero LoRA (u = 0) from this file, which every loader refused
    "fractional ramp stepped, total unknown": (lambda d: d.update(ramp_up_steps=0.01, total_steps=None, ramp_step=20),
                                               "ramp_step=20 but ramp_up_steps=0.01 is a fraction of total_steps"),
}


@pytest.mark.parametrize("attack", sorted(CONFIG_ATTACKS))
def test_config_attacks_refused(saved: Path, data_reads: list[int], attack: str) -> None:
    edit, fragment = CONFIG_ATTACKS[attack]
    _edit_config(saved, edit)
    refuse(saved, str(saved / CONFIG_FILE), fragment)
    assert data_reads == []


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"r": NaN}', "JSON constant NaN"),
        ('{"alpha": Infinity}', "JSON constant Infinity"),
        ('{"format": "singlora", "format": "singlora"}', "duplicate JSON key 'format'"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "expected a JSON object"),
        ("\udcff", "UTF-8"),
        ("", "not valid JSON"),
    ],
)
def test_config_text_refused(saved: Path, text: str, fragment: str) -> None:
    (saved / CONFIG_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    refuse(saved, str(saved / CONFIG_FILE), fragment)


def test_config_size_cap(saved: Path) -> None:
    os.truncate(saved / CONFIG_FILE, adapter_file.MAX_CONFIG_BYTES + 1)  # sparse: no disk used
    refuse(saved, str(saved / CONFIG_FILE), "limit")


# ---- file system: special files, symlinks, missing files ---------------------------------------------------------

def test_fifo_and_directory_refused_without_blocking(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    os.mkfifo(saved / WEIGHTS_FILE)  # opening a FIFO for reading would block forever
    refuse(saved, str(saved / WEIGHTS_FILE), "not a regular file")
    (saved / CONFIG_FILE).unlink()
    (saved / CONFIG_FILE).mkdir()
    refuse(saved, str(saved / CONFIG_FILE), "not a regular file")


def test_symlink_to_device_refused_symlink_to_file_loads(saved: Path, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    (saved / WEIGHTS_FILE).rename(blob)
    (saved / WEIGHTS_FILE).symlink_to("/dev/zero")
    refuse(saved, str(saved / WEIGHTS_FILE), "not a regular file")
    (saved / WEIGHTS_FILE).unlink()
    (saved / WEIGHTS_FILE).symlink_to(blob)  # how the Hugging Face cache stores files
    model = fresh_model()
    model.load_adapter(saved, "new")
    assert model.get_ramp_step("new") == 4


def test_missing_directory_and_files(saved: Path, tmp_path: Path) -> None:
    refuse(tmp_path / "nope", str(tmp_path / "nope"), "not a directory")
    (saved / WEIGHTS_FILE).unlink()
    refuse(saved, str(saved / WEIGHTS_FILE), "no such file")


# ---- pickles are never opened ------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof of code execution if the file appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_pickled_weights_never_opened(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    torch.save({"proj.singlora_A": _Payload(str(marker))}, saved / "adapter_model.bin")

    def no_unpickling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    # Beside a safetensors file: the pickle is ignored and the safetensors file loads.
    model = fresh_model()
    model.load_adapter(saved, "new")
    # Alone: refused, with the safe conversion command.
    (saved / WEIGHTS_FILE).unlink()
    error = refuse(saved, "adapter_model.bin", "never loads", "weights_only=True", "save_file")
    assert "arbitrary code" in str(error)
    assert not marker.exists()


def test_pickle_conversion_hint_works(saved: Path) -> None:
    """The command the error suggests turns a (weights-only) pickle into a loadable adapter."""
    tensors = load_bytes((saved / WEIGHTS_FILE).read_bytes())
    (saved / WEIGHTS_FILE).unlink()
    torch.save(tensors, saved / "adapter.pt")
    with pytest.raises(AdapterFileError) as info:
        fresh_model().load_adapter(saved, "new")
    command = str(info.value).split('python -c "', 1)[1].split('" (keys', 1)[0]
    cwd = os.getcwd()
    try:
        os.chdir(saved)
        exec(command, {})  # the suggested one-liner, run as a user would
    finally:
        os.chdir(cwd)
    model = fresh_model()
    model.load_adapter(saved, "new")
    assert torch.equal(model.model.proj.singlora["new"].A.detach(), tensors["proj.singlora_A"])


# ---- no partial injection -----------------------------------------------------------------------------------------

def test_failure_after_injection_rolls_back(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fresh_model()
    before = snapshot(model)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(model, "set_ramp_step", fail)
    with pytest.raises(RuntimeError, match="disk vanished"):
        model.load_adapter(saved, "new")
    assert same(before, snapshot(model))


def test_existing_name_refused_and_good_load_matches(saved: Path) -> None:
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(SingLoRAError, match="'keep' already exists"):
        model.load_adapter(saved, "keep")
    assert same(before, snapshot(model))
    model.load_adapter(saved, "new")
    assert model.get_ramp_step("new") == 4 and model.get_ramp_step("keep") == 0
    stored = load_bytes((saved / WEIGHTS_FILE).read_bytes())
    for key, value in model.adapter_state_dict("new").items():
        assert torch.equal(value, stored[key]), key


def test_file_swapped_after_header_check(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file replaced between the header check and the data read (another process) is caught, not copied."""
    path = saved / WEIGHTS_FILE
    real = adapter_file.read_safetensors_header

    def check_then_swap(target: Path) -> Any:
        result = real(target)
        _resave(path, lambda t: t.__setitem__("proj.singlora_A", torch.zeros(6, 3)))
        return result

    monkeypatch.setattr(adapter_file, "read_safetensors_header", check_then_swap)
    refuse(saved, str(path), "changed while being read")


@pytest.mark.parametrize("attack", ["huge shape", "overlapping offsets", "header over cap"])
def test_model_free_readers_check_the_header_first(saved: Path, data_reads: list[int], attack: str) -> None:
    """``singlora inspect`` and the converters read adapters without a model: same header checks, no data read."""
    from torch_singlora.inspection import inspect_adapter

    HEADER_ATTACKS[attack][0](saved / WEIGHTS_FILE)
    with pytest.raises(AdapterFileError, match=str(saved / WEIGHTS_FILE)):
        inspect_adapter(str(saved))
    with pytest.raises(AdapterFileError, match=str(saved / WEIGHTS_FILE)):
        untrusted.read_safetensors_file(saved / WEIGHTS_FILE)
    assert data_reads == []
