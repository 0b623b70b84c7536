"""``singlora train --task dpo``: TRL's preference shapes, the step-0 oracle (the policy is its reference: loss ln 2,
rewards 0), the per-pair numbers against TRL's ``DPOTrainer`` on the same batch, ``--init-adapter`` (the SFT adapter
as the start and, frozen, as the reference), and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.cli import main

from conftest import ctrl_c_after_step, save_tiny_chat_llama

transformers = pytest.importorskip("transformers")

WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma")


def _rows(n: int) -> list[dict]:
    """Pairs in the three shapes, in turn: strings, message lists, implicit prompt (whole conversations)."""
    rows = []
    for i in range(n):
        word, other = WORDS[i % 6], WORDS[(i + 1 + (i // 6) % 5) % 6]
        if i % 3 == 0:
            rows.append({"prompt": f"Repeat the word {word}.", "chosen": word, "rejected": other})
        elif i % 3 == 1:
            rows.append({"prompt": [{"role": "user", "content": f"Say {word}."}],
                         "chosen": [{"role": "assistant", "content": word}],
                         "rejected": [{"role": "assistant", "content": f"I will not say {word}."}]})
        else:
            prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Echo {word}"}]
            rows.append({"chosen": prompt + [{"role": "assistant", "content": word}],
                         "rejected": prompt + [{"role": "assistant", "content": word.upper() + "!"}]})
    return rows


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("dpo")
    save_tiny_chat_llama(root / "model", smollm2_tokenizer)
    from torch_singlora.llm.preference import to_pair

    sft = [{"messages": to_pair(row, "").chosen.messages} for row in _rows(36)]  # SFT on the chosen answers
    return {"root": root, "model": str(root / "model"), "train": _write(root / "train.jsonl", _rows(36)),
            "test": _write(root / "test.jsonl", _rows(42)[36:]), "sft": _write(root / "sft.jsonl", sft)}


def _train(files, out: str, *extra: str, task: str = "dpo") -> list[dict]:
    argv = ["train", "--task", task, "--model", files["model"], "--train-data", files[task == "sft" and "sft" or
            "train"], "--output-dir", str(files["root"] / out), "--r", "4", "--lr", "5e-2", "--max-steps", "6",
            "--batch-size", "4", "--eval-generations", "2", "--max-new-tokens", "3", "--quiet", "--no-plot"]
    if task == "dpo":
        argv += ["--eval-data", files["test"], "--eval-train-pairs", "12"]
    assert main([*argv, *extra]) == 0
    return [json.loads(line) for line in (files["root"] / out / "metrics.jsonl").read_text().splitlines()]


def _assert_policy_is_reference(record: dict, loss: str) -> None:
    """Step 0: every log-ratio is exactly 0 (the same computation twice), so the loss is ln 2, rewards 0."""
    assert record[loss] == pytest.approx(math.log(2), abs=1e-7)
    for name in ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"):
        assert record[name] == 0.0, name


@pytest.fixture(scope="module")
def sft_run(files):
    _train(files, "sft", "--ramp-up-steps", "2", task="sft")
    return files["root"] / "sft" / "adapter"


def test_step0_is_ln2_then_training_prefers_chosen(files) -> None:
    records = _train(files, "dpo", "--ramp-up-steps", "2")
    base, first = records[0], records[1]
    assert base["kind"] == "eval" and base["step"] == 0 and first == {**first, "kind": "train", "step": 1}
    _assert_policy_is_reference(base, "eval_loss")  # at rest, u = 0: the policy is the base model
    # Step 1 runs at u = 1 / T = 0.5 (issue 24: at u = 0, A's gradient was 0 and the step was lost), so its policy is
    # the reference plus half of the small random initial update: a loss near ln 2, not exactly it.
    assert first["u"] == 0.5 and first["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert base["train_pairs_loss"] == pytest.approx(math.log(2), abs=1e-7)
    final = records[-1]
    assert final["kind"] == "eval" and final["step"] == 6
    assert final["train_pairs_reward_accuracy"] > 0.6 and final["train_pairs_loss"] < math.log(2)
    assert final["chosen_reward"] - final["rejected_reward"] == pytest.approx(final["reward_margin"], abs=1e-5)
    summary = json.loads((files["root"] / "dpo" / "summary.json").read_text())
    assert summary["base"]["reward_accuracy"] == 0.0 and summary["reward_accuracy"] == final["reward_accuracy"]
    # the base model evaluated alone is its own reference: the same step-0 numbers
    assert main(["evaluate", "--model", files["model"], "--task", "dpo", "--data", files["test"], "--quiet",
                 "--eval-generations", "2", "--max-new-tokens", "3", "--output", str(files["root"] / "base.json")]) == 0
    alone = json.loads((files["root"] / "base.json").read_text())
    _assert_policy_is_reference(alone, "eval_loss")
    for name in ("preference_accuracy", "chosen_logps", "rejected_logps", "exact_match"):
        assert alone[name] == pytest.approx(base[name], abs=1e-5), name


def test_init_adapter_is_start_and_frozen_reference(files, sft_run) -> None:
    records = _train(files, "dpo_sft", "--init-adapter", str(sft_run))
    _assert_policy_is_reference(records[0], "eval_loss")
    _assert_policy_is_reference(records[1], "loss")
    # the step-0 policy is the SFT model, not the base model: its log-probabilities are the SFT model's
    from torch_singlora.llm.dpo import DPO

    task = DPO()
    info = json.loads((files["root"] / "dpo_sft" / "adapter" / "run_info.json").read_text())
    tokenizer = task.load_tokenizer(files["model"], info)
    pairs = task.read_eval_data(files["test"], tokenizer, info, None)
    batch = task.collator(tokenizer, info)([pairs[i] for i in range(len(pairs))])
    from torch_singlora.llm.dpo import sequence_logps
    from torch_singlora.model import SingLoRAModel

    sft = SingLoRAModel.from_pretrained(task.load_model(files["model"], info), sft_run).eval()
    with torch.no_grad():
        sft_logps = sequence_logps(sft, batch)[0]
        with sft.disable_adapters():
            base_logps = sequence_logps(sft, batch)[0]
    chosen = sft_logps.chunk(2)[0].mean().item()
    assert records[0]["chosen_logps"] == pytest.approx(chosen, rel=1e-5)
    assert abs(chosen - base_logps.chunk(2)[0].mean().item()) > 0.1
    # trained on: the rewards move; `singlora evaluate` loads the reference again (run_info's init_adapter)
    final = records[-1]
    assert final["reward_margin"] != 0.0
    assert info["init_adapter"] == str(sft_run.resolve())
    assert main(["evaluate", str(files["root"] / "dpo_sft" / "adapter"), "--data", files["test"], "--quiet",
                 "--output", str(files["root"] / "dpo_sft_eval.json")]) == 0
    again = json.loads((files["root"] / "dpo_sft_eval.json").read_text())
    for name in ("eval_loss", "reward_accuracy", "reward_margin", "chosen_reward", "exact_match"):
        assert again[name] == pytest.approx(final[name], abs=1e-5), name


def test_lora_init_adapter_keeps_reference_out_of_saved_adapter(files) -> None:
    _train(files, "sft_lora", "--method", "lora", task="sft")
    adapter = files["root"] / "sft_lora" / "adapter"
    records = _train(files, "dpo_lora", "--method", "lora", "--init-adapter", str(adapter))
    _assert_policy_is_reference(records[0], "eval_loss")
    assert records[-1]["reward_margin"] != 0.0
    saved = files["root"] / "dpo_lora" / "adapter"
    assert sorted(p.name for p in saved.iterdir() if p.is_dir()) == []  # no "ref/" copy beside the adapter
    from safetensors.torch import load_file

    assert set(load_file(saved / "adapter_model.safetensors")) == set(load_file(adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_per_pair_numbers_equal_trl_dpo_trainer(files, smollm2_tokenizer, tmp_path, loss_type) -> None:
    """Our log-probabilities, losses and rewards of a padded batch == TRL's ``DPOTrainer._compute_loss`` on each pair
    alone, its reference a separately loaded base model (ours: the same model with the adapters disabled)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from torch_singlora.llm.dpo import score_pairs
    from torch_singlora.llm.preference import PreferenceCollator, read_pairs, tokenize_pairs

    tokenizer = smollm2_tokenizer
    torch.manual_seed(1)
    policy = get_singlora_model(transformers.AutoModelForCausalLM.from_pretrained(files["model"]), SingLoRAConfig(
        r=4, target_modules="all-linear", ramp_up_steps=0, init="gaussian", init_std=0.3)).eval()  # u = 1: not base
    data = tokenize_pairs(tokenizer, read_pairs(files["train"])[:6], max_length=None)
    batch = PreferenceCollator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    with torch.no_grad():
        ours = score_pairs(policy, batch, beta=0.3, loss_type=loss_type)
    trainer = trl.DPOTrainer(
        model=policy, ref_model=transformers.AutoModelForCausalLM.from_pretrained(files["model"]),
        args=trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], use_cpu=True, bf16=False,
                           report_to=[], max_length=None),
        train_dataset=datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}]),
        processing_class=tokenizer)
    trainer.model.eval()
    logged = trainer._metrics["eval"]
    for i in range(len(data)):
        sides = [(data[i]["chosen_input_ids"], data[i]["chosen_labels"]),
                 (data[i]["rejected_input_ids"], data[i]["rejected_labels"])]
        width = max(len(ids) for ids, _ in sides)
        pad = [width - len(ids) for ids, _ in sides]
        inputs = {"input_ids": torch.tensor([ids + [tokenizer.pad_token_id] * p for (ids, _), p in zip(sides, pad)]),
                  "attention_mask": torch.tensor([[1] * len(ids) + [0] * p for (ids, _), p in zip(sides, pad)]),
                  "completion_mask": torch.tensor([[int(t != -100) for t in labels] + [0] * p
                                                   for (_, labels), p in zip(sides, pad)])}
        with torch.no_grad():
            loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        expected = {"loss": float(loss), "chosen_reward": logged["rewards/chosen"][-1],
                    "rejected_reward": logged["rewards/rejected"][-1], "chosen_logps": logged["logps/chosen"][-1],
                    "rejected_logps": logged["logps/rejected"][-1]}
        actual = {"loss": ours.losses[i], "chosen_reward": ours.chosen_rewards[i],
                  "rejected_reward": ours.rejected_rewards[i], "chosen_logps": ours.chosen_logps[i],
                  "rejected_logps": ours.rejected_logps[i]}
        for name, value in expected.items():
            assert float(actual[name]) == pytest.approx(value, rel=2e-5, abs=2e-5), (i, name)


