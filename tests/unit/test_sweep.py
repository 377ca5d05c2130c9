"""Sweep files: expansion, names, precedence, every bad file as one line before anything runs,
and ``mnistdist sweep --list/--print-run-dir/--run`` (in this process, on synthetic MNIST)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from mnistdist import cli
from mnistdist.tools import sweep
from mnistdist.config import ConfigError, load_config, to_yaml
from tests.conftest import REPO, as_one_process


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GRID = """
name: demo
config: {config}
overrides: {{train.epochs: 2, train.lr: 0.2}}
variants:
  plain: {{}}
  mse: {{overrides: {{train.loss: mse, train.lr: 0.5}}}}
grid:
  train.global_batch_size: [100, 200]
  model.final_relu: [false, true]
seeds: [3, 7]
"""


@pytest.fixture
def demo(tmp_path) -> sweep.Sweep:
    path = write(tmp_path, GRID.format(config=REPO / "configs" / "seed.yaml"))
    return sweep.load_sweep(path, tmp_path / "out")


def test_expands_variants_x_grid_x_seeds_in_file_order_with_stable_names(demo, tmp_path):
    assert len(demo.elements) == 2 * 2 * 2 * 2
    names = [e.name for e in demo.elements]
    assert names[:4] == ["plain-train.global_batch_size=100-model.final_relu=false-seed3",
                         "plain-train.global_batch_size=100-model.final_relu=false-seed7",
                         "plain-train.global_batch_size=100-model.final_relu=true-seed3",
                         "plain-train.global_batch_size=100-model.final_relu=true-seed7"]
    assert names[-1] == "mse-train.global_batch_size=200-model.final_relu=true-seed7"
    assert [e.index for e in demo.elements] == list(range(16))
    assert all(e.run_dir == (tmp_path / "out" / e.name).absolute() for e in demo.elements)
    assert demo.elements[5].params == {"variant": "plain", "train.global_batch_size": 200, "model.final_relu": False}
    assert demo.elements[5].seed == 7
    # Loading again gives the same runs (a job-array task and --list must agree).
    again = sweep.load_sweep(demo.file, tmp_path / "out")
    assert [(e.name, e.overrides) for e in again.elements] == [(e.name, e.overrides) for e in demo.elements]


def test_later_settings_win_and_each_run_resolves_to_its_own_config(demo):
    e = demo.elements[-1]  # mse, batch 200, final ReLU, seed 7
    cfg = load_config(e.config, e.overrides)
    assert cfg.train.loss == "mse" and cfg.train.lr == 0.5  # the variant beats the sweep's overrides
    assert cfg.train.epochs == 2 and cfg.train.global_batch_size == 200 and cfg.model.final_relu is True
    assert cfg.train.seed == 7
    assert cfg.train.momentum == 0.0  # from configs/seed.yaml, the sweep's config
    assert cfg.tracking.group == "demo"  # one W&B group per sweep
    assert cfg.tracking.tags == ["sweep:demo", "variant:mse", "train.global_batch_size=200",
                                 "model.final_relu=true", "seed:7"]
    plain = load_config(demo.elements[0].config, demo.elements[0].overrides)
    assert plain.train.loss == "cross_entropy" and plain.train.lr == 0.2


def test_extra_overrides_come_last_and_do_not_rename_runs(tmp_path):
    path = write(tmp_path, "seeds: [0, 1]\noverrides: {train.epochs: 3}\n")
    s = sweep.load_sweep(path, tmp_path / "out", ["train.epochs=1", "dist.device=cpu"])
    assert [e.name for e in s.elements] == ["seed0", "seed1"]
    cfg = load_config(s.elements[1].config, s.elements[1].overrides)
    assert cfg.train.epochs == 1 and cfg.dist.device == "cpu" and cfg.train.seed == 1
    assert s.elements[0].config == (REPO / "configs" / "default.yaml").resolve()  # no config: the default, as train_dist.py


def test_override_text_reads_back_to_the_value():
    for value in [0.05, 1e-5, 3, True, False, "mse", "cosine", "1e-3", "yes", "", "a b", ["x", "y,z"], "0.10"]:
        text = sweep.override_text("k.v", value)
        assert yaml.safe_load(text.split("=", 1)[1]) == value, (value, text)


@pytest.mark.parametrize("text, message", [
    ("- 1\n- 2\n", "must be a mapping with keys"),
    ("nmae: x\n", "unknown key 'nmae'; a sweep file has name, config"),
    ("name: 'a b'\n", "name: letters, digits"),
    ("config: nothere.yaml\n", "config: 'nothere.yaml' not found"),
    ("overrides: {lr: 0.1}\n", "overrides: 'lr': keys look like section.key"),
    ("overrides: {train.lr: -1}\n", "run 0 (run): train.lr: must be > 0; got -1"),
    ("overrides: {train.lrr: 1}\n", "run 0 (run): train.lrr: unknown key"),
    ("variants: {}\n", "variants: empty"),
    ("variants: {a: {cofig: x}}\n", "variants: a: unknown key 'cofig'; a variant has config, overrides"),
    ("variants: {'a/b': {}}\n", "variants: a/b: variant names use"),
    ("variants: {a: {config: missing.yaml}}\n", "variants: a: config: 'missing.yaml' not found"),
    ("grid: {train.lr: 0.1}\n", "grid: train.lr: must be a non-empty list of values; got 0.1"),
    ("grid: {train.lr: []}\n", "grid: train.lr: must be a non-empty list"),
    ("grid: {train.lr: [0.1, 0.1]}\n", "grid: train.lr: a value is listed twice"),
    ("grid: {train.lr: [0.1, 'fast']}\n", "run 1 (train.lr=fast): train.lr: must be a number"),
    ("grid: {train.seed: [1, 2]}\nseeds: [0]\n", "train.seed and seeds both set the seed"),
    ("seeds: 5\n", "seeds: must be a non-empty list of integers; got 5"),
    ("seeds: [1, true]\n", "seeds: must be a non-empty list of integers"),
    ("seeds: [1, 1]\n", "seeds: a seed is listed twice"),
    ("seeds: [-1]\n", "run 0 (seed-1): train.seed: must be in 0..4294967295"),
    ("grid: {train.lr: [0.1, 0.2], train.momentum: [0.1, 0.2]}\nseeds: [0, 1]\n"
     "variants: {" + ", ".join(f"v{i}: {{}}" for i in range(1300)) + "}\n", "expands to 10400 runs; at most 10000"),
    ("grid: {tracking.project: ['a/b', 'a~b']}\n", "would share the directory name 'tracking.project=a~b'"),
    ("seeds: [0\n", "not valid YAML at line"),
])
def test_a_bad_sweep_file_is_one_line_naming_it(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        sweep.load_sweep(path)
    assert message in str(e.value) and str(e.value).startswith(str(path)), str(e.value)
    assert "\n" not in str(e.value)


def test_a_missing_sweep_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="sweep file not found"):
        sweep.load_sweep(tmp_path / "none.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_loads(path):
    s = sweep.load_sweep(path)
    assert s.elements and len({e.name for e in s.elements}) == len(s.elements)


def test_lessons_sweep_is_the_four_configs_times_five_seeds():
    s = sweep.load_sweep(REPO / "configs" / "sweeps" / "lessons.yaml")
    assert [e.name for e in s.elements[::5]] == ["seed-seed0", "seed_no_final_relu-seed0", "mse-seed0", "default-seed0"]
    assert [e.seed for e in s.elements] == [0, 1, 2, 3, 4] * 4
    for e in s.elements[::5]:
        variant = e.params["variant"]
        expected = load_config(REPO / "configs" / f"{variant}.yaml",
                               [f"train.seed={e.seed}", "dist.threads_per_process=1"]).to_dict()
        got = load_config(e.config, e.overrides).to_dict()
        for section in ("model", "data", "train", "dist", "checkpoint"):
            assert got[section] == expected[section], (variant, section)


def test_cli_list_and_print_run_dir(demo, capsys):
    assert cli.main(["sweep", str(demo.file), "--out", str(demo.root), "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sweep demo: 16 runs (0 finished) in {demo.root}"
    assert out[1].split()[:3] == ["0", demo.elements[0].name, "-"]
    assert "sbatch --array=0-15%4" in out[-1] and f"SWEEP={demo.file}" in out[-1]
    assert cli.main(["sweep", str(demo.file), "--out", str(demo.root), "--print-run-dir", "15"]) == 0
    assert capsys.readouterr().out.strip() == str(demo.elements[15].run_dir)


@pytest.mark.parametrize("args, message", [
    (["--print-run-dir", "16"], "no run 16: the sweep has 16 runs (0-15)"),
    (["--run", "-1"], "no run -1"),
    (["--list", "train.lrr=1"], "train.lrr: unknown key"),
])
def test_cli_errors_are_one_line_exit_2(demo, capsys, args, message):
    assert cli.main(["sweep", str(demo.file), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_cli_needs_one_action(demo, capsys):
    assert pytest.raises(SystemExit, cli.main, ["sweep", str(demo.file)]).value.code == 2
    assert "one of the arguments --list --run --local --print-run-dir is required" in capsys.readouterr().err


@pytest.fixture
def one_process(monkeypatch):
    as_one_process(monkeypatch)


def test_run_trains_one_element_and_skips_it_once_finished(tmp_path, synthetic_mnist, one_process, capsys):
    path = write(tmp_path, f"""
