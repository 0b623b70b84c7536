"""``singlora`` CLI on tiny random transformers models and tiny generated datasets: train, resume after SIGKILL,
evaluate, merge, inspect, report, errors. References are computed here from the saved files."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close, ctrl_c_after_step, minilm_path, save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch_singlora import SingLoRAModel  # noqa: E402
from torch_singlora.cli import main  # noqa: E402

WORDS = {"sport": ["goal", "match", "team", "player", "league"], "tech": ["computer", "software", "chip", "internet"],
         "music": ["song", "album", "band", "guitar"]}


def _examples(n: int, seed: int, labels: tuple[str, ...] = tuple(WORDS)) -> list[dict[str, str]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        picks = torch.randint(len(WORDS[label]), (6,), generator=generator).tolist()
        rows.append({"text": " ".join(WORDS[label][p] for p in picks), "label": label})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier base and a tiny Llama LM (both with the MiniLM WordPiece tokenizer) + datasets."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_bert(root / "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   max_position_embeddings=64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    llama = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=64)
    transformers.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    paths = {"root": root, "bert": root / "bert", "llama": root / "llama"}
    paths["train"] = _write_jsonl(root / "train.jsonl", _examples(48, seed=1))
    paths["eval"] = _write_jsonl(root / "eval.jsonl", _examples(15, seed=2))
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "category"])
        writer.writeheader()
        writer.writerows({"sentence": r["text"], "category": r["label"]} for r in _examples(24, seed=3))
    paths["csv"] = root / "train.csv"
    folder = root / "folder"
    for i, row in enumerate(_examples(24, seed=4)):
        (folder / row["label"]).mkdir(parents=True, exist_ok=True)
        (folder / row["label"] / f"{i:03d}.txt").write_bytes(row["text"].encode("latin-1") + " caf\xe9".encode("latin-1"))
    paths["folder"] = folder
    lm = root / "lm"
    lm.mkdir()
    for i in range(3):
        (lm / f"doc{i}.txt").write_text(" ".join(w for ws in WORDS.values() for w in ws) * 4)
    paths["lm"] = lm
    return paths


def _train(assets: dict[str, Path], out: Path, *extra: str) -> dict:
    args = ["train", "--model", str(assets["bert"]), "--train-data", str(assets["train"]), "--eval-data",
            str(assets["eval"]), "--output-dir", str(out), "--quiet", "--batch-size", "8", "--lr", "5e-3",
            "--target-modules", "query,value", "--save-every", "0", *extra]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def _logits(model: torch.nn.Module, texts: list[str], tokenizer_path: Path) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _reference_model(assets: dict[str, Path], adapter: Path) -> SingLoRAModel:
    info = json.loads((adapter / "run_info.json").read_text())
    labels = info["labels"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        assets["bert"], num_labels=len(labels), id2label=dict(enumerate(labels)))
    return SingLoRAModel.from_pretrained(base, adapter)


def test_train_evaluate_merge_inspect(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    summary = _train(assets, out, "--max-steps", "6", "--ramp-up", "4", "--eval-every", "3")
    # metrics log: one train record per optimizer step; u follows min(t / T, 1) with T = 4 optimizer steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["u"] for r in train] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert (out / "curves.png").stat().st_size > 1000
    # adapter file: query/value of 2 layers, A is (32, 8); classifier saved; ramp step saved
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["ramp_step"] == 6 and config["modules_to_save"] == ["classifier"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    a_keys = [k for k in tensors if k.endswith("singlora_A")]
    assert len(a_keys) == 4 and all(tensors[k].shape == (32, 8) for k in a_keys)
    assert summary["adapter_params"] == 4 * 32 * 8
    assert summary["trainable_params"] == 4 * 32 * 8 + 32 * 3 + 3

    # evaluate == accuracy recomputed here from the saved adapter (and == the final eval of training)
    reference = _reference_model(assets, adapter)
    rows = [json.loads(line) for line in assets["eval"].read_text().splitlines()]
    logits = _logits(reference, [r["text"] for r in rows], assets["bert"])
    labels = json.loads((adapter / "run_info.json").read_text())["labels"]
    gold = torch.tensor([labels.index(r["label"]) for r in rows])
    expected = (logits.argmax(-1) == gold).double().mean().item()
    capsys.readouterr()
    assert main(["evaluate", str(adapter), "--data", str(assets["eval"]), "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert summary["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert metrics["examples"] == len(rows) and 0.0 <= metrics["macro_f1"] <= 1.0

    # merge: a plain transformers folder with the same logits as base + adapter
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--quiet"]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("singlora" in n for n, _ in merged.named_parameters())
    assert_close(_logits(merged, [r["text"] for r in rows], tmp_path / "merged"), logits)

    # inspect: numbers recomputed from the file
    capsys.readouterr()
    assert main(["inspect", str(adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ramp_step"] == 6 and report["ramp_up_steps"] == 4 and report["u"] == 1.0
    assert report["parameters"] == sum(t.numel() for t in tensors.values())
    key = a_keys[0]
    A = tensors[key].double()
    module = report["modules"][key.removesuffix(".singlora_A")]
    assert module["shape"] == [32, 8]
    assert module["norm_A"] == pytest.approx(A.norm().item(), rel=1e-12)
    assert module["norm_update"] == pytest.approx((A @ A.T).norm().item(), rel=1e-9)  # s = 8/8, u = 1
    assert main(["inspect", str(adapter)]) == 0
    assert "u = 1.0000" in capsys.readouterr().out


def test_resume_after_sigkill_gives_the_same_adapter(assets: dict[str, Path], tmp_path: Path) -> None:
    """Kill a run (SIGKILL) right after a checkpoint, resume it: the adapter equals an uninterrupted run bitwise."""
    common = ["--max-steps", "24", "--grad-accum", "2", "--batch-size", "4", "--adapter-dropout", "0.1",
              "--ramp-up", "0.25", "--eval-every", "0"]
    args = ["train", "--model", str(assets["bert"]), "--train-data", str(assets["train"]), "--eval-data",
            str(assets["eval"]), "--lr", "5e-3", "--target-modules", "query,value", "--save-every", "5",
            "--quiet", "--output-dir", str(tmp_path / "killed"), *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-m", "torch_singlora.cli", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 5 <= killed_at < 24 and killed_at % 5 == 0
    assert not (tmp_path / "killed" / "adapter").exists()

    assert main(args + ["--resume"]) == 0
    uninterrupted = tmp_path / "straight"
    assert main([*args[:-len(common) - 2], "--output-dir", str(uninterrupted), *common]) == 0
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    straight = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [s for s in range(1, 25)] + [24]  # no duplicates; + the final eval
    # u counts optimizer steps, not micro-batches (grad-accum 2): T = 0.25 * 24 = 6 steps
    assert [r["u"] for r in records[:24]] == [min(t / 6, 1.0) for t in range(1, 25)]
    for run in (tmp_path / "killed", uninterrupted):
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["ramp_step"] == 24


def test_torchrun_two_processes_equal_one_process_on_the_global_batch(assets: dict[str, Path], tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` on CPU (accelerate, DDP over gloo), 8 examples per process, gives the adapter
    of one process with batches of 16: the two ranks see consecutive halves of each global batch (dropout off)."""
    bert = tmp_path / "bert"
    save_tiny_bert(bert, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args = ["train", "--model", str(bert), "--train-data", str(assets["train"]), "--eval-data", str(assets["eval"]),
            "--quiet", "--lr", "5e-3", "--target-modules", "query,value", "--save-every", "0", "--max-steps", "6",
            "--ramp-up", "4", "--no-plot"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "torch_singlora.cli", *args, "--batch-size", "8", "--output-dir", str(tmp_path / "ddp")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--batch-size", "16", "--output-dir", str(tmp_path / "one")]) == 0
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys() and sum(k.endswith("singlora_A") for k in ddp) == 4
    for key in one:
        assert_close(ddp[key], one[key])
    config = json.loads((tmp_path / "ddp" / "adapter" / "adapter_config.json").read_text())
    assert config["ramp_step"] == 6  # optimizer steps, counted once, not once per process
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()[:6]]
              for run in ("ddp", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # rank 0 logs the mean over both processes


def test_csv_folder_and_peft_methods(assets: dict[str, Path], tmp_path: Path) -> None:
    """CSV columns by name, a latin-1 class-folder dataset, and LoRA / DoRA / LoRA+ / full on the same targets."""
    summary = _train(assets, tmp_path / "csv", "--max-steps", "2", "--train-data", str(assets["csv"]),
                     "--eval-data", str(assets["csv"]), "--text-column", "sentence", "--label-column", "category")
    assert summary["steps"] == 2
    summary = _train(assets, tmp_path / "folder", "--max-steps", "2", "--train-data", str(assets["folder"]),
                     "--eval-data", str(assets["folder"]), "--gradient-checkpointing", "--grad-accum", "2",
                     "--ramp-up", "2")
    u = [json.loads(line)["u"] for line in (tmp_path / "folder" / "metrics.jsonl").read_text().splitlines()[:2]]
    assert u == [0.5, 1.0]  # recomputed forwards do not advance the ramp: it counts optimizer steps
    assert summary["task"] == "classification"
    lora_params = 4 * (32 + 32) * 8  # query/value of 2 layers: (d_in + d_out) * r
    for method, adapter_params in (("lora", lora_params), ("dora", lora_params + 4 * 32), ("loraplus", lora_params)):
        summary = _train(assets, tmp_path / method, "--max-steps", "2", "--method", method)
        assert summary["adapter_params"] == adapter_params, method
        info = json.loads((tmp_path / method / "adapter" / "run_info.json").read_text())
        assert info["target_modules"] == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1)
                                          for m in ("query", "value")]
        assert main(["evaluate", str(tmp_path / method / "adapter"), "--data", str(assets["eval"]), "--quiet"]) == 0
    summary = _train(assets, tmp_path / "full", "--max-steps", "1", "--method", "full")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(assets["bert"], num_labels=3)
    assert summary["trainable_params"] == sum(p.numel() for p in base.parameters())
    assert main(["evaluate", str(tmp_path / "full" / "adapter"), "--data", str(assets["eval"]),
                 "--output", str(tmp_path / "full.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "full.json").read_text())["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-12)


def test_every_step_trains_and_the_log_says_what_each_step_ran_at(assets: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """Issue 24: step 1 ran at u = 0 (and at lr 0 under the warm-up), so a 1-step run saved its initial A
    whatever --lr; metrics.jsonl logged each step with the next step's lr and u; a run ending inside its ramp said
    nothing. Now step k runs at lr * k / W and u = k / T, as logged, and such a run says so."""
    singles = []
    for lr in ("1e-3", "5e-3"):
        _train(assets, tmp_path / f"one_{lr}", "--max-steps", "1", "--lr", lr)
        singles.append(load_file(tmp_path / f"one_{lr}" / "adapter" / "adapter_model.safetensors"))
    keys = [k for k in singles[0] if k.endswith("singlora_A")]
    assert keys and all(not torch.equal(singles[0][k], singles[1][k]) for k in keys)  # step 1 moved A
    argv = ["train", "--model", str(assets["bert"]), "--train-data", str(assets["train"]), "--output-dir",
            str(tmp_path / "short"), "--batch-size", "8", "--lr", "4e-3", "--target-modules", "query,value",
            "--save-every", "0", "--max-steps", "3", "--warmup", "2", "--ramp-up-steps", "4", "--no-plot"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: the ramp (T = 4 steps, --ramp-up-steps) is longer than the run (3 steps): u reaches 0.75" in err
    logged = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["lr"], r["u"]) for r in logged if r["kind"] == "train"]
    total, warmup = 3, 2  # linear: k / W during the warm-up, then (total - k + 1) / (total - W)
    expected = [(k, 4e-3 * (k / warmup if k <= warmup else (total - k + 1) / (total - warmup)), k / 4)
                for k in range(1, 4)]
    assert [s for s, _, _ in steps] == [1, 2, 3]
    for (_, lr, u), (_, lr_ref, u_ref) in zip(steps, expected):
        assert lr == pytest.approx(lr_ref) and u == pytest.approx(u_ref)


def test_causal_lm_train_and_evaluate(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "lm"
    args = ["train", "--task", "causal-lm", "--model", str(assets["llama"]), "--train-data", str(assets["lm"]),
            "--eval-split", "0.25", "--output-dir", str(out), "--max-length", "16", "--batch-size", "4",
            "--max-steps", "3", "--quiet", "--save-every", "0", "--lr", "1e-2"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perplexity"] == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-9)
    assert summary["adapted_modules"] == 4  # default targets for llama: q_proj, v_proj of 2 layers
    capsys.readouterr()
    assert main(["evaluate", str(out / "adapter"), "--data", str(assets["lm"])]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)
    assert metrics["eval_loss"] > 0 and metrics["examples"] >= 1


def test_report_and_export(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _train(assets, tmp_path / "a", "--max-steps", "2", "--name", "first")
    _train(assets, tmp_path / "b", "--max-steps", "2", "--method", "lora", "--name", "second")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "both.png")]) == 0
    table = capsys.readouterr().out
    assert "| first " in table and "| second " in table and "accuracy" in table
    assert (tmp_path / "both.png").stat().st_size > 1000
    # an output file the user has is replaced only with --overwrite (report --plot, evaluate --output)
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    evaluate = ["evaluate", str(tmp_path / "a" / "adapter"), "--data", str(assets["eval"]), "--output", str(notes)]
    for command in (["report", str(tmp_path / "a"), "--plot", str(notes)], evaluate):
        assert main(command) == 2
        assert f"{str(notes)!r} exists; --overwrite replaces it" in capsys.readouterr().err
        assert notes.read_text() == "mine"
    assert main(["report", str(tmp_path / "a"), "--plot", str(notes), "--overwrite"]) == 0
    assert notes.read_bytes().startswith(b"\x89PNG")
    pytest.importorskip("torch_singlora.export")
    assert main(["export", str(tmp_path / "a" / "adapter"), str(tmp_path / "lora"), "--quiet"]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("change, message", [
    ({"--model": "{root}/nope"}, "--model '{root}/nope': no such folder"),
    ({"--model": "{root}/no_weights"}, "--model '{root}/no_weights': no weights (expected one of model.safetensors"),
    ({"--train-data": "{root}/missing.jsonl"}, "missing.jsonl"),
    ({"--text-column": "body"}, "no column 'body' (--text-column)"),
    ({"--train-data": "{root}/empty.jsonl"}, "empty dataset"),
    ({"--eval-data": "{root}/other_labels.jsonl"}, "label set mismatch"),
    ({"--target-modules": "qkv_proj"}, "'qkv_proj' matches no module"),
    ({"--target-modules": "re:.*nothing.*"}, "matches no module"),
    ({"--ramp-up": "soon"}, "--ramp-up-steps='soon'"),
    # data checks: nothing is stringified or trained as a class "None" / ""
    ({"--train-data": "{root}/missing_label.csv"}, "missing_label.csv row 2 (line 3): 1 cells, the header has 2"),
    ({"--train-data": "{root}/empty_label.csv"}, "empty_label.csv row 3 (line 4): column 'label' (--label-column) "
                                                 "is empty"),
    ({"--train-data": "{root}/list_text.jsonl"}, 'list_text.jsonl line 2: column \'text\' (--text-column) must be '
                                                 'a string, got list ["goal", "match"]'),
    ({"--train-data": "{root}/null_text.jsonl"}, "null_text.jsonl line 1: column 'text' (--text-column) has no "
                                                 "value"),
    ({"--eval-data": "{root}/dict_label.jsonl"}, "dict_label.jsonl line 2: column 'label' (--label-column) must be "
                                                 "a string or an integer, got dict"),
    ({"--train-data": "{root}/unlabelled.jsonl"}, "has no column 'label' (--label-column); columns are ['text'] "
                                                  "(text without labels: --task causal-lm trains a language model"),
    ({"--precision": "fp16"}, "--precision fp16 needs a CUDA GPU"),
])
def test_errors_name_the_problem(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                 change: dict[str, str], message: str) -> None:
    root = assets["root"]
    (root / "empty.jsonl").write_text("")
    _write_jsonl(root / "other_labels.jsonl", _examples(4, seed=5) + [{"text": "x", "label": "weather"}])
    (root / "no_weights").mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (root / "no_weights" / name).write_bytes((assets["bert"] / name).read_bytes())
    (root / "missing_label.csv").write_text("text,label\ngoal match,sport\nchip computer\nsong band,music\n")
    (root / "empty_label.csv").write_text("text,label\ngoal match,sport\nsong band,music\nchip computer,\n")
    _write_jsonl(root / "list_text.jsonl", [{"text": "chip", "label": "tech"}, {"text": ["goal", "match"],
                                                                                "label": "sport"}])
    (root / "null_text.jsonl").write_text('{"text": null, "label": "tech"}\n')
    _write_jsonl(root / "dict_label.jsonl", [{"text": "chip", "label": "tech"}, {"text": "goal", "label": {"a": 1}}])
    _write_jsonl(root / "unlabelled.jsonl", [{"text": "goal match"}, {"text": "chip computer"}])
    args = {"--model": str(assets["bert"]), "--train-data": str(assets["train"]), "--eval-data": str(assets["eval"]),
            "--output-dir": str(tmp_path / "out"), "--max-steps": "1", "--target-modules": "query"}
    args.update({k: v.format(root=root) for k, v in change.items()})
    capsys.readouterr()
    assert main(["train", "--quiet", *[x for kv in args.items() for x in kv]]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.format(root=root) in error and error.startswith("singlora train: error:")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs have loaded


def test_an_existing_run_is_never_overwritten_silently(assets: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Training into a finished run's folder is refused (naming what is there) unless --resume / --overwrite;
    --overwrite replaces the run's files and nothing else."""
    out = tmp_path / "run"
    _train(assets, out, "--max-steps", "2", "--save-every", "1", "--no-plot")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--model", str(assets["bert"]), "--train-data", str(assets["train"]), "--output-dir",
                 str(out), "--quiet", "--max-steps", "1"]) == 2
    error = capsys.readouterr().err
    assert (f"--output-dir {out} already holds a run (a finished run): adapter/, checkpoint.pt, metrics.jsonl, "
            "summary.json, config.yaml; continue it with --resume, or replace it with --overwrite") in error
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "notes.txt").write_text("mine")
    summary = _train(assets, out, "--max-steps", "1", "--overwrite", "--no-plot")
    assert summary["steps"] == 1 and not (out / "checkpoint.pt").exists()  # --save-every 0: the old one is gone
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    assert (out / "notes.txt").read_text() == "mine"


def test_ctrl_c_prints_one_line_and_the_run_resumes(assets: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C in `singlora train`: no traceback, exit 130, one line saying how to continue; --resume finishes."""
    args = ["train", "--model", str(assets["bert"]), "--train-data", str(assets["train"]), "--output-dir",
            str(tmp_path / "run"), "--quiet", "--max-steps", "3", "--save-every", "1", "--target-modules", "query"]
    capsys.readouterr()
    with ctrl_c_after_step(2):
        assert main(args) == 130
    error = capsys.readouterr().err
    assert error.strip() == (f"singlora train: interrupted; {tmp_path / 'run' / 'checkpoint.pt'} holds the last "
                             "checkpoint: the same command with --resume continues from it")
    assert main([*args, "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    with pytest.raises(SystemExit):  # an unknown flag is reported under the subcommand's usage
        main(["inspect", str(tmp_path / "run" / "adapter"), "--verbose"])
    error = capsys.readouterr().err
    assert "usage: singlora inspect" in error and "singlora inspect: error: unrecognized arguments: --verbose" in error


def test_the_head_the_adapter_replaces_is_not_reported_newly_initialized(assets: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """transformers reports the classification head as "newly initialized" whenever a base model is loaded for
    classification; `singlora evaluate` then loads the trained head from the adapter: that report alone is held
    back, and any other missing weight is still reported."""
    import logging

    from torch_singlora.hf import from_pretrained
    from torch_singlora.train.tasks import HEAD_NAMES

    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # `singlora train --quiet` (in _train) leaves transformers at ERROR
    try:
        _train(assets, tmp_path / "run", "--max-steps", "1")
        reports.clear()
        assert main(["evaluate", str(tmp_path / "run" / "adapter"), "--data", str(assets["eval"]), "--quiet"]) == 0
        assert reports == []
        kind = transformers.AutoModelForSequenceClassification
        from_pretrained(kind, str(assets["bert"]), num_labels=3)  # the control: transformers reports the head
        assert len(reports) == 1 and "classifier.weight" in reports[0] and "MISSING" in reports[0]
        from_pretrained(kind, str(assets["bert"]), num_labels=3, new_modules=HEAD_NAMES)
        assert len(reports) == 1
        from_pretrained(kind, str(assets["llama"]), num_labels=3, new_modules=("classifier",))  # a "score" head
        assert len(reports) == 2 and "score.weight" in reports[1]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_evaluate_refuses_unknown_labels_and_paths(assets: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    _train(assets, tmp_path / "run", "--max-steps", "1")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "weather"}])
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "adapter"), "--data", str(bad)]) == 2
    assert "'weather'" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    # the run's output folder where its adapter folder belongs: every command says where the adapter is
    run, hint = tmp_path / "run", f"its adapter folder is {tmp_path / 'run' / 'adapter'}"
    for command in (["evaluate", str(run), "--data", str(bad)], ["merge", str(run), str(tmp_path / "m")],
                    ["export", str(run), str(tmp_path / "e")], ["inspect", str(run)],
                    ["train", "--model", str(run), "--train-data", str(bad), "--output-dir", str(tmp_path / "t")]):
        assert main(command) == 2
        assert hint in capsys.readouterr().err, command


def test_real_minilm_few_steps_on_bbc_news(tmp_path: Path) -> None:
    """The demo's path on the real model and data: a few steps, every Linear of the encoder adapted."""
    from torch_singlora.assets import bbc_news_path

    out = tmp_path / "minilm"
    args = ["train", "--model", minilm_path(), "--train-data", bbc_news_path(), "--eval-split", "0.02",
            "--max-train-samples", "16", "--target-modules", "all-linear", "--max-length", "32", "--batch-size", "8",
            "--max-steps", "2", "--output-dir", str(out), "--quiet", "--save-every", "0", "--no-plot"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    # 6 layers x (q, k, v, attn-out 384x384; intermediate 1536x384; output 384x1536) + pooler 384x384, r = 8
    assert summary["adapted_modules"] == 6 * 6 + 1
    assert summary["adapter_params"] == (6 * (4 * 384 + 2 * 1536) + 384) * 8
    assert summary["steps"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["labels"] == ["business", "entertainment", "politics", "sports", "tech"]


def test_positionals_after_an_option_are_taken_and_mistakes_are_named_under_the_subcommand(
        capsys: pytest.CaptureFixture) -> None:
    """`singlora generate BASE --adapter X "a prompt"`: argparse's first pass leaves the prompt over; the
    subcommand's own parser takes it (intermixed). Every subcommand's parser supports that second pass."""
    from torch_singlora.cli import build_parser, parse_args

    args = parse_args(["generate", "BASE", "--adapter", "lora/", "first prompt", "second", "--max-new-tokens", "4"])
    assert (args.command, args.model, args.adapter, args.prompts) == ("generate", "BASE", "lora/",
                                                                     ["first prompt", "second"])
    assert args.max_new_tokens == 4 and args.func is parse_args(["generate", "BASE", "p"]).func
    for name in build_parser().parse_args(["inspect", "x"]).subcommand_parsers:
        with pytest.raises(SystemExit):  # not a TypeError: the intermixed pass works for each
            parse_args([name, "--no-such-flag"])
        assert f"usage: singlora {name}" in capsys.readouterr().err
