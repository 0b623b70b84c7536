"""The forgetting study (issue 26): the fortune reader, the held-out loss against a per-document float64 reference,
the tuned classifier's backbone carried into the causal LM, the paired summary, and a ``--quick`` run of both
tunings (tiny random Llama)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("transformers")
pytest.importorskip("peft")

from studies import forgetting, forgetting_report, llm_task  # noqa: E402

PROSE = [
    "A celebrity is a person who is known for his well-knownness, said a man on the radio today.",
    "Never put off till tomorrow what you can do the day after tomorrow just as well, they say.",
    "The best way to predict the future is to invent it, and the second best way is to wait and see.",
    "He who laughs last thinks slowest, or so the old and rather unkind saying goes in our town.",
]


@pytest.fixture(scope="module")
def fortune_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fortunes")
    picture = "  (  /\\__/\\  )\n   \\(^ @..@ ^)/ -- == ## %% ** ** -- == ## ++ -- // \\\\ ||"
    (folder / "people").write_text("\n%\n".join([PROSE[0], "Too short.", picture, PROSE[1]]) + "\n%\n")
    (folder / "wisdom").write_text(PROSE[2].replace(" and ", "\n\tand ") + "\n%\n" + PROSE[3] + "\n%\n" + PROSE[0])
    (folder / "ascii-art").write_text(" ".join(["word"] * 20))  # a file of pictures, never read
    (folder / "wisdom.dat").write_bytes(b"\x00\x01 binary index")
    return folder


def test_fortunes_keeps_each_prose_entry_once(fortune_folder: Path) -> None:
    texts = forgetting.fortunes(fortune_folder, 4)
    assert sorted(texts) == sorted(PROSE)  # white space collapsed; the short entry, the picture and the dupe left out
    assert forgetting.fortunes(fortune_folder, 4) == texts  # a fixed sample
    with pytest.raises(SystemExit, match="fewer than --texts=5"):
        forgetting.fortunes(fortune_folder, 5)
    with pytest.raises(SystemExit, match="apt-get install fortunes"):
        forgetting.fortunes(fortune_folder / "missing", 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return llm_task.tiny_llama(tmp_path_factory.mktemp("forgetting_model"))


def test_heldout_loss_equals_a_per_document_float64_reference(tiny: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    got = forgetting.heldout_loss(model, tokenizer, PROSE, max_tokens=12, batch_size=3)  # padded batches, cut at 12
    model.double()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in PROSE:
            ids = tokenizer(text)["input_ids"][:12]
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            total -= sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
            count += len(ids) - 1
    assert got["tokens"] == count == 4 * 11
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)


def test_summary_pairs_seeds_against_singlora() -> None:
    def run(method: str, lr: float, seed: int, delta: float) -> dict:
        return {"method": method, "lr": lr, "seed": seed, "heldout": {"delta": delta, "relative": delta / 2},
                "task": {"test_accuracy": 0.5 + delta}}

    part = {"rates": {"singlora": 1e-3, "lora": 3e-3}, "base": {"loss": 2.0, "tokens": 10},
            "runs": [run("singlora", 1e-3, 0, 0.10), run("singlora", 1e-3, 1, 0.30), run("singlora", 3e-3, 0, 9.0),
                     run("lora", 3e-3, 1, 0.20), run("lora", 3e-3, 0, 0.40), run("lora", 1e-3, 0, -9.0)]}
    summary = forgetting_report.summarise({"llm": part}, {"llm": 2})["llm"]
    sing, lora = summary["methods"]["singlora"], summary["methods"]["lora"]
    assert sing["delta"]["mean"] == pytest.approx(0.2) and sing["seeds"] == 2  # the other rate's run is left out
    assert lora["minus_singlora"]["mean"] == pytest.approx(0.1)  # seed 0: 0.4 - 0.1, seed 1: 0.2 - 0.3
    assert lora["minus_singlora"]["std"] == pytest.approx(math.sqrt(2) * 0.2)
    assert lora["singlora_forgets_less"] == 1 and summary["complete"]


def test_quick_study_scores_the_tuned_backbones(fortune_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from torch_singlora.runs import load_trained

    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--quick", "--work", str(work), "--out", str(out), "--fortunes", str(fortune_folder), "--texts", "4",
            "--methods", "singlora", "--seeds", "1", "--sft-lrs", "1e-3"]
    data = forgetting.main(argv)
    llm, sft = data["parts"]["llm"], data["parts"]["sft"]
    assert [r["seed"] for r in llm["runs"]] == [0] and sft["grids"]["singlora"] == [1e-3, 3e-3]  # edge: extended
    assert data["summary"]["sft"]["methods"]["singlora"]["lr"] == sft["rates"]["singlora"]
    assert {p.name for p in out.iterdir()} >= {"REPORT.md", "results.json", "forgetting.png"}
    # the classifier's tuned backbone, merged into the base causal LM, computes what the tuned classifier's does
    run_dir = next((work / "runs" / "llm_quick").glob("singlora_*"))
    causal = forgetting.tuned_causal_lm(run_dir / "adapter", llm["model"])
    classifier, _ = load_trained(str(run_dir / "adapter"))
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        expected = classifier.model.model(input_ids=ids).last_hidden_state  # the adapted layers, not merged
        got = causal.model(input_ids=ids).last_hidden_state
        base = AutoModelForCausalLM.from_pretrained(llm["model"]).model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-4  # the adapter changed the backbone, so the check above means something
    assert llm["runs"][0]["heldout"]["delta"] == pytest.approx(llm["runs"][0]["heldout"]["loss"] - llm["base"]["loss"])
    results = json.loads((run_dir / "result.json").read_text())
    again = forgetting.main(argv)  # every run and evaluation is cached
    assert again["parts"]["llm"]["runs"] == llm["runs"] and json.loads((run_dir / "result.json").read_text()) == results
    # the pruned sft study: no edge extension, fewer seeds than the llm part; its runs come from the cache
    pruned = forgetting.main(argv[:-6] + ["--parts", "sft", "--methods", "singlora", "--seeds", "2", "--sft-seeds",
                                          "1", "--sft-lrs", "1e-3", "--no-sft-extend"])["parts"]["sft"]
    assert pruned["grids"]["singlora"] == [1e-3] and [(r["lr"], r["seed"]) for r in pruned["runs"]] == [(1e-3, 0)]
    assert pruned["runs"][0] == next(r for r in sft["runs"] if r["lr"] == 1e-3)
