"""``singlora dreambooth`` / ``dreambooth-eval`` through the real command line, on a tiny saved pipeline."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch_singlora.cli import main  # noqa: E402
from torch_singlora.diffusion.tiny import tiny_metric_models, tiny_stable_diffusion  # noqa: E402


def write_images(directory, n):
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(directory / f"{i}.png")


def test_dreambooth_then_eval_from_the_command_line(tmp_path, capsys):
    tiny_stable_diffusion(tmp_path / "model")
    write_images(tmp_path / "subject", 2)
    dino, clip = tiny_metric_models(tmp_path / "metrics")
    status = main([
        "dreambooth", "--pretrained-model", str(tmp_path / "model"), "--instance-data-dir", str(tmp_path / "subject"),
        "--instance-prompt", "a photo of sks dog", "--output-dir", str(tmp_path / "out"), "--resolution", "16",
        "--max-train-steps", "2", "--r", "4", "--target-modules", "to_q", "to_k", "--ramp-up-steps", "1",
        "--no-export-lora",
    ])
    assert status == 0
    config = json.loads((tmp_path / "out" / "singlora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["to_q", "to_k"] and config["ramp_step"] == 2
    assert not (tmp_path / "out" / "diffusers_lora").exists()

    status = main([
        "dreambooth-eval", "--pretrained-model", str(tmp_path / "model"), "--adapter", str(tmp_path / "out" / "singlora"),
        "--prompt", "a photo of sks dog", "--num-images", "2", "--inference-steps", "2", "--resolution", "16",
        "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "subject"), "--dino-model", dino,
        "--clip-model", clip, "--output", str(tmp_path / "scores.json"),
    ])
    assert status == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["num_generated"] == 2 and scores["num_reference"] == 2
    assert all(-1.0 <= scores[k] <= 1.0 for k in ("dino", "clip_i", "clip_t"))
    assert json.loads((tmp_path / "gen" / "prompts.json").read_text()) == {
        "prompt000_00.png": "a photo of sks dog", "prompt000_01.png": "a photo of sks dog"}

    # a rerun never replaces what the user has without --overwrite: the scores file, a folder of other files
    rerun = ["dreambooth-eval", "--pretrained-model", str(tmp_path / "model"), "--prompt", "a photo of sks dog",
             "--num-images", "1", "--inference-steps", "1", "--resolution", "16",
             "--reference", str(tmp_path / "subject"), "--dino-model", dino, "--clip-model", clip]
    before = (tmp_path / "scores.json").read_text()
    assert main([*rerun, "--generated", str(tmp_path / "gen"), "--output", str(tmp_path / "scores.json")]) == 2
    assert "--overwrite replaces it" in capsys.readouterr().err and (tmp_path / "scores.json").read_text() == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"not ours")
    assert main([*rerun, "--generated", str(tmp_path / "mine")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "mine" / "photo.png").read_bytes() == b"not ours"

    # scoring the existing folder with its prompts.json gives the same numbers
    assert main(["dreambooth-eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "subject"),
                 "--dino-model", dino, "--clip-model", clip, "--output", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text()) == scores


def test_cli_errors_name_the_flag(tmp_path, capsys):
    assert main(["dreambooth", "--pretrained-model", str(tmp_path), "--instance-data-dir", str(tmp_path / "nope"),
                 "--instance-prompt", "p"]) == 2
    assert "--instance-data-dir" in capsys.readouterr().err
    write_images(tmp_path / "subject", 1)
    assert main(["dreambooth-eval", "--generated", str(tmp_path / "subject"), "--reference", str(tmp_path / "subject"),
                 "--clip-model", str(tmp_path / "missing")]) == 2
    assert "--prompts-file" in capsys.readouterr().err
    assert main(["dreambooth-eval", "--generated", str(tmp_path / "g"), "--reference", str(tmp_path / "subject"),
                 "--adapter", str(tmp_path)]) == 2
    assert "--pretrained-model" in capsys.readouterr().err
