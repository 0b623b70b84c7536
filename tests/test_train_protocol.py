"""The training loop's seams: a new task plugs in through ``TASKS`` without touching the loop (its own flags, a
step-0 base score, extra JSON values logged at each evaluation), the checkpoint holds exactly its documented
fields, and DreamBooth shares the optimizer step's non-finite policy."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import minilm_path

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch_singlora.cli import main  # noqa: E402
from torch_singlora.train import checkpoint, registry, tasks  # noqa: E402
from torch_singlora.train.tasks import CausalLM  # noqa: E402


@dataclasses.dataclass
class ToyOptions:
    sample_prefix: str = dataclasses.field(default=">", metadata={"help": "text before each logged sample"})


class ToyTask(CausalLM):
    """Causal LM that evaluates the base model at step 0 and logs a non-numeric value with each evaluation."""

    name = "toy"
    evaluate_base = True
    options = ToyOptions

    def load_data(self, config: Any, tokenizer: Any) -> tasks.TaskData:
        data = super().load_data(config, tokenizer)
        data.info["sample_prefix"] = self.parse_options(config.task_options).sample_prefix
        return data

    def evaluate(self, model: Any, batches: Any, *, dataset: Any, **kwargs: Any) -> dict[str, Any]:
        metrics = super().evaluate(model, batches, dataset=dataset, **kwargs)
        return {**metrics, "samples": [kwargs["info"]["sample_prefix"] + str(len(dataset))]}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("protocol")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    words = "the cat sat on the mat and the dog ran in the park".split()
    rows = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(9))} for i in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    return {"root": root, "llama": root / "llama", "train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _eval_loss(model_dir: Path, eval_file: Path, max_length: int) -> float:
    """Mean next-token cross-entropy of the base model on the eval blocks, computed here from the logits."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    stream: list[int] = []
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # MiniLM's WordPiece has none
    for line in eval_file.read_text().splitlines():
        stream += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + eos
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), max_length):
            block = torch.tensor([stream[start : start + max_length]])
            if block.shape[1] < 2:
                continue
            logits = model(block).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, block[0, 1:], reduction="sum"))
            count += block.shape[1] - 1
    return total / count


