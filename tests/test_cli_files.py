"""``singlora merge / export / inspect`` on hostile or precious folders: nothing a user owns is lost, every file a
loader refuses is refused (exit 2, one line), and nothing from a file reaches the terminal raw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import minilm_path, save_tiny_bert

transformers = pytest.importorskip("transformers")

from torch_singlora import SingLoRAConfig, get_singlora_model  # noqa: E402
from torch_singlora.cli import main  # noqa: E402
from torch_singlora.train.run_folder import write_run_info  # noqa: E402

LABELS = ["sport", "tech"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `singlora train` leaves it (adapter + run_info.json, checkpoint, metrics), made directly."""
    root = tmp_path_factory.mktemp("files")
    save_tiny_bert(root / "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   max_position_embeddings=64)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(root / "bert")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(root / "bert", num_labels=2)
    model = get_singlora_model(base, SingLoRAConfig(r=2, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"], ramp_up_steps=0))
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_()
    out = root / "run"
    model.save_adapter(out / "adapter")
    write_run_info(out / "adapter", {
        "task": "classification", "method": "singlora", "base_model": str(root / "bert"),
        "tokenizer": str(root / "bert"), "labels": LABELS, "max_length": 16, "text_column": "text",
        "label_column": "label", "target_modules": [n for n, _ in model.singlora_layers()]})
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
        (out / name).write_text("precious")
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_and_export_never_destroy_what_is_there(run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Issue 11: `merge ADAPTER OUT` emptied OUT and exited 0; `export A A` overwrote its own source."""
    adapter = run / "adapter"
    before = _tree(run)
    cases = [["merge", str(adapter), str(run)],  # the run folder: holds the input
             ["merge", str(adapter), str(run), "--overwrite"],  # even with --overwrite
             ["export", str(adapter), str(adapter)], ["export", str(adapter), str(adapter) + "/", "--overwrite"],
             ["export", str(adapter), str(run / "adapter" / ".." / "adapter")],
             ["merge", str(adapter), str(run.parent / "bert")]]  # the base model folder
    for argv in cases:
        assert main(argv) == 2, argv
        assert "holds this command's input" in capsys.readouterr().err, argv
    other = tmp_path / "models"
    (other / "llama").mkdir(parents=True)
    (other / "llama" / "model.safetensors").write_text("someone else's model")
    for command in ("merge", "export"):
        assert main([command, str(adapter), str(other), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert "not empty" in error and "llama/model.safetensors" in error and "--overwrite" in error
    assert _tree(run) == before and (other / "llama" / "model.safetensors").read_text() == "someone else's model"
    # a new folder works; rerunning into the command's own output replaces it; --overwrite replaces anything
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--quiet"]) == 0
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--quiet"]) == 0
    assert main(["export", str(adapter), str(tmp_path / "lora"), "--quiet"]) == 0
    assert main(["export", str(adapter), str(tmp_path / "lora"), "--quiet"]) == 0
    assert main(["export", str(adapter), str(other), "--quiet", "--overwrite"]) == 0
    assert not (other / "llama").exists() and (other / "adapter_model.safetensors").is_file()
    assert _tree(run) == before


def test_merge_quiet_prints_nothing(run: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert main(["merge", str(run / "adapter"), str(tmp_path / "merged"), "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def _bad_copy(run: Path, tmp_path: Path, change) -> Path:
    """A copy of the run's adapter folder with its weights changed by ``change(tensors)``."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("adapter_config.json", "run_info.json"):
        (folder / name).write_bytes((run / "adapter" / name).read_bytes())
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "singlora", "format_version": "1"})
    return folder


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t.__setitem__("classifier.weight", t["classifier.weight"] > 0), "classifier.weight has dtype BOOL"),
    (lambda t: t.__setitem__("classifier.bias", torch.full_like(t["classifier.bias"], 1e300, dtype=torch.float64)),
     "beyond the range of torch.float32"),
])
def test_export_validates_exactly_as_load(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change,
                                          fragment: str) -> None:
    """Issue 11: export wrote PEFT files from adapters every loader refuses (PEFT then loaded 1e300 as inf)."""
    folder = _bad_copy(run, tmp_path, change)
    assert main(["export", str(folder), str(tmp_path / "lora")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()