def test_pair_shapes_and_refusals(files, sft_run, tmp_path, capsys) -> None:
    from torch_singlora.llm.preference import to_pair

    strings, messages, implicit = (to_pair(row, f"row {i}") for i, row in enumerate(_rows(3)))
    assert strings.prompt == [{"role": "user", "content": "Repeat the word alpha."}]
    assert strings.chosen.messages[-1] == {"role": "assistant", "content": "alpha"}
    assert messages.rejected.messages[-1]["content"] == "I will not say beta."
    assert implicit.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Echo gamma"}]
    assert implicit.chosen.trained == implicit.rejected.trained == (2,)
    bad = [({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same"),
           ({"prompt": "p", "chosen": ["x"], "rejected": "y"}, "three strings, or three lists"),
           ({"chosen": "a", "rejected": "b"}, "two conversations"),
           ({"prompt": "p", "chosen": "a"}, "no column 'rejected'"),
           ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}]}, "share no first"),
           ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "b"}]}, "starts with a user message")]
    for row, message in bad:
        with pytest.raises(SingLoRAError, match=message):
            to_pair(row, "data.jsonl line 7")
    path = _write(tmp_path / "bad.jsonl", [_rows(1)[0], {"prompt": "p", "chosen": "same", "rejected": "same"}])
    base = ["train", "--task", "dpo", "--model", files["model"], "--output-dir", str(tmp_path / "out")]
    refused = [([*base, "--train-data", path], "bad.jsonl line 2: the chosen and rejected answers are the same"),
               ([*base, "--train-data", files["train"], "--method", "full"], "not --method full"),
               ([*base, "--train-data", files["train"], "--init-adapter", str(sft_run), "--r", "16"],
                "--r 16 differs from the adapter's 4"),
               ([*base, "--train-data", files["train"], "--init-adapter", str(sft_run), "--method", "lora"],
                "was trained with --method singlora"),
               ([*base, "--train-data", files["train"], "--beta", "0"], "--beta=0.0 must be")]
    for argv, message in refused:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trl_dpo_trainer_recipe_one_model_reference_is_adapters_disabled(files, smollm2_tokenizer, tmp_path) -> None:
    """docs/interop.md's recipe: TRL's ``DPOTrainer`` trains a SingLoRA model with ``precompute_ref_log_probs=True``
    and no ``ref_model``: the reference log-probabilities are the base model's (not the policy's, here u = 1 from
    step 0), one model in memory; checkpoints hold the adapter only."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from safetensors.torch import load_file

    from torch_singlora.integrations.trainer import singlora_trainer_class
    from torch_singlora.llm.dpo import sequence_logps

    torch.manual_seed(0)
    model = get_singlora_model(transformers.AutoModelForCausalLM.from_pretrained(files["model"]), SingLoRAConfig(
        r=4, target_modules="all-linear", ramp_up_steps=0, init="gaussian", init_std=0.3))
    before = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    rows = [row for row in _rows(18) if isinstance(row.get("prompt"), list)]  # conversational, explicit prompt
    SingLoRADPOTrainer = singlora_trainer_class(trl.DPOTrainer)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         precompute_ref_log_probs=True, save_steps=1, gradient_checkpointing=False, use_cpu=True,
                         bf16=False, report_to=[], logging_steps=1)
    trainer = SingLoRADPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=smollm2_tokenizer)
    base = transformers.AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    for index, example in enumerate(trainer.train_dataset):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([example["prompt_ids"] + example[f"{side}_ids"]])
            labels = torch.tensor([[-100] * len(example["prompt_ids"]) + example[f"{side}_ids"]])
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            with torch.no_grad():
                expected, policy = sequence_logps(base, batch)[0], sequence_logps(model, batch)[0]
            assert example[f"ref_{side}_logps"] == pytest.approx(float(expected), rel=1e-5), (index, side)
            assert abs(float(policy) - float(expected)) > 1e-3  # the policy is not its reference here
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir() if "safetensors" in p.name) == [
        "adapter_model.safetensors"]
    assert set(load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")) == set(before)
    after = model.adapter_state_dict("default")
    assert all(not torch.equal(after[k], before[k]) for k in before)
    assert trainer.state.log_history[0]["rewards/margins"] != 0.0


def test_resume_with_init_adapter_equals_the_straight_run(files, sft_run, tmp_path, capsys) -> None:
    """Ctrl-C at step 3 of a DPO run from an SFT adapter, then --resume: the adapter equals an uninterrupted run's
    (the frozen reference is loaded again from --init-adapter); a changed --init-adapter folder is refused."""
    import shutil

    from safetensors.torch import load_file

    init = tmp_path / "sft_adapter"
    shutil.copytree(sft_run, init)
    argv = ["train", "--task", "dpo", "--model", files["model"], "--train-data", files["train"], "--init-adapter",
            str(init), "--lr", "5e-2", "--max-steps", "5", "--batch-size", "4", "--save-every", "1", "--quiet",
            "--no-plot"]
    with ctrl_c_after_step(3):
        assert main([*argv, "--output-dir", str(tmp_path / "cut")]) == 130
    assert main([*argv, "--output-dir", str(tmp_path / "straight")]) == 0
    weights = init / "adapter_model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    from safetensors.torch import save_file

    save_file({k: v * 1.5 for k, v in tensors.items()}, weights, metadata={"format": "singlora"})
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "different inputs (tokenized data / base model / init adapter): init_adapter" in error
    weights.write_bytes(original)
    assert main([*argv, "--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    resumed, straight = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("cut",
                                                                                                           "straight"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_packed_and_padded_pairs_score_alike(files, smollm2_tokenizer) -> None:
    """--packing: the 2B sequences of a batch packed into rows (position_ids restart per sequence) give each pair's
    log-probabilities, loss and rewards of the padded batch."""
    from torch_singlora.llm.dpo import score_pairs
    from torch_singlora.llm.preference import PreferenceCollator, read_pairs, to_pair, tokenize_pairs

    torch.manual_seed(2)
    model = get_singlora_model(transformers.AutoModelForCausalLM.from_pretrained(files["model"]), SingLoRAConfig(
        r=4, target_modules="all-linear", ramp_up_steps=0, init="gaussian", init_std=0.3)).eval()
    long = to_pair({"prompt": "Count.", "chosen": "one two", "rejected": " ".join(["many"] * 60)}, "row 0")
    data = tokenize_pairs(smollm2_tokenizer, [long, *read_pairs(files["train"])[:5]], max_length=None)
    items = [data[i] for i in range(len(data))]
    padded, packed = (PreferenceCollator(smollm2_tokenizer.pad_token_id, packing=p)(items) for p in (False, True))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows: really packed
    with torch.no_grad():
        a, b = (score_pairs(model, batch, beta=0.1, loss_type="sigmoid") for batch in (padded, packed))
    for name in ("losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-4, rtol=1e-4)
