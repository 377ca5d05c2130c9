"""A validation set (``data.validation_size``) and what a run records, in the real training
loop in this process, on a tiny synthetic MNIST: 1000 training images, 100 held out, batches
of 50 (18 steps per epoch), 3 epochs. Model selection is on the validation set only, the test
set is evaluated once at the end for the final and the best model, and a resumed run keeps the
right best model, also in another run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mnistdist import checkpoint, training
from mnistdist.config import ConfigError, load_config
from mnistdist.rundir import read_metrics, read_run_record
from mnistdist.signals import Interrupted
from tests.fault_train import injected
from tests.smoke.test_train_smoke import data, overrides  # noqa: F401 - fixtures

STEPS_PER_EPOCH, EPOCHS = 18, 3
LAST = STEPS_PER_EPOCH * EPOCHS
VALIDATION = ["data.validation_size=100", f"train.epochs={EPOCHS}"]


def train(data_root: Path, run_dir: Path, *extra: str, resume: str = "auto", allow: bool = False) -> dict:
    return training.run(load_config(None, overrides(data_root, *VALIDATION, *extra)), run_dir, resume=resume,
                        allow_config_change=allow)


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def same_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def golden(one_process_env, data, tmp_path_factory) -> tuple[Path, dict, str]:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(data, run_dir, "tracking.progress=off", "tracking.plots=true")
    return run_dir, summary, out.getvalue()


def test_epochs_are_evaluated_on_the_validation_set_and_the_test_set_once_at_the_end(golden):
    run_dir, summary, out = golden
    evals = [r for r in read_metrics(run_dir) if "val_acc" in r or "test_acc" in r]
    assert [(r["epoch"], r["step"]) for r in evals] == [(e, e * STEPS_PER_EPOCH) for e in range(1, EPOCHS + 1)]
    assert all(r["val_total"] == 100 for r in evals)
    assert ["test_acc" in r for r in evals] == [False] * (EPOCHS - 1) + [True]  # no test result before the end
    last = evals[-1]
    assert last["test_total"] == 200 and len(last["confusion"]) == 10
    assert (last["test_acc"], last["best_test_acc"], last["best_step"]) == (
        summary["final_test_acc"], summary["best_test_acc"], summary["best_step"])
    lines = out.splitlines()
    assert "18 steps/epoch over 900 images (100 held out for validation)" in lines[0]
    assert [line.split()[:2] for line in lines[1:-1]] == [["epoch", f"{e}/{EPOCHS}"] for e in range(1, EPOCHS + 1)]
    assert all("val_acc" in line and "test_acc" not in line for line in lines[1:-1])
    assert lines[-1].startswith(f"finished after {LAST} steps: {run_dir / 'model.safetensors'} test_acc ")
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["accuracy.png", "confusion.png", "loss.png"]


def test_the_best_model_is_the_best_validation_result_and_its_test_result_is_reported(golden, one_process_env):
    run_dir, summary, _ = golden
    vals = [r for r in read_metrics(run_dir) if "val_acc" in r]
    best = max(vals, key=lambda r: (r["val_acc"], -r["val_loss"], -r["step"]))
    assert (summary["best_step"], summary["best_epoch"]) == (best["step"], best["epoch"])
    assert (summary["best_val_acc"], summary["best_val_loss"]) == (best["val_acc"], best["val_loss"])
    assert (summary["final_val_acc"], summary["val_total"]) == (vals[-1]["val_acc"], 100)
    assert summary["best_selected_by"] == "val_acc" and summary["best_model"] == str(run_dir / "best.safetensors")
    assert header(run_dir / "best.safetensors")["step"] == str(best["step"])
    # Its test result is that of the weights in best.safetensors (and model.safetensors' of the final).
    cfg = load_config(run_dir / "config.yaml")
    for model, key in (("best.safetensors", "best_test"), ("model.safetensors", "final_test")):
        counts = training.evaluate_model_file(cfg, run_dir / model)
        assert (counts.accuracy, counts.mean_loss) == (summary[f"{key}_acc"], summary[f"{key}_loss"])
    assert summary["best_test_correct"] == round(summary["best_test_acc"] * 200)
    assert summary["precision"] == "float32"


def test_run_json_records_what_ran(golden):
    run_dir, summary, _ = golden
    [start] = read_run_record(run_dir)
    assert start["start_step"] == 0 and start["resumed_from"] is None
    assert (start["world_size"], start["device"], start["backend"]) == (1, "cpu", "none")
    assert start["mixed_precision"] == "no"
    assert (start["precision"], start["dtype"], start["threads_per_process"]) == ("float32", "float32",
                                                                                   torch.get_num_threads())
    assert (start["training_images"], start["validation_images"], start["repeated_images_per_epoch"]) == (900, 100, 0)
    assert (start["steps_per_epoch"], start["global_batch_size"], start["per_process_batch_size"]) == (18, 50, 50)
    assert start["versions"]["torch"] == torch.__version__ and sum(start["hosts"].values()) == 1


def test_a_resumed_run_keeps_the_right_best_model_in_any_run_directory(golden, data, tmp_path,  # noqa: F811
                                                                       one_process_env):
    """Stopped mid-epoch 2 (step 30: the best so far is epoch 1's). Its checkpoint, resumed in
    another run directory with nothing left to train, gives back that best model; resumed to
    the end, the run equals the uninterrupted one bitwise, its best model included."""
    golden_dir, golden_summary, _ = golden
    # The uninterrupted run's best comes before the stop, so only a best carried through the
    # checkpoint can be the resumed run's.
    assert golden_summary["best_step"] < 30
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted), injected("step=27,action=INT"):
        train(data, run_dir, resume="never")
    stopped = checkpoint.list_checkpoints(run_dir)[0]
    assert stopped.name == "step-00000030"
    assert json.loads((stopped / "state.json").read_text())["best"]["step"] == STEPS_PER_EPOCH
    assert same_weights(stopped / "best.safetensors", run_dir / "best.safetensors")

    elsewhere = train(data, tmp_path / "elsewhere", "train.max_steps=30", resume=str(stopped))
    assert (elsewhere["steps"], elsewhere["best_step"], elsewhere["best_epoch"]) == (30, STEPS_PER_EPOCH, 1)
    assert same_weights(tmp_path / "elsewhere" / "best.safetensors", run_dir / "best.safetensors")
    assert read_run_record(tmp_path / "elsewhere")[0]["resumed_from"] == str(stopped)

    (run_dir / "best.safetensors").unlink()  # whatever happened to it: the checkpoint has it
    resumed = train(data, run_dir)
    for key in ("final_test_acc", "final_test_loss", "best_test_acc", "best_test_loss", "best_step", "best_epoch",
                "best_val_acc", "best_val_loss", "final_val_acc"):
        assert resumed[key] == golden_summary[key], key
    for name in ("model.safetensors", "best.safetensors"):
        assert same_weights(run_dir / name, golden_dir / name), name
    assert [s["start_step"] for s in read_run_record(run_dir)] == [0, 30]


def test_a_changed_validation_set_chooses_the_best_anew(data, tmp_path, one_process_env, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    train(data, run_dir, "train.max_steps=20")
    capsys.readouterr()
    summary = train(data, run_dir, "train.max_steps=20", "data.validation_size=200", allow=True)
    out = capsys.readouterr().out
    assert "the validation set changed (--allow-config-change): the best model is chosen anew" in out
    assert summary["best_selected_by"] == "none: the final model" and not (run_dir / "best.safetensors").exists()


def test_without_a_validation_set_nothing_is_chosen_on_the_test_set(data, tmp_path, one_process_env):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "best.safetensors").write_bytes(b"an earlier start's")  # not this run's: removed
    summary = training.run(load_config(None, overrides(data)), run_dir, resume="never")
    assert not (run_dir / "best.safetensors").exists()
    assert summary["best_selected_by"] == "none: the final model"
    assert summary["best_model"] == summary["model"] == str(run_dir / "model.safetensors")
    assert (summary["best_test_acc"], summary["best_step"]) == (summary["final_test_acc"], summary["steps"])
    assert not any(k.startswith(("best_val", "final_val", "best_epoch")) for k in summary)
    assert all("val_acc" not in r for r in read_metrics(run_dir))
    assert [s["validation_images"] for s in read_run_record(run_dir)] == [0]


def test_a_validation_set_as_large_as_the_training_set_is_refused(data, tmp_path, one_process_env):  # noqa: F811
    with pytest.raises(ConfigError, match=r"^data.validation_size: 1000 leaves no training images"):
        train(data, tmp_path / "run", "data.validation_size=1000")