def test_a_new_task_plugs_in_without_touching_the_loop(llama: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(registry.TASKS, "toy", "test_train_protocol:ToyTask")
    out = tmp_path / "run"
    args = ["train", "--task", "toy", "--model", str(llama["llama"]), "--train-data", str(llama["train"]),
            "--eval-data", str(llama["eval"]), "--output-dir", str(out), "--max-length", "8", "--batch-size", "4",
            "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--quiet", "--no-plot",
            "--sample-prefix", "#", "--ramp-up-steps", "0"]  # u = 1 from step 0: the base score disables A
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]  # the base model's score first
    expected = _eval_loss(llama["llama"], llama["eval"], 8)
    assert evals[0]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert evals[0]["samples"] == [f"#{evals[0]['samples'][0][1:]}"] and int(evals[0]["samples"][0][1:]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"] == {k: evals[0][k] for k in ("eval_loss", "perplexity", "samples")}
    assert summary["metrics"] == ["eval_loss", "perplexity"] and summary["samples"] == evals[-1]["samples"]
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["task"] == "toy" and info["sample_prefix"] == "#"

    # --resume of the finished run: no step is repeated, the final evaluation is not logged twice
    assert main(args + ["--resume"]) == 0
    assert (out / "metrics.jsonl").read_text().splitlines() == [json.dumps(r) for r in records]
    assert json.loads((out / "summary.json").read_text())["base"] == summary["base"]

    # the summary table shows the base score beside the final one
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "base eval loss" in header and "base perplexity" in header and "samples" not in header

    # a task's flag belongs to that task: given to another one, it is refused by name
    capsys.readouterr()
    assert main([*args[:2], "causal-lm", *args[3:]]) == 2
    assert "--sample-prefix is an option of --task toy, not of --task causal-lm" in capsys.readouterr().err


def test_checkpoint_holds_exactly_the_documented_fields(llama: dict[str, Path], tmp_path: Path) -> None:
    documented = re.findall(r"^    (\w+)\s{2,}", checkpoint.__doc__, flags=re.M)
    fields = [f.name for f in dataclasses.fields(checkpoint.TrainingState)]
    assert documented == fields
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(llama["llama"]), "--train-data", str(llama["train"]),
                 "--output-dir", str(out), "--max-length", "8", "--batch-size", "4", "--max-steps", "1",
                 "--save-every", "1", "--quiet", "--no-plot"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert list(saved) == fields
    assert saved["step"] == 1 and saved["log_records"] == 1 and saved["base_metrics"] is None
    assert set(saved["identity"]) == {"data", "model"} and saved["trainable"]


def test_dreambooth_stops_at_the_first_non_finite_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("diffusers")
    from PIL import Image

    from torch_singlora.diffusion import dreambooth
    from torch_singlora.diffusion.tiny import tiny_stable_diffusion
    from torch_singlora.errors import SingLoRAError

    tiny_stable_diffusion(tmp_path / "model")
    (tmp_path / "instance").mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "instance" / "0.png")
    real, calls = dreambooth.dreambooth_loss, []

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * math.nan if len(calls) == 3 else loss  # micro-batch 3 = optimizer step 2 (2 per step)

    monkeypatch.setattr(dreambooth, "dreambooth_loss", poisoned)
    args = dreambooth.DreamBoothArgs(
        pretrained_model=str(tmp_path / "model"), instance_data_dir=str(tmp_path / "instance"),
        instance_prompt="a photo of sks dog", output_dir=str(tmp_path / "out"), resolution=16, max_train_steps=4,
        gradient_accumulation_steps=2, ramp_up_steps=1, export_lora=False,
    )
    with pytest.raises(SingLoRAError, match=r"non-finite loss \(nan\) at optimizer step 2; stopped without writing"):
        dreambooth.train_dreambooth(args)
    assert len(calls) == 4 and not (tmp_path / "out" / "singlora").exists()


def test_evaluate_a_base_model_without_an_adapter(llama: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    assert main(["evaluate", "--model", str(llama["llama"]), "--task", "causal-lm", "--data", str(llama["eval"]),
                 "--output", str(tmp_path / "m.json"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(_eval_loss(llama["llama"], llama["eval"], 128), rel=1e-5)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(llama["llama"]), "--task", "classification", "--data",
                 str(llama["eval"])]) == 2
    assert "--task classification: evaluating needs a trained adapter folder" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(llama["eval"])]) == 2
    assert "without an adapter folder, give the base model: --model and --task" in capsys.readouterr().err


def test_a_checkpoint_with_a_wrong_field_type_is_refused_by_name(tmp_path: Path) -> None:
    from torch_singlora.errors import SingLoRAError

    fields = {f.name: None for f in dataclasses.fields(checkpoint.TrainingState)}
    fields.update(trainable={"a": torch.zeros(2)}, optimizer={}, scheduler={}, ramp_step=0,
                  rng={"torch": torch.get_rng_state()}, step=3, epoch=0, batch=6, skipped=0, log_records=3,
                  config={}, identity={})
    torch.save(fields, tmp_path / "good.pt")
    assert checkpoint.load_checkpoint(tmp_path / "good.pt").step == 3
    for name, bad in (("step", "x"), ("batch", -1), ("trainable", {"a": [1.0]}), ("rng", {}), ("config", [])):
        torch.save({**fields, name: bad}, tmp_path / "bad.pt")
        with pytest.raises(SingLoRAError, match=f"field '{name}' has the wrong type"):
            checkpoint.load_checkpoint(tmp_path / "bad.pt")


def test_report_reads_summaries_strictly(tmp_path: Path, capsys: Any) -> None:
    for name, text in (("nan", '{"name": "x", "accuracy": NaN}'), ("twice", '{"name": "x", "name": "y"}'),
                       ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(text)
        capsys.readouterr()
        assert main(["report", str(tmp_path / name)]) == 2
        assert str(tmp_path / name / "summary.json") in capsys.readouterr().err