overrides: {{data.root: {synthetic_mnist}, data.download: false, dist.device: cpu, tracking.mode: disabled,
            tracking.tensorboard: false, tracking.plots: false, tracking.progress: off, train.epochs: 1,
            train.global_batch_size: 50}}
grid: {{train.lr: [0.05, 0.1]}}
""")
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out), "--run", "1"]) == 0
    s = sweep.load_sweep(path, out)
    assert [e.finished for e in s.elements] == [False, True]
    summary = json.loads((s.elements[1].run_dir / "summary.json").read_text())
    assert summary["steps"] == 20
    saved = yaml.safe_load((s.elements[1].run_dir / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.1 and saved["tracking"]["group"] == "s"
    manifest = sweep.read_manifest(out)
    assert manifest["name"] == "s" and [r["run_dir"] for r in manifest["runs"]] == ["train.lr=0.05", "train.lr=0.1"]
    assert manifest["runs"][1]["params"] == {"train.lr": 0.1}
    capsys.readouterr()
    model = s.elements[1].run_dir / "model.safetensors"
    before = model.stat().st_mtime_ns
    assert cli.main(["sweep", str(path), "--out", str(out), "--run", "1"]) == 0
    assert "run 1 (train.lr=0.1) finished before" in capsys.readouterr().out
    assert model.stat().st_mtime_ns == before
    assert cli.main(["sweep", str(path), "--out", str(out), "--list"]) == 0
    assert "(1 finished)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# What is in the sweep directory: stale, running elsewhere, finished by another job


def finish(e: sweep.Element, *changes: str, summary: bool = True) -> None:
    """A run of ``e`` as training leaves it (config.yaml; summary.json when ``summary``),
    trained with the overrides ``changes`` on top of the element's own."""
    e.run_dir.mkdir(parents=True, exist_ok=True)
    (e.run_dir / "config.yaml").write_text(to_yaml(load_config(e.config, [*e.overrides, *changes])))
    if summary:
        (e.run_dir / "summary.json").write_text(json.dumps({"final_test_acc": 0.9, "steps": 10}))


