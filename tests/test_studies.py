"""Smoke tests of the studies in ``--quick`` mode (the full runs are not tests), plus the synthetic targets' maths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from studies import synthetic_attention as sa  # noqa: E402


@pytest.mark.parametrize("kind", sa.TARGETS)
def test_synthetic_targets_have_the_stated_structure(kind: str) -> None:
    d, r = 32, 4
    change = sa.target_change(kind, d, r, norm=3.0, g=torch.Generator().manual_seed(0)).double()
    eigenvalues = torch.linalg.eigvalsh((change + change.T) / 2)
    rank = int(torch.linalg.matrix_rank(change, rtol=1e-4))  # the change was built in float32
    assert abs(change.norm().item() - 3.0) < 1e-5
    expected_rank = {"psd_r": r, "psd_2r": 2 * r, "indefinite_r": r, "dense": d}[kind]
    assert rank == expected_rank
    if kind in ("psd_r", "psd_2r"):
        assert eigenvalues.min() > -1e-5 and torch.allclose(change, change.T)
    if kind == "indefinite_r":
        assert (eigenvalues < -1e-3).sum() == r // 2 and (eigenvalues > 1e-3).sum() == r - r // 2


def test_synthetic_attention_quick(tmp_path: Path) -> None:
    data = sa.main(["--quick", "--out", str(tmp_path), "--d", "32", "--tokens", "16", "--lora-rank", "4",
                     "--lr", "3e-3"])  # 200 steps at the paper's 1e-4 barely move; a larger lr must fit
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and "## Final loss" in (tmp_path / "REPORT.md").read_text()
    assert saved["params"] == {"lora": 2 * 2 * 32 * 4, "singlora": 2 * 32 * 8}  # equal budgets, computed here
    for kind in sa.TARGETS:
        lora, sing = data["targets"][kind]["lora"], data["targets"][kind]["singlora"]
        # Both updates start at exactly zero (B = 0; u(0) = 0), so both start from the base model's loss.
        assert lora["initial"]["median"] == pytest.approx(sing["initial"]["median"], rel=1e-6)
        assert lora["final"]["median"] < 0.5 * lora["initial"]["median"]
        assert sing["final"]["median"] < 0.5 * sing["initial"]["median"]


def test_synthetic_initial_loss_matches_a_float64_reference() -> None:
    cfg = sa.Settings(d=16, tokens=8, lora_rank=2, seeds=2, targets=("psd_r",))
    problems = sa.make_problems(cfg)
    X, Wq, Wk, Z = (problems[k].double() for k in ("X", "Wq", "Wk", "Z"))
    reference = ((X @ Wq @ Wk.transpose(1, 2) @ X.transpose(1, 2) - Z) ** 2).mean(dim=(1, 2))
    run = sa.train("singlora", sa.Settings(**{**cfg.__dict__, "steps": 1, "log_every": 1}), problems)
    torch.testing.assert_close(run["curve"][0].double(), reference, rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One work folder for the BBC studies: the tiny model and cached runs are shared between them."""
    return tmp_path_factory.mktemp("studies_work")


