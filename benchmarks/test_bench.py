"""The benchmark (benchmarks/bench.py): its pure pieces, and one very short real run.

No test here asserts a time: the machine's speed is not the code's correctness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench
from benchmarks.bench import RunResult, Variant
from tests.conftest import REPO, child_env


def run_result(epoch_times, acc=0.9, rss=(500.0,), startup=3.0, wall=10.0) -> RunResult:
    return RunResult(
        epoch_times_s=list(epoch_times),
        samples_per_s=[60000 / t for t in epoch_times],
        test_acc_by_epoch=[acc] * len(epoch_times),
        final_test_acc=acc,
        startup_s=startup,
        peak_rss_mb_per_rank=list(rss),
        peak_cuda_mb_per_rank=[None] * len(rss),
        wall_s=wall,
    )


def test_stats_median_min_max():
    assert bench.stats([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bench.stats([4.0, 1.0, 2.0, 3.0])["median"] == 2.5
    assert bench.stats([None, 5.0])["n"] == 1
    assert bench.stats([]) == {"median": None, "min": None, "max": None, "n": 0}


def test_aggregate_drops_warmup_epochs_and_pools_runs():
    v = Variant("b", "tensor", 1)
    runs = [run_result([9.0, 1.0, 1.2], rss=(500,)), run_result([8.0, 0.8, 1.1], rss=(520,))]
    agg = bench.aggregate(v, runs, warmup_epochs=1)
    assert agg["epoch_time_s"] == {"median": 1.05, "min": 0.8, "max": 1.2, "n": 4}
    assert agg["warmup_epoch_s"]["n"] == 2 and agg["warmup_epoch_s"]["median"] == 8.5
    assert agg["samples_per_s"]["n"] == 4
    assert agg["peak_rss_mb_per_process"] == [520] and agg["peak_rss_mb"] == 520
    assert agg["peak_cuda_mb_per_process"] is None
    assert agg["epochs_per_run"] == 3 and agg["warmup_epochs_per_run"] == 1 and agg["runs"] == 2


def test_aggregate_keeps_one_measured_epoch_when_runs_are_short():
    agg = bench.aggregate(Variant("x", "x"), [run_result([2.0])], warmup_epochs=1)
    assert agg["epoch_time_s"]["n"] == 1 and agg["warmup_epoch_s"]["n"] == 0


def test_aggregate_peak_memory_is_per_process():
    runs = [run_result([1, 1], rss=(600, 610)), run_result([1, 1], rss=(650, 590))]
    assert bench.aggregate(Variant("c", "c", 2), runs, 1)["peak_rss_mb_per_process"] == [650, 610]


def test_ratios_and_targets():
    results = {name: {"epoch_time_s": {"median": t}} for name, t in {"a": 15.0, "b": 0.75, "c": 1.5}.items()}
    r = bench.compute_ratios(results)
    assert r["speedup_b_over_a"] == pytest.approx(20.0)
    assert r["epoch_time_ratio_c_over_b"] == pytest.approx(2.0)
    assert r["speedup_met"] is True and r["ratio_met"] is True
    results["c"]["epoch_time_s"]["median"] = 3.0
    assert bench.compute_ratios(results)["ratio_met"] is False
    only_b = bench.compute_ratios({"b": results["b"]})
    assert only_b["speedup_b_over_a"] is None and only_b["speedup_met"] is None
    assert only_b["epoch_time_ratio_c_over_b"] is None


def test_per_round_ratios_pair_runs_of_the_same_round():
    v = bench.builtin_variants()
    results = {
        "b": bench.aggregate(v["b"], [run_result([9, 1.0, 1.2]), run_result([9, 2.0, 2.0])], 1),
        "c": bench.aggregate(v["c"], [run_result([9, 2.2, 2.2]), run_result([9, 5.0, 5.0])], 1),
    }
    r = bench.per_round_ratios(results, "c", "b")
    assert r["n"] == 2 and r["min"] == pytest.approx(2.0) and r["max"] == pytest.approx(2.5)
    assert bench.compute_ratios(results)["epoch_time_ratio_c_over_b_per_round"]["median"] == pytest.approx(2.25)
    assert bench.per_round_ratios(results, "a", "b")["n"] == 0
    assert "per round: median 2.25 [2.00-2.50] over 2" in bench.format_table(
        {"variants": results, "ratios": bench.compute_ratios(results)})


def test_parse_variant():
    v = bench.parse_variant("compiled:dist.compile=reduce-overhead,dist.mixed_precision=bf16")
    assert (v.name, v.nproc, v.overrides) == ("compiled", 1, ["dist.compile=reduce-overhead", "dist.mixed_precision=bf16"])
    v = bench.parse_variant("eager3@3:data.pipeline=tensor,train.global_batch_size=300")
    assert (v.name, v.nproc) == ("eager3", 3)
    assert bench.parse_variant("plain:").overrides == []
    for bad in ("nocolon", ":train.lr=1", "b:train.lr=1", "x@0:train.lr=1", "x@two:train.lr=1", "x:lr=1",
                "x:train.lr", "x:train.compile=true", "x:train.lr=-1", "x@3:train.global_batch_size=200"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad)


def test_build_command_single_and_launcher(tmp_path):
    variants = bench.builtin_variants()
    one = bench.build_command(variants["a"], Path("cfg.yaml"), tmp_path, 2, "cpu", ["train.max_steps=5"])
    assert one[0] == sys.executable and one[1].endswith("train_dist.py")
    assert one[-4:] == ["data.pipeline=torchvision", "train.max_steps=5", "train.epochs=2", "dist.device=cpu"]
    two = bench.build_command(variants["c"], Path("cfg.yaml"), tmp_path, 3, "cpu", [])
    assert "--config_file" in two and str(bench.CPU_LAUNCH_CONFIG) in two
    assert two[two.index("--num_processes") + 1] == "2"
    assert "train.epochs=3" in two


def test_parse_args_defaults_and_errors(capsys):
    args = bench.parse_args([])
    assert args.which_list == ["a", "b", "c"] and args.extra_variants == [] and args.device == "cpu"
    assert bench.parse_args(["--device", "cuda"]).which_list == ["a", "b"]
    args = bench.parse_args(["--which", "b", "--variant", "compiled:train.lr=0.1"])
    assert args.which_list == ["b"] and args.extra_variants[0].name == "compiled"
    for bad in (["--which", "z"], ["--reps", "0"], ["--which", "", ]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def fake_report() -> dict:
    variants = bench.builtin_variants(epochs_a=2)
    results = {
        "a": bench.aggregate(variants["a"], [run_result([16.0, 15.0], acc=0.913)], 1),
        "b": bench.aggregate(variants["b"], [run_result([1.0, 0.7, 0.72], acc=0.9254)], 1),
        "c": bench.aggregate(variants["c"], [run_result([2.0, 1.5, 1.6], acc=0.9254, rss=(700, 690))], 1),
    }
    return {"date": "2026-11-28T00:00:00+00:00", "machine": {"nproc": 2, "cpu_model": "CPU",
            "load_avg_before": [0.1, 0.2, 0.3], "load_avg_after": [1.0, 1.0, 1.0]},
            "variants": results, "ratios": bench.compute_ratios(results)}


def test_format_table_shows_every_variant_and_the_ratios():
    text = bench.format_table(fake_report())
    lines = text.splitlines()
    assert any(line.startswith("a ") and "15.00 [15.00-15.00]" in line and "91.30% after 2" in line for line in lines)
    assert any(line.startswith("c ") and "700/690" in line for line in lines)
    assert "speed-up b/a (epoch time a / b): 21.1x  (target >= 10x: met)" in text
    assert "epoch time c/b: 2.18  (target <= 2.5: met)" in text
    assert "2 CPUs, CPU" in text


def test_busy_machine_is_reported():
    report = fake_report()
    assert "WARNING" not in bench.format_table(report)
    report["machine"].update(others_cpus=bench.stats([0.1, 0.9]), busy=True)
    text = bench.format_table(report)
    assert "other processes kept 0.50 CPUs busy during a run (median; max 0.90)" in text
    assert "WARNING: the machine was busy" in text


def test_others_cpus():
    assert bench.others_cpus(busy_s=5.0, own_s=4.0, wall_s=2.0) == 0.5
    assert bench.others_cpus(busy_s=3.9, own_s=4.0, wall_s=2.0) == 0.0  # clock granularity
    assert bench.others_cpus(None, 1.0, 1.0) is None
    busy = bench.machine_busy_cpu_s()
    assert busy is None or busy > 0


def test_run_bench_round_robin_and_busy_retries(monkeypatch, tmp_path):
    calls, busy = [], iter([0.9, 0.0, 0.0, 0.9, 0.9, 0.0])

    def fake_run_once(variant, config, workdir, tag, epochs, device, extra, timeout_s):
        calls.append((variant.name, tag, epochs))
        result = run_result([2.0, 1.0])
        result.others_cpus = next(busy)
        return result

    monkeypatch.setattr(bench, "run_once", fake_run_once)
    monkeypatch.setattr(bench, "wait_until_idle", lambda max_wait_s: 0.0)
    variants = [Variant("b", "b"), Variant("x", "x", epochs=5)]
    report = bench.run_bench(variants, config=REPO / "configs" / "seed.yaml", reps=2, epochs=3, warmup_epochs=1,
                             device="cpu", extra_overrides=[], timeout_s=1, workdir=tmp_path, retry_busy=2,
                             log=lambda line: None)
    # b rep0 busy -> retried; x rep0 ok; b rep1 busy -> retried (last retry); its retry busy but kept.
    assert [c[:2] for c in calls] == [("b", "rep0"), ("b", "rep0-retry1"), ("x", "rep0"),
                                      ("b", "rep1"), ("b", "rep1-retry1"), ("x", "rep1")]
    assert [c[2] for c in calls if c[0] == "x"] == [5, 5]
    assert report["machine"]["discarded_busy_runs"] == 2
    assert report["machine"]["busy"] is True  # one kept run was still busy
    assert report["variants"]["b"]["runs"] == 2 and report["ratios"]["speedup_b_over_a"] is None


def test_to_json_round_trips():
    report = fake_report()
    assert json.loads(bench.to_json(report)) == json.loads(json.dumps(report))


def test_read_run(tmp_path):
    lines = [{"step": 50, "train_loss": 1.0, "samples_per_s": 1.0},
             {"epoch": 1, "step": 300, "test_acc": 0.9, "epoch_time_s": 1.5, "samples_per_s": 40000.0},
             {"epoch": 2, "step": 600, "test_acc": 0.92, "epoch_time_s": 0.8, "samples_per_s": 75000.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "summary.json").write_text(json.dumps({"final_test_acc": 0.92}))
    r = bench.read_run(tmp_path, wall_s=12.0)
    assert r.epoch_times_s == [1.5, 0.8] and r.samples_per_s == [40000.0, 75000.0]
    assert r.test_acc_by_epoch == [0.9, 0.92] and r.final_test_acc == 0.92
    assert r.wall_s == 12.0


def test_memory_sampler_finds_the_largest_processes_of_the_tree():
    """A parent holding ~10 MB starts a child that holds ~300 MB: the child is the 'worker'."""
    code = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'b = bytearray(300 * 2**20); import time; time.sleep(1.5)']); "
            "child.wait()")
    proc = subprocess.Popen([sys.executable, "-c", code])
    sampler = bench.MemorySampler(proc.pid, gpu=False)
    proc.wait(timeout=60)
    rss, gpu = sampler.stop(nproc=1)
    assert len(rss) == 1 and 280 < rss[0] < 400, rss
    assert gpu == [None]


@pytest.mark.slow  # a real subprocess run on real MNIST
def test_smoke_run_writes_table_and_json(tmp_path):
    """One real, very short run of variant b (20 steps) through the command line."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--which", "b", "--epochs", "1", "--reps", "1",
         "--set", "train.max_steps=20", "--json", str(out)],
        check=False, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "tensor pipeline, 1 process" in result.stdout
    report = json.loads(out.read_text())
    b = report["variants"]["b"]
    assert b["epoch_time_s"]["n"] == 1 and b["epoch_time_s"]["median"] > 0
    assert b["startup_s"]["median"] > 0
    assert b["peak_rss_mb"] > 200  # torch and MNIST: measured from outside, by the benchmark
    assert b["others_cpus"]["n"] in (0, 1)
    assert 0 < b["test_acc"] <= 1
    assert report["ratios"]["speedup_b_over_a"] is None


