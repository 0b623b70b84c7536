"""Adapter files: round trip, documented keys, and clear errors for files that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toy_models import IDS, toy

from torch_singlora import AdapterFileError, SingLoRAConfig, SingLoRAModel, get_singlora_model


def trained(tmp_path: Path, **kwargs) -> tuple[SingLoRAModel, Path]:
    config = SingLoRAConfig(r=3, target_modules=["embed", "up", "down"], modules_to_save=["head"], ramp_up_steps=10, **kwargs)
    adapted = get_singlora_model(toy(), config)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    binding = adapted.bind_optimizer(optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        adapted(IDS).square().sum().backward()
        optimizer.step()
    binding.remove()
    adapted.set_training_run(False)  # the run ends (in it, a training-mode forward would compute step 5)
    adapted.save_adapter(tmp_path / "adapter")
    return adapted, tmp_path / "adapter"


def fresh_base(seed_model: SingLoRAModel) -> torch.nn.Module:
    """A new Toy with the same base weights as the adapted model."""
    base = toy()
    state = {k.replace("base_layer.", "").replace("original_module.", ""): v
             for k, v in seed_model.model.state_dict().items() if "singlora" not in k and "copies" not in k}
    base.load_state_dict(state, strict=True)
    return base


def test_round_trip_is_bitwise_and_restores_step(tmp_path: Path) -> None:
    adapted, directory = trained(tmp_path)
    loaded = SingLoRAModel.from_pretrained(fresh_base(adapted), directory)
    assert loaded.get_ramp_step() == adapted.get_ramp_step() == 4
    for (name, layer), (name2, layer2) in zip(adapted.singlora_layers(), loaded.singlora_layers()):
        assert name == name2 and torch.equal(layer.singlora["default"].A, layer2.singlora["default"].A)
    assert torch.equal(loaded(IDS), adapted(IDS))
    assert not any(p.requires_grad for p in loaded.parameters())  # from_pretrained: inference by default


def test_documented_keys_and_config(tmp_path: Path) -> None:
    adapted, directory = trained(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    assert sorted(tensors) == ["down.singlora_A", "embed.singlora_A", "head.bias", "head.weight", "up.singlora_A"]
    assert tensors["up.singlora_A"].shape == (10, 3) and tensors["embed.singlora_A"].shape == (11, 3)
    document = json.loads((directory / "adapter_config.json").read_text())
    assert document["format"] == "singlora" and document["format_version"] == 1 and document["ramp_step"] == 4
    assert document["r"] == 3 and document["target_modules"] == ["embed", "up", "down"]
    assert not list(directory.glob("*.tmp"))  # atomic writes leave no temp files


def test_remove_stale_temps_only_removes_atomic_write_leftovers(tmp_path: Path) -> None:
    from torch_singlora.atomic import atomic_write, remove_stale_temps

    atomic_write(tmp_path / "kept.json", lambda tmp: Path(tmp).write_text("{}"))
    torn = [tmp_path / ".checkpoint.pt.k3_9xq0a.tmp", tmp_path / ".adapter_model.safetensors.abcdefgh.tmp"]
    others = [tmp_path / ".notes.tmp", tmp_path / "run.tmp", tmp_path / ".x.short.tmp"]
    for path in torn + others:
        path.write_text("partial")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(torn)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kept.json"] + [p.name for p in others])
    assert remove_stale_temps(tmp_path / "missing") == []


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    from torch_singlora import SingLoRAError
    from torch_singlora.atomic import atomic_directory

    out = tmp_path / "merged"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError, match="half-way"):  # a failing writer: the previous folder stays as it was
        with atomic_directory(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("half-way")
    with pytest.raises(SingLoRAError, match="No space"):  # an I/O error becomes our error naming the folder
        with atomic_directory(out) as tmp:
            raise OSError(28, "No space left on device")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and (out / "a.txt").read_text() == "1"
    with atomic_directory(out) as tmp:  # success replaces the folder's content entirely
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in out.iterdir()] == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp or old folders left
    (tmp_path / "file").write_text("x")
    with pytest.raises(SingLoRAError, match="not a folder"):
        with atomic_directory(tmp_path / "file"):
            pass


def test_load_into_second_adapter_slot(tmp_path: Path) -> None:
    adapted, directory = trained(tmp_path)
    expected = adapted(IDS)
    model = get_singlora_model(fresh_base(adapted), SingLoRAConfig(r=2, target_modules=["square"]))
    model.load_adapter(directory, "loaded")
    assert model.active_adapters == ["loaded"]
    assert torch.equal(model(IDS), expected)


def corrupt(directory: Path, edit) -> None:
    path = directory / "adapter_config.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(format_version=99), "format_version=99 is not supported"),
        (lambda d: d.update(format="peft"), "format='peft'"),
        (lambda d: d.update(r=0), "r=0 must be an int >= 1"),
        (lambda d: d.update(r="8"), "r='8'"),
        (lambda d: d.update(bogus=1), r"unknown config field\(s\) \['bogus'\]"),
        (lambda d: d.update(ramp_step=-3), "ramp_step=-3"),
        (lambda d: d.update(r=4), r"singlora_A has shape \(1\d, 3\), the model needs \(1\d, 4\)"),
        (lambda d: d.update(rank_pattern={"up": 2}), r"up.singlora_A has shape \(10, 3\), the model needs \(10, 2\)"),
        (lambda d: d.update(modules_to_save=["nope"]), "modules_to_save entry 'nope' matches no module"),
    ],
)
def test_config_errors_name_file_and_field_and_change_nothing(tmp_path: Path, edit, match: str) -> None:
    adapted, directory = trained(tmp_path)
    corrupt(directory, edit)
    base = fresh_base(adapted)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterFileError, match=match) as info:
        SingLoRAModel.from_pretrained(base, directory)
    assert "adapter_" in str(info.value)  # names the file
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    assert all(type(m).__name__ != "SingLoRALayer" for m in base.modules())


def test_weights_errors(tmp_path: Path) -> None:
    adapted, directory = trained(tmp_path)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["up.singlora_A"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "singlora", "format_version": "1"})
    with pytest.raises(AdapterFileError, match="up.singlora_A contains NaN"):
        SingLoRAModel.from_pretrained(fresh_base(adapted), directory)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors: "):
        SingLoRAModel.from_pretrained(fresh_base(adapted), directory)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match="adapter_config.json: no such file"):
        SingLoRAModel.from_pretrained(fresh_base(adapted), directory)


def test_written_files_and_folders_honour_the_umask(tmp_path: Path) -> None:
    """Atomic writes give the modes an ordinary write gives (0o666 / 0o777 less the umask), not mkstemp's 0600:
    a server running as another user must be able to read a saved adapter or a merged folder."""
    import os
    import stat

    from torch_singlora.atomic import atomic_directory, atomic_write_text

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(0o022)
    try:
        adapted, directory = trained(tmp_path)
        assert {mode(p) for p in directory.iterdir()} == {0o644}
        with atomic_directory(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # as save_pretrained: safetensors makes it 0600
        assert mode(tmp_path / "merged") == 0o755
        assert mode(tmp_path / "merged" / "config.json") == mode(tmp_path / "merged" / "model.safetensors") == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert mode(tmp_path / "private.txt") == 0o600
        os.chmod(directory / "adapter_config.json", 0o640)  # replacing a file keeps its mode, as open(path, "w")
        adapted.save_adapter(directory)
        assert mode(directory / "adapter_config.json") == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("targets", [["up", "down"], ["up", "down", "embed"], "all-linear", None, "(.*)*X", "nope"])
def test_the_files_keys_name_the_adapted_modules_its_patterns_are_metadata(tmp_path: Path, targets) -> None:
    """Loading adapts exactly the modules the tensor keys name, whatever a ``target_modules`` pattern says (it may
    match fewer, more, nothing, or depend on defaults that a later version changes); the config is kept as written."""
    adapted, directory = trained(tmp_path)
    corrupt(directory, lambda d: d.update(target_modules=targets))
    loaded = SingLoRAModel.from_pretrained(fresh_base(adapted), directory)
    assert sorted(name for name, _ in loaded.singlora_layers()) == ["down", "embed", "up"]
    assert torch.equal(loaded(IDS), adapted(IDS)) and loaded.configs["default"].target_modules == targets


@pytest.mark.parametrize("targets, named", [(["up", "nope"], "'nope'"),
                                            (["up", "down", "embed", "square"], "'square'")])
def test_a_file_missing_a_listed_modules_tensor_is_refused(tmp_path: Path, targets, named: str) -> None:
    """Issue 24: a file missing some modules' tensors (209 of 210) loaded without a word. A ``target_modules``
    list (singlora train writes every adapted module's full name) names modules the file must hold."""
    adapted, directory = trained(tmp_path)
    corrupt(directory, lambda d: d.update(target_modules=targets))
    base = fresh_base(adapted)
    with pytest.raises(AdapterFileError, match=f"no tensor for 1 of the {len(targets)} modules .* lists in "
                                               f"target_modules: {named} \\(an incomplete adapter file"):
        SingLoRAModel.from_pretrained(base, directory)
    assert all(type(m).__name__ != "SingLoRALayer" for m in base.modules())


def test_a_key_naming_no_adaptable_module_is_refused(tmp_path: Path) -> None:
    adapted, directory = trained(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    metadata = {"format": "singlora", "format_version": "1"}
    for key, match in [("nope.singlora_A", r"'nope' is not a module \(or expert parameter\) of this model"),
                       ("up.base_layer.singlora_A", "'up.base_layer' is not a module"),
                       (".singlora_A", "'' is not a module"),
                       ("head.singlora_A", "'head' lies inside modules_to_save")]:
        save_file({**tensors, key: torch.zeros(10, 3)}, directory / "adapter_model.safetensors", metadata=metadata)
        base = fresh_base(adapted)
        with pytest.raises(AdapterFileError, match=match):
            SingLoRAModel.from_pretrained(base, directory)
        assert all(type(m).__name__ != "SingLoRALayer" for m in base.modules())


def test_write_errors_however_reported_name_the_file(tmp_path: Path) -> None:
    """A full disk reaches us as an OSError, as torch.save's RuntimeError caused by one, or as safetensors'
    "(os error 28)" message: each is one SingLoRAError naming the file; the previous file stays, no temp left."""
    from safetensors import SafetensorError

    from torch_singlora import SingLoRAError
    from torch_singlora.atomic import atomic_directory, atomic_write

    target = tmp_path / "weights.safetensors"
    target.write_text("previous")

    def full_torch(tmp: str) -> None:
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1114") from exc

    def full_safetensors(tmp: str) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    for writer in (full_torch, full_safetensors):
        with pytest.raises(SingLoRAError, match=f"{target}: cannot write: No space left on device"):
            atomic_write(target, writer)
        assert target.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    with pytest.raises(SingLoRAError, match="merged: cannot write: No space left on device"):
        with atomic_directory(tmp_path / "merged"):
            full_safetensors("")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(KeyError):  # not an I/O error: a bug, raised as is
        atomic_write(target, lambda tmp: {}["x"])


def test_a_nested_write_failure_names_the_folder_not_its_temp(tmp_path: Path) -> None:
    """A folder written through atomic_directory whose files are written by atomic_write (a saved adapter): the
    error names the folder, not the temp folder inside which the file failed."""
    from torch_singlora import SingLoRAError
    from torch_singlora.atomic import atomic_directory, atomic_write

    def full(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(SingLoRAError, match=rf"^{tmp_path / 'adapter'}: cannot write: No space left on device"):
        with atomic_directory(tmp_path / "adapter") as tmp:
            atomic_write(tmp / "adapter_model.safetensors", full)
    with pytest.raises(SingLoRAError, match="not an I/O error"):  # a refusal inside the body stays as it is
        with atomic_directory(tmp_path / "adapter"):
            try:
                raise FileNotFoundError(2, "No such file or directory")
            except FileNotFoundError:
                raise SingLoRAError("not an I/O error") from None
