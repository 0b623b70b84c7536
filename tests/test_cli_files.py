"""``singlora merge / export / inspect`` on hostile or precious folders: nothing a user owns is lost, every file a
loader refuses is refused (exit 2, one line), and nothing from a file reaches the terminal raw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import minilm_path, save_tiny_bert

transformers = pytest.importorskip("transformers")

from torch_singlora import SingLoRAConfig, get_singlora_model  # noqa: E402
from torch_singlora.cli import main  # noqa: E402
from torch_singlora.runs import write_run_info  # noqa: E402

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
        assert re.search(r"(is|holds) this command's (adapter|base model)", capsys.readouterr().err), argv
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


def test_no_output_destroys_an_input_even_with_overwrite(run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Issue 24: `evaluate --data D.csv --output D.csv --overwrite` replaced the data; `train --train-data
    OUT/metrics.jsonl --output-dir OUT --overwrite` deleted the training file; `train --model M --output-dir M
    --overwrite` wrote a run into the model folder and deleted its summary.json; `report --plot` could replace the
    summary it reads."""
    data = tmp_path / "D.csv"
    data.write_text("text,label\nthe match ended level,sport\na new phone chip,tech\n")
    model = tmp_path / "M"
    model.mkdir()
    for file in (run.parent / "bert").iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    (model / "summary.json").write_text("the model card's numbers")
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "metrics.jsonl").write_text(data.read_text())
    (out / "summary.json").write_text("a previous run")
    cases = {
        ("evaluate", str(run / "adapter"), "--data", str(data), "--output", str(data), "--overwrite"):
            f"--output {data} is this command's --data",
        ("evaluate", str(run / "adapter"), "--data", str(data), "--output", str(run / "adapter" / "x.json")):
            "lies inside this command's adapter folder",
        ("train", "--model", str(model), "--train-data", str(out / "metrics.jsonl"), "--output-dir", str(out),
         "--overwrite"): f"run file {out / 'metrics.jsonl'} is this command's --train-data",
        ("train", "--model", str(model), "--train-data", str(data), "--output-dir", str(model), "--overwrite"):
            f"--output-dir {model} is this command's --model",
        ("train", "--model", str(model), "--train-data", str(tmp_path), "--output-dir", str(out / "run"),
         "--resume"): f"--output-dir {out / 'run'} lies inside this command's --train-data",
        ("report", str(run), "--plot", str(run / "summary.json"), "--overwrite"): "is this command's input",
    }
    before = {folder: _tree(folder) for folder in (tmp_path, run)}
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {folder: _tree(folder) for folder in (tmp_path, run)} == before


def test_merge_and_evaluate_quiet_print_nothing(run: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert main(["merge", str(run / "adapter"), str(tmp_path / "merged"), "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    data = tmp_path / "test.csv"
    data.write_text("text,label\nthe match ended level,sport\na new phone chip,tech\n")
    assert main(["evaluate", str(run / "adapter"), "--data", str(data), "--quiet", "--output",
                 str(tmp_path / "metrics.json")]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    assert json.loads((tmp_path / "metrics.json").read_text())["examples"] == 2


def test_merge_and_export_print_their_result_line_and_no_loading_bar(run: Path, tmp_path: Path,
                                                                     capfd: pytest.CaptureFixture) -> None:
    """Issue 24: merge showed transformers' "Loading weights" and "Writing model shards" bars by default."""
    assert main(["merge", str(run / "adapter"), str(tmp_path / "merged")]) == 0
    assert capfd.readouterr() == (f"merged model written to {tmp_path / 'merged'}\n", "")
    assert main(["export", str(run / "adapter"), str(tmp_path / "lora")]) == 0
    out, err = capfd.readouterr()
    assert out == f"plain LoRA (peft) written to {tmp_path / 'lora' / 'adapter_model.safetensors'}\n" and err == ""


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


def _weights(folder: Path, change) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "singlora", "format_version": "1"})


def _inspect_copy(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((run / "adapter" / name).read_bytes())
    return folder


@pytest.mark.parametrize("change, fragment", [
    (lambda t: t.__setitem__("bert.encoder.layer.0.attention.self.query.singlora_A", torch.ones(64)), "shape [64]"),
    (lambda t: t.__setitem__("x.singlora_A", torch.ones(1, 20_000)), "x.singlora_A has shape [1, 20000]"),  # 80 KB
    (lambda t: t["classifier.weight"].view(-1).__setitem__(0, float("nan")), "classifier.weight contains NaN"),
    (lambda t: t.__setitem__("pooler.dense.weight", torch.ones(2)), "pooler.dense.weight is neither"),
    (lambda t: t.clear() or t.__setitem__("classifier.bias", torch.ones(2)), "no <module>.singlora_A tensor"),
])
def test_inspect_refuses_what_loaders_refuse(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change,
                                             fragment: str) -> None:
    """Issue 11: inspect ran out of memory on an 80 KB tensor (a 20,000 x 20,000 Gram matrix), crashed with a
    traceback on a 1-D tensor and exited 0 on files every loader refuses."""
    folder = _inspect_copy(run, tmp_path)
    _weights(folder, change)
    assert main(["inspect", str(folder)]) == 2
    error = capsys.readouterr().err
    assert fragment in error and "Traceback" not in error, error


def test_inspect_escapes_file_text_and_wraps_read_errors(run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    folder = _inspect_copy(run, tmp_path)
    evil = "\x1b[2J\x1b[Hall clear\r\n"
    document = json.loads((folder / "adapter_config.json").read_text())
    document.update(base_model_name_or_path=evil, target_modules=[f"layer_{i}.q_proj" for i in range(210)])
    (folder / "adapter_config.json").write_text(json.dumps(document))
    _weights(folder, lambda t: t.__setitem__(f"{evil}.singlora_A", torch.ones(4, 2)))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\\x1b[2J" in out
    assert max(len(line) for line in out.splitlines()) < 200  # 210 names are summarised, not printed on one line
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base_model_name_or_path"] == evil  # JSON escapes it itself
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to("/proc/self/mem")  # a "regular file" that fails to read
    assert main(["inspect", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "cannot read" in error and "Traceback" not in error, error


INSPECT_BIG = """
import re, sys
from torch_singlora.cli import main
code = main(["inspect", sys.argv[1]])
peak_kib = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)  # this process only
print(code, int(peak_kib) // 1024)
"""


def test_inspect_memory_stays_small_on_a_big_tensor(run: Path, tmp_path: Path) -> None:
    """A 200 MB tensor (a sparse file): read block by block, so the peak (torch included) stays below the tensor's
    size in float64, 400 MB (the old reader held the file, its tensors and their float64 copies)."""
    import struct
    import subprocess
    import sys

    folder = _inspect_copy(run, tmp_path)
    rows = 25_000_000
    header = json.dumps({"__metadata__": {"format": "singlora", "format_version": "1"},
                         "big.singlora_A": {"dtype": "F32", "shape": [rows, 2], "data_offsets": [0, rows * 8]}})
    path = folder / "adapter_model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode())
    os_size = 8 + len(header) + rows * 8
    with open(path, "r+b") as handle:
        handle.truncate(os_size)  # sparse: zeros, no disk used
    result = subprocess.run([sys.executable, "-c", INSPECT_BIG, str(folder)], capture_output=True, text=True,
                            timeout=300)
    code, peak_mib = map(int, result.stdout.split()[-2:])
    assert code == 0 and peak_mib < 600, (result.stdout[-500:], result.stderr[-500:])
