"""The LLM study (issue 16): its maths checked against independent references, and a ``--quick`` smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")
pytest.importorskip("peft")

from studies import llm_claim, llm_report, llm_task  # noqa: E402

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm_study")


@pytest.fixture(scope="module")
def tiny(work: Path) -> str:
    return llm_task.tiny_llama(work)


def test_adapter_params_match_the_models_and_the_paper(tiny: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from torch_singlora import SingLoRAConfig, get_singlora_model

    config = json.loads((Path(tiny) / "config.json").read_text())
    counted = {}
    for method in ("singlora", "lora", "dora"):
        model = AutoModelForCausalLM.from_pretrained(tiny)
        if method == "singlora":
            model = get_singlora_model(model, SingLoRAConfig(r=8, target_modules=list(llm_task.TARGETS)))
        else:
            config_ = LoraConfig(r=8, target_modules=list(llm_task.TARGETS), use_dora=method == "dora")
            model = get_peft_model(model, config_)
        counted[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counted[method] == llm_task.adapter_params(config, method)
    # GQA: k/v are (16, 32) here, so SingLoRA keeps 32 rows where LoRA keeps 48.
    assert llm_task.projection_shapes(config)["k_proj"] == (16, 32)
    # LLaMA-7B, all seven projections, r = 8: the paper's 20M (LoRA) and 12M (SingLoRA), "60 %" of the budget.
    lora, sing = (llm_task.adapter_params(llm_task.LLAMA_7B, m) for m in ("lora", "singlora"))
    assert round(lora / 1e6) == 20 and round(sing / 1e6, 1) == 12.6 and 0.6 < sing / lora < 0.65


def test_answer_log_probs_equal_a_full_sequence_reference(tiny: str) -> None:
    """The cached-prompt scoring (left padding, one prompt pass) equals scoring each whole answer on its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    headlines = ["Ad sales boost Time Warner profit", "Claxton hunting first major medal", "Hi"]  # unequal lengths
    prompts = [llm_task.chat_prompt(tokenizer, h) for h in headlines]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        got = llm_task.answer_log_probs(model, tokenizer, batch, LABELS)
        model.double()
        for b, prompt in enumerate(prompts):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for i, word in enumerate(LABELS):
                answer = tokenizer(word, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                logp = model(input_ids=torch.tensor([ids + answer])).logits[0].log_softmax(-1)
                expected = sum(logp[len(ids) - 1 + j, token] for j, token in enumerate(answer))
                assert got[b, i].item() == pytest.approx(expected.item(), abs=1e-3)


def test_zero_shot_scores_what_it_generates(tiny: str) -> None:
    rows = [{"text": "Shares rise", "label": "business"}, {"text": "Cup final", "label": "sports"}]
    result = llm_task.zero_shot(tiny, rows, LABELS, max_new_tokens=3)
    assert result["examples"] == 2 and len(result["answers"]) == 2
    exact = [llm_task.normalise_answer(a["answer"]) == a["label"] for a in result["answers"]]
    assert result["exact_match"] == sum(exact) / 2
    assert result["ranked_choice"] == sum(a["ranked"] == a["label"] for a in result["answers"]) / 2
    assert llm_task.normalise_answer(' "Sports."\n') == "sports"


def test_next_rate_walks_the_1_3_grid() -> None:
    assert [llm_claim.next_rate(x, up=True) for x in (1e-4, 3e-4, 1e-2)] == [3e-4, 1e-3, 3e-2]
    assert [llm_claim.next_rate(x, up=False) for x in (1e-4, 3e-4, 1e-2)] == [3e-5, 1e-4, 3e-3]


def test_good_window_and_paired_differences() -> None:
    def runs(*accs: float) -> list[dict[str, float]]:
        return [{"val_accuracy": a, "test_accuracy": a} for a in accs]

    table = {"singlora": {1e-4: runs(0.2, 0.2), 1e-3: runs(0.8, 0.9), 1e-2: runs(0.7, 0.7), 1e-1: runs(0.2, 0.2)},
             "lora": {1e-4: runs(0.3, 0.3), 1e-3: runs(0.9, 0.9), 1e-2: runs(0.5, 0.5), 1e-1: runs(0.2, 0.2)}}
    assert llm_report.good_window(table) == [1e-4, 1e-3, 1e-2]  # mean over both methods: 1.725 beats 1.675
    mean, std, ahead, n = llm_report.paired(table["singlora"][1e-3], table["lora"][1e-3])
    assert (mean, ahead, n) == (pytest.approx(-5.0), 0, 2) and std == pytest.approx(7.0710678, rel=1e-6)


def test_llm_claim_quick(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    state = llm_claim.main(["--quick", "--jobs", "1", "--work", str(work), "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and set(saved["chosen"]) == set(llm_task.METHODS)
    config = json.loads((work / "tiny_llama" / "config.json").read_text())
    for method in llm_task.METHODS:
        runs = saved["runs"][method]
        assert all(r["steps"] == 2 for by_lr in runs.values() for r in by_lr)
        assert saved["params"][method]["measured"] == llm_task.adapter_params(config, method)
    assert set(saved["runs"]["lora"]) == set(saved["runs"]["singlora"]) == {"0.0003", "0.001"}
    assert set(saved["long"]) == {"singlora", "lora"}
    assert all(run["result"]["steps"] == 4 and len(run["curve"]["val"]) == 4 for run in saved["long"].values())
    report = (out / "REPORT.md").read_text()
    assert "## Zero-shot" in report and "## Learning-rate sensitivity" in report and "Status: complete" in report
    assert (out / "accuracy_vs_lr.png").stat().st_size > 0 and (out / "comparison.png").stat().st_size > 0
    # A second invocation trains nothing: every run comes from the cache, no result file is rewritten.
    written = {p: p.stat().st_mtime_ns for p in (work / "runs" / "llm_quick").glob("*/result.json")}
    assert len(written) == len(state["results"]) == 8  # 2 + 2 + 1 + 1 sweeps, 2 long runs
    again = llm_claim.main(["--quick", "--jobs", "1", "--work", str(work), "--out", str(out)])
    assert again["results"] == state["results"]
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_a_diverged_run_is_recorded_at_constant_prediction_accuracy(work: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from studies.bbc import Bench
    from torch_singlora.errors import SingLoRAError

    bench = llm_task.make_llm_bench(work, llm_task.QUICK_SPLIT, quick=True)
    spec = llm_task.LLMRunSpec(method="lora", lr=1.0, max_steps=2)

    def diverge(self: Bench, spec: llm_task.LLMRunSpec) -> dict:
        raise SingLoRAError("non-finite loss (nan) at optimizer step 2")

    monkeypatch.setattr(Bench, "run", diverge)
    result = llm_task.train_run(bench, spec)
    assert result["diverged"] and "non-finite" in result["error"]
    # Balanced splits (2 per class): a constant prediction is right on 1/5; its class's F1 is 2/(2+8) = 1/3... / 5.
    assert result["val_accuracy"] == result["test_accuracy"] == pytest.approx(0.2)
    assert result["test_macro_f1"] == pytest.approx((2 * 2 / (2 * 2 + 8)) / 5)
    assert json.loads((bench.run_dir(spec) / "result.json").read_text())["diverged"] is True

    def fail(self: Bench, spec: llm_task.LLMRunSpec) -> dict:
        raise SingLoRAError("--model: not a transformers model folder")

    monkeypatch.setattr(Bench, "run", fail)
    with pytest.raises(SingLoRAError, match="not a transformers"):
        llm_task.train_run(bench, llm_task.LLMRunSpec(method="lora", lr=2.0, max_steps=2))