def test_startup_rounds_run_every_row_in_turn_and_subtract_that_rounds_bare_import(monkeypatch, tmp_path):
    calls = []
    fake = iter([2.0, 3.5, 3.6, 7.0, 4.0, 9.0,   # round 1: bare, floor, current 1p/2p, old 1p/2p
                 2.2, 3.7, 3.4, 6.8, 4.4, 8.0])  # round 2

    def time_until(cmd, cwd, ready, timeout_s, log_path):
        calls.append((cmd, cwd, ready))
        return next(fake)

    monkeypatch.setattr(bench, "time_until", time_until)
    monkeypatch.setattr(bench, "machine_info", lambda device: {})
    old = tmp_path / "old"
    report = bench.run_startup({"current": bench.REPO, "old": old}, reps=2, config=Path("c.yaml"), device="cpu",
                               workdir=tmp_path, timeout_s=10, log=lambda line: None)
    assert report["startup_s_all_rounds"]["current 1p"] == [3.6, 3.4]
    assert report["over_bare_s"]["old 2p"]["median"] == pytest.approx((7.0 + 5.8) / 2)
    assert report["over_bare_s"][bench.FLOOR]["median"] == pytest.approx(1.5)
    assert calls[0][0][-1].startswith("import torch;") and calls[0][2] == bench.REFERENCE_DONE
    old_two = calls[5][0]
    assert calls[5][1] == old and str(old / "train_dist.py") in old_two and "--num_processes" in old_two
    assert "train.max_steps=1" in old_two and calls[5][2] == bench.READY_LINE
    text = bench.format_startup(report)
    assert "current 1p" in text and "old 2p" in text and "bare+optimizer" in text


def test_time_until_a_line_and_failures(tmp_path):
    code = "import time; time.sleep(0.2); print('ready now', flush=True); time.sleep(0.3)"
    t = bench.time_until([sys.executable, "-c", code], REPO, "ready", 60, tmp_path / "log")
    assert 0.2 <= t and "ready now" in (tmp_path / "log").read_text()
    with pytest.raises(RuntimeError, match="no 'ready' line"):
        bench.time_until([sys.executable, "-c", "print('x')"], REPO, "ready", 60, tmp_path / "log")
    with pytest.raises(RuntimeError, match="exit 3"):
        bench.time_until([sys.executable, "-c", "raise SystemExit(3)"], REPO, None, 60, tmp_path / "log")


def test_parse_args_startup_checkouts(tmp_path):
    (tmp_path / "train_dist.py").write_text("")
    args = bench.parse_args(["--startup", "--checkout", f"old={tmp_path}"])
    assert args.startup and args.checkouts == {"current": bench.REPO, "old": tmp_path.resolve()}
    for bad in (["--checkout", "old"], ["--checkout", f"current={tmp_path}"], ["--checkout", f"x={tmp_path / 'nope'}"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--startup", *bad])