def _expected_adapter_params(model_dir: str, method: str, r: int = 8) -> int:
    """query + value of every layer: SingLoRA max(d_in, d_out) * r, LoRA (d_in + d_out) * r, from the config."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    per_matrix = hidden * r if method == "singlora" else 2 * hidden * r
    return 2 * layers * per_matrix


def test_method_comparison_quick(work: Path, tmp_path: Path) -> None:
    from studies import method_comparison

    state = method_comparison.main(["--quick", "--work", str(work), "--out", str(tmp_path)])
    assert state["complete"] and set(state["final"]) == set(method_comparison.METHODS)
    model_dir = str(work / "tiny_bert")
    for method in ("lora", "singlora", "loraplus"):
        assert state["final"][method][0]["adapter_params"] == _expected_adapter_params(model_dir, method)
    for runs in state["final"].values():
        assert runs[0]["steps"] == 2 and 0.0 <= runs[0]["test_accuracy"] <= 1.0
    assert "## Test accuracy" in (tmp_path / "REPORT.md").read_text()
    assert (tmp_path / "test_accuracy.png").is_file()


def test_a_cached_run_that_cannot_resume_is_trained_again(work: Path) -> None:
    """A run folder left by an older singlora (a checkpoint this version refuses) restarts instead of failing the
    study."""
    from studies.bbc import RunSpec, make_bench, quick_spec

    bench = make_bench(work, quick=True)
    spec = quick_spec(RunSpec("singlora", 1e-3, seed=7))
    out = bench.run_dir(spec)
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")  # what a killed run of another version leaves
    result = bench.run(spec)
    assert result["steps"] == 2 and json.loads((out / "result.json").read_text()) == result
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_lr_sensitivity_quick(work: Path, tmp_path: Path) -> None:
    from studies import lr_sensitivity

    results = lr_sensitivity.main(["--quick", "--work", str(work), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] and set(saved["spread_points"]) == {"lora", "singlora"}
    means = [100 * runs[0]["test_accuracy"] for runs in results["lora"].values()]
    assert saved["spread_points"]["lora"]["test"] == pytest.approx(max(means) - min(means))
    assert (tmp_path / "accuracy_vs_lr.png").is_file()


def test_ramp_ablation_quick(work: Path, tmp_path: Path) -> None:
    from studies import ramp_ablation

    groups = ramp_ablation.main(["--quick", "--work", str(work), "--out", str(tmp_path)])
    assert groups["T=0% init=normal"][0]["ramp_steps"] == 0
    assert groups["T=0.5% init=normal"][0]["ramp_steps"] == 1  # a fraction of 2 steps rounds up to one step
    assert "## Accuracy per setting" in (tmp_path / "REPORT.md").read_text()


def test_titles_split_holds_the_headlines_of_the_articles_split(tmp_path: Path) -> None:
    from studies.bbc import Split, make_split

    def rows(split: Split) -> dict[str, list[dict[str, str]]]:
        paths = make_split(tmp_path, split)
        return {part: [json.loads(line) for line in open(p, encoding="utf-8")] for part, p in paths.items()}

    articles, titles = rows(Split(3, 1, 2)), rows(Split(3, 1, 2, task="titles"))
    for part in ("train", "val", "test"):
        assert len(titles[part]) == len(articles[part]) == 5 * {"train": 3, "val": 1, "test": 2}[part]
        for article, title in zip(articles[part], titles[part]):  # same shuffle, so the same articles in order
            assert title["label"] == article["label"]
            assert title["text"] == article["text"].strip().splitlines()[0].strip() and "\n" not in title["text"]
            assert len(title["text"].split()) < 20 < len(article["text"].split())


def test_lr_sensitivity_quick_titles(work: Path, tmp_path: Path) -> None:
    from studies import lr_sensitivity

    lr_sensitivity.main(["--quick", "--task", "titles", "--work", str(work), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] and saved["base_run"]["max_length"] == 16  # quick runs keep their 16 tokens
    assert "headlines" in (tmp_path / "REPORT.md").read_text()
    assert (work / "data" / "bbc_titles_4_2_2" / "train.jsonl").is_file()


def test_save_dtype_study_rebuilds_the_classification_demo_run(tmp_path: Path) -> None:
    """studies/save_dtype evaluates on the classification demo's split: its run's flags, parsed by the CLI."""
    from studies import save_dtype
    from torch_singlora.assets import bbc_news_path, minilm_path

    config = save_dtype.demo_config(tmp_path / "singlora")
    assert (config.model, config.train_data, config.method) == (minilm_path(), bbc_news_path(), "singlora")
    assert (config.max_train_samples, config.output_dir, config.task) == (1200, str(tmp_path / "singlora"),
                                                                          "classification")