def test_a_changed_sweep_file_makes_its_finished_runs_stale_never_done(tmp_path, capsys):
    path = write(tmp_path, "overrides: {train.epochs: 1}\nseeds: [0, 1]\n")
    out = tmp_path / "out"
    for e in sweep.load_sweep(path, out).elements:
        finish(e)
    path.write_text("overrides: {train.epochs: 2}\nseeds: [0, 1]\n")
    args = ["sweep", str(path), "--out", str(out)]
    assert cli.main([*args, "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("sweep s: 2 runs (0 finished, 2 stale)"), listed
    assert [line.split()[2] for line in listed[1:3]] == ["stale", "stale"]
    assert any("train.epochs: 1 -> 2" in line for line in listed), listed
    for action in (["--run", "1"], ["--print-run-dir", "1"], ["--local"]):
        assert cli.main([*args, *action]) == 2, action
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "train.epochs: 1 -> 2" in err and "--out" in err and "\n" not in err, (action, err)
        assert captured.out == "", (action, captured.out)
    assert not (out / "sweep.json").exists()  # nothing was started


def test_bookkeeping_and_placement_changes_leave_a_run_finished(tmp_path, capsys):
    path = write(tmp_path, "overrides: {train.epochs: 1}\nseeds: [0]\n")
    out = tmp_path / "out"
    [e] = sweep.load_sweep(path, out).elements
    finish(e, "dist.device=cpu", "dist.threads_per_process=2", "tracking.project=other", "checkpoint.every_steps=5",
           "data.root=/elsewhere", "train.log_every_steps=7")
    assert cli.main(["sweep", str(path), "--out", str(out), "--list"]) == 0
    assert "(1 finished)" in capsys.readouterr().out
    assert cli.main(["sweep", str(path), "--out", str(out), "--run", "0"]) == 0
    assert "finished before" in capsys.readouterr().out


def test_an_interrupted_run_is_stale_only_when_its_checkpoint_could_not_resume(tmp_path, capsys):
    path = write(tmp_path, "overrides: {train.epochs: 1}\nseeds: [0, 1]\n")
    out = tmp_path / "out"
    e0, e1 = sweep.load_sweep(path, out).elements
    path.write_text("overrides: {train.epochs: 2, train.max_steps: 30}\nseeds: [0, 1]\n")
    finish(e0, summary=False)  # epochs changed: resuming would be refused
    finish(e1, "train.epochs=2", summary=False)  # only max_steps changed: resuming applies it
    assert cli.main(["sweep", str(path), "--out", str(out), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in listed[1:3]] == ["stale", "started"], listed


def hold(run_dir: Path, holder: str = "pid 4242 on elsewhere since 2026-12-01 10:00:00"):
    """Hold ``run_dir``'s lock as a training job does (rundir.claim); returns the open file."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(holder + "\n")
    f.flush()
    return f


def fake_runs(monkeypatch, code: str = "pass") -> list[int]:
    """``run_local`` starts ``python -c code`` for each run instead of training; returns the
    indices started."""
    started: list[int] = []

    def command(s, index, processes, extra=()):
        started.append(index)
        return [sys.executable, "-c", code, str(s.elements[index].run_dir)]

    monkeypatch.setattr(sweep, "element_command", command)
    return started


def test_a_run_held_by_another_job_is_running_elsewhere_not_failed(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, "seeds: [0, 1, 2]\n")
    out = tmp_path / "out"
    s = sweep.load_sweep(path, out)
    finish(s.elements[0])
    lock = hold(s.elements[1].run_dir)
    try:
        started = fake_runs(monkeypatch)
        assert cli.main(["sweep", str(path), "--out", str(out), "--list"]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert [line.split()[2] for line in listed[1:4]] == ["finished", "running", "-"], listed
        assert cli.main(["sweep", str(path), "--out", str(out), "--local"]) == 0
        printed = capsys.readouterr().out
    finally:
        lock.close()
    assert started == [2]
    assert "[2/3] seed1: running elsewhere (pid 4242 on elsewhere since 2026-12-01 10:00:00)" in printed, printed
    assert "1 trained, 1 skipped (finished before), 1 running elsewhere, 0 failed" in printed, printed


def test_a_run_another_job_took_or_finished_meanwhile_is_not_failed(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, "seeds: [0, 1]\n")
    out = tmp_path / "out"
    s = sweep.load_sweep(path, out)
    # Run 0: another job claimed it between the check and our child's start (our child is refused).
    # Run 1: another job finished it meanwhile (our child is refused, and then summary.json is there).
    fake_runs(monkeypatch, "import pathlib, sys\nd = pathlib.Path(sys.argv[1])\n"
                           "if d.name == 'seed1': d.mkdir(parents=True); (d / 'summary.json').write_text('{}')\n"
                           "sys.exit(2)")
    holders = iter([None, "pid 7 on other since 2026-12-01 10:00:00", None, None])
    monkeypatch.setattr(sweep, "lock_holder", lambda run_dir: next(holders))
    assert cli.main(["sweep", str(path), "--out", str(out), "--local"]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] seed0: running elsewhere (pid 7 on other" in printed, printed
    assert "[2/2] seed1: finished by another job meanwhile" in printed, printed
    assert "0 trained, 1 skipped (finished before), 1 running elsewhere, 0 failed" in printed, printed


def test_sigkill_of_a_local_sweep_stops_the_run_it_was_running(tmp_path):
    """The running run gets SIGTERM (a checkpointed stop) when the sweep dies, however it dies."""
    import os
    import signal
    import subprocess
    import time

    path = write(tmp_path, "seeds: [0]\n")
    pid_file, signal_file = tmp_path / "child.pid", tmp_path / "child.signal"
    child = (f"import os, signal, sys, time\n"
             f"def stop(signum, frame):\n"
             f"    open({str(signal_file)!r}, 'w').write(signal.Signals(signum).name)\n"
             f"    sys.exit(75)\n"
             f"signal.signal(signal.SIGTERM, stop)\n"
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
             f"time.sleep(120)\n")
    harness = ("import sys\nfrom mnistdist.tools import sweep\n"
               f"sweep.element_command = lambda s, i, p, extra=(): [sys.executable, '-c', {child!r}]\n"
               f"sweep.run_local(sweep.load_sweep({str(path)!r}, {str(tmp_path / 'out')!r}))\n")
    parent = subprocess.Popen([sys.executable, "-c", harness], cwd=REPO, stdout=subprocess.DEVNULL)
    pid = None
    try:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                pid = int(pid_file.read_text())
                break
            time.sleep(0.05)
        assert pid is not None, "the fake run did not start"
        parent.kill()
        parent.wait()
        for _ in range(200):  # (the file exists a moment before its name is written into it)
            if signal_file.is_file() and signal_file.read_text():
                break
            time.sleep(0.05)
        assert signal_file.is_file() and signal_file.read_text() == "SIGTERM"
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------
# Bad names and places, duplicates, one run's lookup


@pytest.mark.parametrize("text, message", [
    ("name: " + "n" * 256 + "\n", "name: at most 255 bytes"),
    ("grid: {tracking.project: ['" + "p" * 250 + "']}\n", "run 0: its directory name tracking.project=ppp"),
    ("grid: {train.lr: [1, 1.0]}\n", "grid: train.lr: a value is listed twice"),
    ("grid: {train.lr: [1e-3, 1.0e-3]}\n", "grid: train.lr: a value is listed twice"),
    ("grid: {train.lr: [0.001, '1e-3']}\n", "runs 0 (train.lr=0.001) and 1 (train.lr=1e-3) train the same config"),
    ("variants: {a: {}, b: {overrides: {tracking.project: x}}}\n", "runs 0 (a) and 1 (b) train the same config"),
    ("grid: {tracking.run_name: [2024-01-01, b]}\n", "grid: tracking.run_name: 2024-01-01 is a date; quote it"),
    ("overrides: {tracking.run_name: 2024-01-01}\n", "overrides: tracking.run_name: 2024-01-01 is a date; quote it"),
])
def test_more_bad_sweep_files_are_one_line(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_an_out_that_cannot_hold_runs_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from mnistdist import rundir

    path = write(tmp_path, "seeds: [0]\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below"):
        for action in (["--run", "0"], ["--local"]):
            assert cli.main(["sweep", str(path), "--out", str(out), *action]) == 2
            err = capsys.readouterr().err.strip()
            assert f"sweep directory {out}: cannot write there" in err and "--out DIR" in err, err
            assert "\n" not in err, err

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(rundir, "write_text_atomic", read_only)
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "ro"), "--run", "0"]) == 2
    assert "cannot write there (Read-only file system)" in capsys.readouterr().err


def test_one_runs_lookup_resolves_only_its_own_config(tmp_path, capsys, monkeypatch):
    values = ", ".join(str(0.01 * (i + 1)) for i in range(10))
    path = write(tmp_path, f"grid: {{train.lr: [{values}], train.weight_decay: [{values}]}}\nseeds: [{values}]\n"
                 .replace(f"seeds: [{values}]", "seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"))
    resolved = []
    real = sweep.load_config
    monkeypatch.setattr(sweep, "load_config", lambda *a, **k: resolved.append(a) or real(*a, **k))
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out), "--print-run-dir", "999"]) == 0
    assert capsys.readouterr().out.strip() == str(out.absolute() / "train.lr=0.1-train.weight_decay=0.1-seed9")
    assert len(resolved) == 1
