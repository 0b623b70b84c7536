"""Fuzz targets for the other files singlora reads, and for the commands that read adapters (hypothesis engine).

- ``run_info``: a mutated ``run_info.json`` (field edits of a valid one, or raw bytes) read by
  ``runs.read_run_info`` (what ``merge`` / ``export`` / ``evaluate`` call first): a checked dict or a
  ``SingLoRAError``; a dict whose ``task`` / ``method`` / ``labels`` break the schema is a finding.
- ``checkpoint``: a training checkpoint whose metadata fields are edited (or whose bytes are flipped / cut),
  read by ``train.checkpoint.load_checkpoint``: a ``TrainingState`` or a ``SingLoRAError``, never another exception.
- ``commands``: a mutated adapter (weights or config) given to every reader at once: ``load_adapter`` (then
  ``merge_and_unload(safe=True)``), ``singlora inspect`` (through the CLI's ``main``) and ``export_lora``. Each must
  finish or refuse with ``SingLoRAError``; export must accept exactly what loading accepts (except factors its
  storage cannot hold); inspect (which has no model) must never refuse what loading accepts; nothing printed may
  hold a terminal control character.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch

from torch_singlora.errors import SingLoRAError

MORE_TARGETS = ("run_info", "checkpoint", "commands")
RUN_INFO = {"task": "classification", "method": "singlora", "base_model": "/models/base", "tokenizer": "/models/base",
            "target_modules": ["proj"], "labels": ["a", "b"], "max_length": 16, "text_column": "text",
            "label_column": "label"}


def check_run_info(campaign: Any, folder: Path, given: Any, raw: bytes) -> None:
    from torch_singlora.train.methods import METHOD_NAMES
    from torch_singlora.runs import MAX_LABELS, read_run_info
    from torch_singlora.train.registry import TASKS

    try:
        info = read_run_info(folder)
    except SingLoRAError as exc:
        return campaign.refused("run_info", exc)
    except Exception as exc:  # noqa: BLE001 - the point is to catch everything else
        return campaign.finding("run_info", f"{type(exc).__name__}: {exc}"[:200], given, raw)
    labels = info.get("labels")
    if info["task"] not in TASKS or info["method"] not in METHOD_NAMES or not isinstance(info["base_model"], str) \
            or (labels is not None and (not isinstance(labels, list) or len(labels) > MAX_LABELS)):
        return campaign.finding("run_info", "read_run_info accepted a document that breaks its schema", given, raw)
    campaign.record("run_info", "loaded")


def valid_checkpoint() -> dict[str, Any]:
    """The fields of a ``TrainingState`` as ``save_checkpoint`` writes them (one trainable tensor)."""
    from torch_singlora.train.checkpoint import TrainingState

    state = {"trainable": {"proj.A": torch.zeros(2, 2)}, "optimizer": {"state": {}, "param_groups": []},
             "scheduler": {"last_epoch": 3}, "ramp_step": 3, "rng": {"torch": torch.get_rng_state()}, "step": 3,
             "epoch": 0, "batch": 3, "skipped": 0, "log_records": 3, "base_metrics": None,
             "config": {"lr": 1e-3, "method": "singlora"}, "identity": {"data": "abc", "model": "def"}}
    assert set(state) == {f for f in TrainingState.__dataclass_fields__}
    return state


def check_checkpoint(campaign: Any, path: Path, given: Any, raw: bytes) -> None:
    from torch_singlora.train.checkpoint import TrainingState, load_checkpoint

    try:
        state = load_checkpoint(path)
    except SingLoRAError as exc:
        return campaign.refused("checkpoint", exc)
    except Exception as exc:  # noqa: BLE001
        return campaign.finding("checkpoint", f"{type(exc).__name__}: {exc}"[:200], given, raw)
    if not isinstance(state, TrainingState):
        return campaign.finding("checkpoint", f"load_checkpoint returned a {type(state).__name__}", given, raw)
    campaign.record("checkpoint", "loaded")


def _outcome(call: Callable[[], Any]) -> tuple[bool | None, str]:
    """``(True, "")`` if ``call`` finished, ``(False, message)`` on ``SingLoRAError``, ``(None, detail)`` else."""
    try:
        call()
    except SingLoRAError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"[:200]
    return True, ""


def check_commands(campaign: Any, directory: Path, given: Any, raw: bytes) -> None:
    from adapter_fixtures import FuzzModel, fresh_model

    from torch_singlora.cli import main
    from torch_singlora.export import export_lora

    model = fresh_model()

    def load_and_merge() -> None:
        model.load_adapter(directory, "new")
        with contextlib.suppress(SingLoRAError):  # an update that overflows is refused by the safe merge
            model.merge_and_unload(safe=True)

    printed = io.StringIO()

    def inspect() -> None:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = main(["inspect", str(directory)])
        if code != 0:
            raise SingLoRAError(printed.getvalue())

    loaded, _ = _outcome(load_and_merge)
    inspected, _ = _outcome(inspect)
    exported, export_error = _outcome(lambda: export_lora(directory, directory.parent / "export",
                                                         base_model=FuzzModel(), overwrite=True))
    for name, outcome in (("load/merge", loaded), ("inspect", inspected), ("export", exported)):
        if outcome is None:
            return campaign.finding("commands", f"{name} raised something other than SingLoRAError", given, raw)
    if any(ord(c) < 32 and c not in "\n" for c in printed.getvalue()):
        return campaign.finding("commands", "inspect printed a control character", given, raw)
    if loaded and not inspected:
        return campaign.finding("commands", "inspect refused an adapter that loads", given, raw)
    if loaded != exported and "would hold NaN or Inf" not in export_error:
        return campaign.finding("commands", f"export {'accepted' if exported else 'refused'} an adapter that "
                                f"loading {'refused' if exported else 'accepted'}: {export_error[:100]}", given, raw)
    if loaded:
        campaign.record("commands", "loaded")
    else:
        campaign.refused("commands", SingLoRAError("refused"))


def hypothesis_tests(campaign: Any, st: Any, values: Any, workdir: Path, config_bytes: bytes, weights_blob: bytes,
                     mutate_config: Callable[..., bytes], mutate_weights: Callable[..., bytes],
                     write_case: Callable[[Path, bytes, bytes], Path]) -> dict[str, Callable[[Any], None]]:
    """``{target: check(data)}`` for the hypothesis engine (``data``: ``st.data()``)."""
    folder = workdir / "run"
    folder.mkdir(parents=True, exist_ok=True)
    state = valid_checkpoint()

    def run_info(data: Any) -> None:
        document = dict(RUN_INFO)
        for _ in range(data.draw(st.integers(1, 3))):
            field = data.draw(st.sampled_from([*RUN_INFO, "unknown"]))
            if data.draw(st.booleans()):
                document[field] = data.draw(st.one_of(values, st.lists(st.text(max_size=3), max_size=5)))
            else:
                document.pop(field, None)
        text = json.dumps(document, allow_nan=True).encode()
        if data.draw(st.integers(0, 9)) == 7:  # not 0: hypothesis draws small values often
            text = data.draw(st.one_of(st.binary(max_size=64), st.just(text[: data.draw(st.integers(0, len(text)))])))
        (folder / "run_info.json").write_bytes(text)
        check_run_info(campaign, folder, text[:300], text)

    def checkpoint(data: Any) -> None:
        fields = dict(state)
        for _ in range(data.draw(st.integers(1, 3))):
            field = data.draw(st.sampled_from([*state, "unknown"]))
            if data.draw(st.booleans()):
                fields[field] = data.draw(st.one_of(values, st.just(torch.ones(3)), st.just({"x": torch.ones(2)})))
            else:
                fields.pop(field, None)
        buffer = io.BytesIO()
        torch.save(fields, buffer)
        blob = buffer.getvalue()
        if data.draw(st.integers(0, 4)) == 3:
            cut = data.draw(st.integers(0, len(blob)))
            blob = blob[:cut] + data.draw(st.binary(max_size=8))
        path = workdir / "checkpoint.pt"
        path.write_bytes(blob)
        check_checkpoint(campaign, path, repr(fields)[:300], blob)

    def commands(data: Any) -> None:
        if data.draw(st.booleans()):
            text, blob = mutate_config(data.draw, st, values, json.loads(config_bytes)), weights_blob
        else:
            text, blob = config_bytes, mutate_weights(data.draw, st, weights_blob)
        check_commands(campaign, write_case(workdir / "case", text, blob), (text[:150], blob[:150]), blob)

    return {"run_info": run_info, "checkpoint": checkpoint, "commands": commands}
