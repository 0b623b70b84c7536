"""The DreamBooth Fashion-MNIST study end to end at toy size, on synthetic 10-class data (no dataset needed)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

STUDY = Path(__file__).resolve().parents[1] / "studies" / "dreambooth_fashion" / "run.py"


def load_study():
    spec = importlib.util.spec_from_file_location("dreambooth_fashion_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def synthetic_data(n_per_class=20, size=16):
    """Class k: a bright 4x4 square at a class-specific place on a dark, noisy background, pixels in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    images, labels = [], []
    for k in range(10):
        x = -1 + 0.1 * torch.rand(n_per_class, 1, size, size, generator=g)
        row, col = 4 * (k // 4), 4 * (k % 4)
        x[:, :, row : row + 4, col : col + 4] = 1.0
        images.append(x)
        labels.append(torch.full((n_per_class,), k))
    x, y = torch.cat(images), torch.cat(labels)
    return {"train_x": x, "train_y": y, "test_x": x, "test_y": y}


def test_study_runs_end_to_end_and_counts_parameters(tmp_path):
    study = load_study()
    config = study.StudyConfig(
        base_steps=4, base_batch=8, classifier_train_size=200, db_steps=3, n_subject_samples=2,
        n_retention_per_class=1, sample_steps=2, seeds=(0,),
        methods=(("singlora", 8, 1e-3, "qk"), ("singlora", 16, 1e-3, "qk"), ("lora", 8, 1e-3, "qk")), sweep=(),
    )
    results = study.run(config, synthetic_data(), tmp_path, "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md", "grid.png", "results.json"]
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]

    # parameter counts from the U-Net's own to_q / to_k shapes: SingLoRA r * max(out, in), LoRA r * (out + in)
    shapes = [m.weight.shape for n, m in study.build_unet(config).named_modules() if n.endswith((".to_q", ".to_k"))]
    assert any(out != inp for out, inp in shapes)  # the cross-attention to_k is rectangular
    expected = {
        ("singlora", 8): sum(8 * max(s) for s in shapes),
        ("singlora", 16): sum(16 * max(s) for s in shapes),
        ("lora", 8): sum(8 * (s[0] + s[1]) for s in shapes),
    }
    got = {(row["method"], row["r"]): row["params"] for row in results["summary"] if row["method"] != "base"}
    assert got == expected
    for row in results["summary"]:
        assert 0.0 <= row["subject_accuracy"] <= 1.0 and 0.0 <= row["retention_accuracy"] <= 1.0

    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:  # instance row + base row + one row per method
        assert grid.height == 5 * (16 * 4 + 2)


def test_sweep_chooses_each_methods_lr_on_the_validation_seed_then_runs_it_on_every_seed(tmp_path):
    study = load_study()
    config = study.StudyConfig(
        base_steps=4, base_batch=8, classifier_train_size=200, db_steps=3, n_subject_samples=2,
        n_retention_per_class=1, sample_steps=2, seeds=(0, 1), sweep=(("singlora", 8, "qk"), ("lora", 8, "qk")),
        sweep_lrs=(1e-3, 1e-2), sweep_seed=7, methods=(),
    )
    results = study.run(config, synthetic_data(), tmp_path, "test")
    sweep = results["sweep"]
    assert [(row["method"], row["lr"], row["seed"]) for row in sweep] == [
        ("base", 0.0, 7), ("singlora", 1e-3, 7), ("singlora", 1e-2, 7), ("lora", 1e-3, 7), ("lora", 1e-2, 7)]
    for method in ("singlora", "lora"):
        rows = [row for row in sweep if row["method"] == method]
        chosen = study.choose_lr(rows)
        assert [row["lr"] for row in rows if row["chosen"]] == [chosen]
        final = [row for row in results["summary"] if row["method"] == method]
        assert [(row["lr"], row["n_seeds"]) for row in final] == [(chosen, 2)]
    assert "Learning-rate choice (validation seed 7" in (tmp_path / "REPORT.md").read_text()
    with pytest.raises(ValueError, match="sweep_seed=0"):
        study.run(study.StudyConfig(seeds=(0,), sweep_seed=0), synthetic_data(), tmp_path, "test")


def test_choose_lr_maximises_subject_plus_retention_accuracy():
    study = load_study()

    def row(lr, subject, retention, nn=0.5):
        return {"lr": lr, "subject_accuracy": subject, "retention_accuracy": retention, "subject_nn_rms": nn}

    rows = [row(1e-3, 0.2, 0.80), row(3e-3, 0.5, 0.72), row(1e-2, 0.9, 0.30)]
    assert study.choose_lr(rows) == 3e-3  # 1.22 beats 1.00 and 1.20
    assert study.choose_lr(rows[:1] + rows[2:]) == 1e-2  # 1.20 beats 1.00
    ties = [row(1e-3, 0.5, 0.8, nn=0.6), row(3e-3, 0.5, 0.8, nn=0.4), row(1e-2, 0.5, 0.8, nn=0.4)]
    assert study.choose_lr(ties) == 3e-3  # lower NN distance, then lower lr
    with pytest.raises(ValueError, match="no sweep rows"):
        study.choose_lr([])


def test_cosine_base_schedule_warms_up_then_decays_to_a_tenth():
    study = load_study()
    factors = [study.lr_factor(step, 100, "cosine") for step in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)  # 5 warm-up steps
    assert factors[5] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert study.lr_factor(99, 100, "constant") == 1.0
    with pytest.raises(ValueError, match="base_schedule='step'"):
        study.lr_factor(10, 100, "step")


def test_read_idx_parses_the_mnist_format(tmp_path):
    import gzip
    import struct

    study = load_study()
    data = bytes(range(24))
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 2, 3, 4) + data)
    array = study.read_idx(path)
    assert array.shape == (2, 3, 4) and array.flatten().tolist() == list(range(24))
