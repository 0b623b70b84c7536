"""``--report-to``: every record of metrics.jsonl reaches each tracker named, read back from what the tracker wrote
(TensorBoard's event files, MLflow's store, the offline wandb run file, trackio's database); several at once; each
imported only when named; a tracker failing mid-run is dropped with a warning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from torch_singlora import SingLoRAError
from torch_singlora.cli import main
from torch_singlora.train import tracking

pytest.importorskip("transformers")

from conftest import save_tiny_chat_llama  # noqa: E402


def _numbers(records: list[dict]) -> dict[tuple[str, int], float]:
    """``{(tag, step): value}`` of every number in the metrics.jsonl records, under Trainer's tag names."""
    found = {}
    for record in records:
        for tag, value in tracking.tags(record).items():
            if tracking.is_number(value):
                found[tag, record["step"]] = float(value)
    return found


def _wandb_history(path) -> list[dict]:
    """The history rows of an offline wandb run file (LevelDB log records of wandb's protobuf ``Record``)."""
    from wandb.proto import wandb_internal_pb2

    data, position, chunk, rows = path.read_bytes(), 7, b"", []  # 7: the ":W&B" header
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if kind == 0:
            break
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_tokenizer):
    """One SFT run (evaluations with sample generations) reporting to the four trackers at once, offline."""
    for module in ("tensorboard", "mlflow", "wandb", "trackio"):
        pytest.importorskip(module)
    root = tmp_path_factory.mktemp("tracking")
    save_tiny_chat_llama(root / "model", smollm2_tokenizer)
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("red", "green", "blue", "cyan", "pink", "gray", "teal", "gold")]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    patch = pytest.MonkeyPatch()
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio"),
                        "TRACKIO_PROJECT": "singlora-test"}.items():
        patch.setenv(name, value)
    for name in ("MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "TRACKIO_SPACE_ID"):
        patch.delenv(name, raising=False)
    try:
        assert main(["train", "--task", "sft", "--model", str(root / "model"), "--train-data",
                     str(root / "train.jsonl"),
                     "--eval-split", "0.25", "--output-dir", str(root / "out"), "--r", "2", "--max-steps", "4",
                     "--batch-size", "2", "--lr", "5e-2", "--eval-every", "2", "--eval-generations", "2",
                     "--max-new-tokens", "3", "--quiet", "--no-plot", "--name", "tracked",
                     "--report-to", "tensorboard, mlflow,wandb,trackio"]) == 0
    finally:
        patch.undo()
    out = root / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "out": out, "records": records, "numbers": _numbers(records)}


def test_tensorboard_events_equal_metrics_jsonl(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log_dir,) = (run["out"] / "runs").iterdir()
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {(tag, event.step): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}
    numbers = run["numbers"]
    assert {"train/loss", "train/lr", "train/u", "train/grad_norm", "eval/loss", "eval/exact_match"} <= {
        tag for tag, _ in numbers}
    assert scalars.keys() == numbers.keys()
    for key, value in numbers.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key  # stored as float32
    texts = {(tag, event.step): event.tensor_proto.string_val[0].decode()
             for tag in events.Tags()["tensors"] for event in events.Tensors(tag)}
    evaluations = [r for r in run["records"] if r["kind"] == "eval"]
    assert [step for tag, step in texts if tag == "eval/samples/text_summary"] == [r["step"] for r in evaluations]
    for record in evaluations:
        table = texts["eval/samples/text_summary", record["step"]]
        for sample in record["samples"]:
            assert f"| {sample['prompt']} | {sample['reference']} | {sample['generated']} |" in table
    assert '"report_to": "tensorboard, mlflow,wandb,trackio"' in texts["args/text_summary", 0]


def test_mlflow_wandb_trackio_hold_the_same_numbers(run) -> None:
    from mlflow.tracking import MlflowClient

    numbers = run["numbers"]
    client = MlflowClient(tracking_uri=(run["out"] / "mlruns").resolve().as_uri())
    (experiment,) = client.search_experiments()
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "tracked" and mlflow_run.data.params["r"] == "2"
    logged = {(tag, m.step): m.value for tag in mlflow_run.data.metrics for m in client.get_metric_history(
        mlflow_run.info.run_id, tag)}
    assert logged == pytest.approx(numbers)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "eval/samples")}
    assert artifacts == {f"eval/samples/step_{r['step']}.json" for r in run["records"] if r["kind"] == "eval"}

    (run_file,) = (run["out"] / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(run_file)
    from_wandb = {(tag, row["train/global_step"]): value for row in rows for tag, value in row.items()
                  if not tag.startswith("_") and tag != "train/global_step" and tracking.is_number(value)
                  and not tag.startswith("eval/samples/")}
    assert from_wandb == pytest.approx(numbers)

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("singlora-test", "tracked")
    from_trackio = {(tag, row["step"]): value for row in logs for tag, value in row.items()
                    if tag not in ("step", "timestamp") and tracking.is_number(value)}
    assert from_trackio == pytest.approx(numbers)


def test_report_to_names_and_refusals(monkeypatch) -> None:
    assert tracking.parse_report_to("none") == [] and tracking.parse_report_to("") == []
    assert tracking.parse_report_to("tensorboard wandb") == ["tensorboard", "wandb"]
    monkeypatch.setattr(tracking, "installed", lambda name: name != "trackio")
    assert tracking.parse_report_to("all") == ["tensorboard", "wandb", "mlflow"]
    with pytest.raises(SingLoRAError, match=r"--report-to trackio: not installed \(pip install trackio\)"):
        tracking.parse_report_to("tensorboard,trackio")
    with pytest.raises(SingLoRAError, match="unknown: comet"):
        tracking.parse_report_to("tensorboard,comet")
    with pytest.raises(SingLoRAError, match="named twice"):
        tracking.parse_report_to("wandb,wandb")


def test_failing_tracker_is_dropped_with_a_warning(monkeypatch, tmp_path, capsys) -> None:
    seen = []

    class Flaky(tracking.Tracker):
        name = "flaky"

        def __init__(self, folder, run_name, config) -> None:
            pass

        def log(self, values, step) -> None:
            seen.append(step)
            if step == 2:
                raise OSError("disk full")

    monkeypatch.setitem(tracking.CLASSES, "tensorboard", Flaky)
    trackers = tracking.Trackers(["tensorboard"], tmp_path, "run", {})
    for step in (1, 2, 3):
        trackers.log({"kind": "train", "step": step, "loss": 1.0})
    assert seen == [1, 2] and "--report-to flaky failed (OSError: disk full)" in capsys.readouterr().err

    class Broken(tracking.Tracker):
        def __init__(self, folder, run_name, config) -> None:
            raise ValueError("no such project")

    monkeypatch.setitem(tracking.CLASSES, "wandb", Broken)
    with pytest.raises(SingLoRAError, match="--report-to wandb: cannot start: ValueError: no such project"):
        tracking.Trackers(["wandb"], tmp_path, "run", {})


def test_trackers_are_imported_only_when_named() -> None:
    code = ("import sys; import torch_singlora.cli, torch_singlora.train.loop; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'trackio', 'tensorboard') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr
