"""``mnistdist compare``: the table, CSV and JSON against the runs' own summary.json files."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from mnistdist import cli
from mnistdist.tools import compare, sweep
from mnistdist.config import Config


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
