"""``mnistdist compare``: the table, CSV and JSON against the runs' own summary.json files."""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from mnistdist import cli
from mnistdist.tools import compare, sweep
from mnistdist.config import Config, load_config, to_yaml


def fake_run(run_dir: Path, final: float, best: float, seed: int, time_s: float = 1.5, steps: int = 600,
             world_size: int = 1, **keys) -> Path:
    """A finished run directory as training leaves it (config.yaml, summary.json)."""
    cfg = Config().to_dict()
    cfg["train"]["seed"] = seed
    for key, value in keys.items():
        section, name = key.split("__")
        cfg[section][name] = value
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "summary.json").write_text(json.dumps({
        "final_test_acc": final, "best_test_acc": best, "train_time_s": time_s, "steps": steps,
        "world_size": world_size}))
    return run_dir


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """A sweep directory: 2 variants x 3 seeds, one run unfinished."""
    path = tmp_path / "s.yaml"
    path.write_text("variants: {a: {}, b: {overrides: {train.lr: 0.5}}}\nseeds: [0, 1, 2]\n")
    s = sweep.load_sweep(path, tmp_path / "out")
    sweep.write_manifest(s)
    accs = {"a": [0.91, 0.93, 0.95], "b": [0.97, 0.98, None]}
    for e in s.elements:
        final = accs[e.params["variant"]][e.seed]
        if final is None:
            e.run_dir.mkdir()
            (e.run_dir / "config.yaml").write_text("train: {seed: 2}\n")  # started, not finished
            continue
        fake_run(e.run_dir, final, final + 0.01, e.seed, time_s=10.0 + e.seed, train__lr=0.5 if "b" in e.name else 0.1)
    return s.root


def test_sweep_groups_are_the_variants_with_stats_from_the_summaries(sweep_dir, capsys):
    assert cli.main(["compare", str(sweep_dir), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    a, b = result["groups"]
    assert a["params"] == {"variant": "a"} and b["params"] == {"variant": "b"}
    assert a["runs"] == 3 and b["runs"] == 2 and a["seeds"] == [0, 1, 2]
    assert a["final_test_acc"]["mean"] == pytest.approx(statistics.fmean([0.91, 0.93, 0.95]))
    assert a["final_test_acc"]["std"] == pytest.approx(statistics.stdev([0.91, 0.93, 0.95]))
    assert (a["final_test_acc"]["min"], a["final_test_acc"]["max"]) == (0.91, 0.95)
    assert b["best_test_acc"]["values"] == [0.98, 0.99]
    assert a["train_time_s"]["mean"] == pytest.approx(11.0) and a["steps"]["mean"] == 600
    assert len(result["left_out"]) == 1 and "b-seed2" in result["left_out"][0]
    assert "b-seed2: no summary.json (not finished?); left out" in captured.err
    assert (sweep_dir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_and_csv(sweep_dir, tmp_path, capsys):
    out_csv = tmp_path / "t.csv"
    plot = tmp_path / "p.png"
    assert cli.main(["compare", str(sweep_dir), "--csv", str(out_csv), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["variant", "runs"]
    assert lines[1].split()[:7] == ["a", "3", "93.00", "±", "2.00%", "91.00-95.00%", "94.00"]
    assert lines[2].split()[:6] == ["b", "2", "97.50", "±", "0.71%", "97.00-98.00%"]
    assert f"wrote {plot}" in lines
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [r["variant"] for r in rows] == ["a", "b"]
    assert float(rows[0]["final_test_acc_mean"]) == pytest.approx(0.93)
    assert rows[1]["seeds"] == "0 1" and rows[1]["runs"] == "2"


def test_loose_runs_are_grouped_by_the_config_keys_that_differ(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs / "x0", 0.90, 0.90, 0, train__lr=0.1, tracking__project="p1")
    fake_run(runs / "x1", 0.92, 0.92, 1, train__lr=0.1)
    fake_run(runs / "y0", 0.80, 0.81, 0, train__lr=0.2, world_size=2)
    groups = compare.group(compare.collect([runs])[0])
    # the seed and tracking keys do not make runs differ; the lr and the process count do
    assert [g.params for g in groups] == [{"train.lr": 0.1, "processes": 1}, {"train.lr": 0.2, "processes": 2}]
    assert [len(g.runs) for g in groups] == [2, 1]
    # a single run directory works too
    assert cli.main(["compare", str(runs / "y0"), "--no-plot"]) == 0
    assert "80.00 ± 0.00%" in capsys.readouterr().out
    assert not (runs / "y0" / "compare.png").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "missing: no such directory"),
    (lambda d: d, "neither a sweep directory"),
])
def test_bad_dirs_are_one_line_exit_2(tmp_path, capsys, make, message):
    assert cli.main(["compare", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_no_finished_run_is_one_line(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("{}\n")
    assert cli.main(["compare", str(tmp_path / "r")]) == 2
    assert "no finished runs to compare" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Groups are what actually differs; duplicates; what a bad run directory does


def sweep_runs(tmp_path: Path, name: str, text: str, final: float) -> Path:
    """A sweep directory whose runs all finished, each with its resolved config.yaml."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    s = sweep.load_sweep(path, tmp_path / name)
    sweep.write_manifest(s)
    for e in s.elements:
        e.run_dir.mkdir(parents=True)
        (e.run_dir / "config.yaml").write_text(to_yaml(load_config(e.config, e.overrides)))
        (e.run_dir / "summary.json").write_text(json.dumps({
            "final_test_acc": final + e.seed / 100, "best_test_acc": final + e.seed / 100, "train_time_s": 1.0,
            "steps": load_config(e.config, e.overrides).train.max_steps, "world_size": 1}))
    return s.root


def test_two_sweeps_with_other_overrides_are_two_groups(tmp_path):
    a = sweep_runs(tmp_path, "a", "overrides: {train.max_steps: 40}\ngrid: {train.lr: [0.1]}\nseeds: [0, 1]\n", 0.30)
    b = sweep_runs(tmp_path, "b", "overrides: {train.max_steps: 1500}\ngrid: {train.lr: [0.1]}\nseeds: [0, 1]\n", 0.97)
    groups = compare.group(compare.collect([a, b])[0])
    assert [g.params for g in groups] == [{"train.lr": 0.1, "train.max_steps": 40},
                                          {"train.lr": 0.1, "train.max_steps": 1500}]
    assert [g.stats("steps").values for g in groups] == [[40, 40], [1500, 1500]]


def test_one_variant_name_with_two_learning_rates_is_two_groups(tmp_path):
    a = sweep_runs(tmp_path, "a", "variants: {v: {overrides: {train.lr: 0.1}}}\nseeds: [0, 1]\n", 0.9)
    b = sweep_runs(tmp_path, "b", "variants: {v: {overrides: {train.lr: 0.01}}}\nseeds: [0, 1]\n", 0.8)
    groups = compare.group(compare.collect([a, b])[0])
    assert [g.params for g in groups] == [{"variant": "v", "train.lr": 0.1}, {"variant": "v", "train.lr": 0.01}]
    assert [len(g.runs) for g in groups] == [2, 2]


def test_a_run_given_twice_counts_once_and_copies_are_named(tmp_path, capsys):
    a = sweep_runs(tmp_path, "a", "seeds: [0, 1, 2]\n", 0.9)
    copy = tmp_path / "copy"
    shutil.copytree(a / "seed1", copy)
    runs, notes = compare.collect([a, a, a / "seed0", copy])
    assert sorted(r.run_dir.name for r in runs) == ["seed0", "seed1", "seed2"]
    assert any(f"{copy}: the same config and seed as {a / 'seed1'}" in n for n in notes), notes
    assert any("given more than once" in n for n in notes), notes
    assert cli.main(["compare", str(a), str(a), "--json", "--no-plot"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"][0]["runs"] == 3


def test_a_grid_sweep_and_a_loose_run_share_one_table(tmp_path, capsys):
    a = sweep_runs(tmp_path, "a", "grid: {train.lr: [0.1, 0.2], train.weight_decay: [0.0, 0.001]}\nseeds: [0]\n", 0.9)
    loose = fake_run(tmp_path / "loose", 0.5, 0.5, 0, train__lr=0.3)
    assert cli.main(["compare", str(a), str(loose), "--no-plot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["train.lr", "train.weight_decay", "runs"], lines
    assert [line.split()[:2] for line in lines[1:]] == [["0.1", "0.0"], ["0.1", "0.001"], ["0.2", "0.0"],
                                                        ["0.2", "0.001"], ["0.3", "0.0005"]], lines


def test_bad_manifest_entries_are_left_out_with_a_note(tmp_path):
    a = sweep_runs(tmp_path, "a", "seeds: [0, 1]\n", 0.9)
    outside = fake_run(tmp_path / "outside", 0.1, 0.1, 5)
    manifest = json.loads((a / "sweep.json").read_text())
    manifest["runs"] += [5, {"name": "x"}, {"run_dir": 7}, {"run_dir": "../outside"}, {"run_dir": str(outside)},
                         {"run_dir": "seed1", "params": [1]}]
    (a / "sweep.json").write_text(json.dumps(manifest))
    runs, notes = compare.collect([a])
    assert sorted(r.run_dir.name for r in runs) == ["seed0", "seed1"]
    assert sum("sweep.json: run entry" in n for n in notes) == 6, notes


@pytest.mark.parametrize("summary, message", [
    ({"final_test_acc": float("nan")}, "final_test_acc: must be a number in 0..1; got nan"),
    ({"final_test_acc": True}, "final_test_acc: must be a number in 0..1; got True"),
    ({"final_test_acc": 1.5}, "final_test_acc: must be a number in 0..1; got 1.5"),
    ({"final_test_acc": 0.9, "best_test_acc": "high"}, "best_test_acc: must be a number in 0..1; got 'high'"),
    ({"final_test_acc": 0.9, "steps": 10 ** 400}, "steps: must be a whole number in 0.."),
    ({"final_test_acc": 0.9, "train_time_s": -1}, "train_time_s: must be a finite number >= 0"),
    ({"final_test_acc": 0.9, "world_size": 0}, "world_size: must be a whole number in 1.."),
])
def test_a_summary_with_bad_numbers_is_left_out_with_a_note(tmp_path, capsys, summary, message):
    good = fake_run(tmp_path / "good", 0.9, 0.9, 0)
    bad = fake_run(tmp_path / "bad", 0.9, 0.9, 1)
    (bad / "summary.json").write_text(json.dumps(summary))
    assert cli.main(["compare", str(good), str(bad), "--json", "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["groups"][0]["runs"] == 1
    assert f"{bad / 'summary.json'}: {message}" in captured.err and "left out" in captured.err, captured.err


def test_a_fifo_as_summary_is_left_out_without_waiting(tmp_path, capsys):
    import os
    import threading

    good = fake_run(tmp_path / "good", 0.9, 0.9, 0)
    bad = fake_run(tmp_path / "bad", 0.9, 0.9, 1)
    (bad / "summary.json").unlink()
    os.mkfifo(bad / "summary.json")
    done = threading.Event()

    def unblock() -> None:  # a reader blocked on the FIFO would wait forever: let it go after a while
        while not done.wait(2.0):
            try:
                os.close(os.open(bad / "summary.json", os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    threading.Thread(target=unblock, daemon=True).start()
    try:
        assert cli.main(["compare", str(good), str(bad), "--no-plot"]) == 0
    finally:
        done.set()
    # (A reader that opened the FIFO would have read nothing once let go: "not JSON".)
    assert f"{bad / 'summary.json'}: not a regular file; left out" in capsys.readouterr().err


def test_a_refused_plot_leaves_no_temporary_file(tmp_path, capsys):
    run = fake_run(tmp_path / "r", 0.9, 0.9, 0)
    target = tmp_path / "a_dir"
    target.mkdir()
    assert cli.main(["compare", str(run), "--plot", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(target) in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "r"]
    assert cli.main(["compare", str(run), "--csv", str(target), "--no-plot"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "r"]
    assert list(target.iterdir()) == []
