"""Benchmark the training pipelines in one run: ``python -m benchmarks.bench``.

Every measurement is a real training run of ``train_dist.py`` started as a subprocess (through
``accelerate launch`` for several processes), with its own temporary run directory. Epoch times
and samples/s come from the evaluation lines of ``metrics.jsonl`` (training only: evaluation and
checkpointing are not inside ``epoch_time_s``), test accuracy from ``summary.json``. Peak memory
is measured from outside, like start-up: the resident memory of every process of the run
(and, with ``--device cuda``, its GPU memory from ``nvidia-smi``) is sampled every
``MEMORY_SAMPLE_S`` seconds, and the ``nproc`` largest processes are the workers. Start-up is the time from starting the command (launcher, imports, process
group, CUDA context, data, model) to the main rank's "training on ..." line, printed just before
the first step. Built-in variants, on ``--config`` (default ``configs/seed.yaml``):

    a  data.pipeline=torchvision (the seed's per-sample DataLoader), 1 process
    b  data.pipeline=tensor (images held as one tensor), 1 process
    c  data.pipeline=tensor, 2 processes through the real launcher
       (CPU: ``accelerate launch --config_file configs/accelerate/cpu.yaml``, gloo)

``--variant NAME:override[,override...]`` adds a 1-process run with those config overrides
(``NAME@N:...`` for N processes), e.g. ``--variant graph:dist.cuda_graph=true`` on a GPU.

Method: each of ``--reps`` rounds runs every variant once, in turn, so a busy machine slows all
of them alike; each run trains ``--epochs`` epochs and the first ``--warmup-epochs`` of them are
reported separately (they hold lazy initialisation and any compilation). The remaining epochs
of all rounds are pooled: median, min and max. (a) is several times slower than the others, so it
runs ``--epochs-a`` epochs (default 2: one warm-up, one measured). Ratios are of medians:
b/a = epoch time of a / epoch time of b (speed-up), c/b = epoch time of c / epoch time of b.

``--startup`` measures start-up alone instead (issue 17): each of ``--reps`` rounds times a bare
``python -c "import torch"``, the same with a torch optimizer built (torch.optim imports
torch._dynamo: the floor of any training with it), and one-step training runs of 1 and 2
processes, each to its first step; ``--checkout NAME=DIR`` adds another checkout's runs to the
same rounds (the code before a change, side by side).

Other processes on the machine distort everything (on 2 cores a 2-thread run slows down many
times over). Every run records how many CPUs other processes kept busy meanwhile (/proc/stat
minus our own CPU time); the report warns when that exceeded BUSY_CPUS, and ``--retry-busy N``
waits for an idle machine before each run and repeats busy runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from mnistdist.config import ConfigError, load_config
from mnistdist.launch import child_env, free_port
from mnistdist.rundir import RunDir, read_metrics

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "train_dist.py"
CPU_LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "cpu.yaml"
DEFAULT_CONFIG = REPO / "configs" / "seed.yaml"

# Targets of issue 6 on a 2-core CPU machine (ratios of medians measured in one run).
TARGET_SPEEDUP_B_OVER_A = 10.0
TARGET_EPOCH_RATIO_C_OVER_B = 2.5
# A run during which other processes kept more than this many CPUs busy on average makes the
# report say the machine was busy. On 2 cores a single-process run with 2 threads slows down
# many times over when another process competes (OpenMP threads wait for each other), so its
# numbers, and the ratios, are then meaningless.
BUSY_CPUS = 0.25
MEMORY_SAMPLE_S = 0.2


@dataclass
class Variant:
    """One benchmarked configuration: ``nproc`` processes training with ``overrides``."""

    name: str
    description: str
    nproc: int = 1
    overrides: list[str] = field(default_factory=list)
    epochs: int | None = None
    """Epochs per run; None means ``--epochs``."""


def builtin_variants(epochs_a: int | None = None) -> dict[str, Variant]:
    return {
        "a": Variant("a", "torchvision per-sample pipeline, 1 process", 1, ["data.pipeline=torchvision"], epochs_a),
        "b": Variant("b", "tensor pipeline, 1 process", 1, ["data.pipeline=tensor"]),
        "c": Variant("c", "tensor pipeline, 2 processes (accelerate launch)", 2, ["data.pipeline=tensor"]),
    }


def parse_variant(text: str) -> Variant:
    """``NAME[@N]:override[,override...]`` -> a Variant of N (default 1) processes.

    ``graph:dist.cuda_graph=true`` is a 1-process run with that override; the overrides are
    applied after the built-in ones of the config file, like ``train_dist.py`` arguments, and
    are checked against the config now (an unknown key or a bad value raises ValueError).
    """
    head, sep, rest = text.partition(":")
    name, at, nproc_text = head.partition("@")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected NAME[@N]:section.key=value[,...]")
    if name in builtin_variants():
        raise ValueError(f"--variant {text!r}: {name!r} is a built-in variant; pick another name")
    nproc = 1
    if at:
        if not nproc_text.strip().isdigit() or int(nproc_text) < 1:
            raise ValueError(f"--variant {text!r}: the process count after @ must be a positive integer")
        nproc = int(nproc_text)
    overrides = [o.strip() for o in rest.split(",") if o.strip()]
    for o in overrides:
        if "=" not in o or "." not in o.partition("=")[0]:
            raise ValueError(f"--variant {text!r}: {o!r} is not a section.key=value override")
    try:
        load_config(None, overrides, world_size=nproc)
    except ConfigError as e:
        raise ValueError(f"--variant {text!r}: {e}") from None
    procs = f"{nproc} process" + ("es" if nproc > 1 else "")
    return Variant(name, f"{', '.join(overrides) or 'no overrides'}; {procs}", nproc, overrides)


# --------------------------------------------------------------------------------------
# Pure pieces: statistics, one run's numbers, aggregation, ratios, formatting


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and count (None for an empty list)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class RunResult:
    """The numbers of one training run (one variant, one repetition)."""

    epoch_times_s: list[float]
    samples_per_s: list[float]
    test_acc_by_epoch: list[float]
    final_test_acc: float
    startup_s: float | None
    peak_rss_mb_per_rank: list[float]
    peak_cuda_mb_per_rank: list[float | None]
    wall_s: float
    others_cpus: float | None = None
    """CPUs' worth of time other processes of the machine used while this run ran (0 = quiet)."""


def read_run(run_dir: Path, wall_s: float) -> RunResult:
    """Read ``metrics.jsonl`` (one evaluation line per epoch) and ``summary.json`` of a run
    (memory is filled in by ``run_once``)."""
    run = RunDir(run_dir)
    evals = [r for r in read_metrics(run.root) if "epoch_time_s" in r]
    summary = json.loads(run.summary.read_text())
    return RunResult(
        epoch_times_s=[r["epoch_time_s"] for r in evals],
        samples_per_s=[r["samples_per_s"] for r in evals],
        test_acc_by_epoch=[r["test_acc"] for r in evals],
        final_test_acc=summary["final_test_acc"],
        startup_s=None,  # measured by run_once from outside the run
        peak_rss_mb_per_rank=[],
        peak_cuda_mb_per_rank=[],
        wall_s=wall_s,
    )


def aggregate(variant: Variant, runs: list[RunResult], warmup_epochs: int) -> dict[str, Any]:
    """Pool the runs of one variant: the first ``warmup_epochs`` epochs of each run are warm-up
    (fewer when a run has too few epochs to keep one measured epoch)."""
    measured, measured_sps, warm = [], [], []
    for run in runs:
        w = min(warmup_epochs, max(len(run.epoch_times_s) - 1, 0))
        warm += run.epoch_times_s[:w]
        measured += run.epoch_times_s[w:]
        measured_sps += run.samples_per_s[w:]
    nranks = max((len(r.peak_rss_mb_per_rank) for r in runs), default=0)

    def per_rank_max(attr: str) -> list[float | None]:
        out = []
        for k in range(nranks):
            vals = [getattr(r, attr)[k] for r in runs if k < len(getattr(r, attr)) and getattr(r, attr)[k] is not None]
            out.append(max(vals) if vals else None)
        return out

    rss = per_rank_max("peak_rss_mb_per_rank")
    cuda = per_rank_max("peak_cuda_mb_per_rank")
    accs = [r.final_test_acc for r in runs]
    return {
        "name": variant.name,
        "description": variant.description,
        "nproc": variant.nproc,
        "overrides": variant.overrides,
        "runs": len(runs),
        "epochs_per_run": len(runs[0].epoch_times_s) if runs else 0,
        "warmup_epochs_per_run": min(warmup_epochs, max(len(runs[0].epoch_times_s) - 1, 0)) if runs else 0,
        "epoch_time_s": stats(measured),
        "samples_per_s": stats(measured_sps),
        "warmup_epoch_s": stats(warm),
        "startup_s": stats([r.startup_s for r in runs]),
        "wall_s": stats([r.wall_s for r in runs]),
        "others_cpus": stats([r.others_cpus for r in runs]),
        "peak_rss_mb_per_process": rss,
        "peak_rss_mb": max((v for v in rss if v is not None), default=None),
        "peak_cuda_mb_per_process": cuda if any(v is not None for v in cuda) else None,
        "test_acc": accs[-1] if accs else None,
        "test_acc_all_runs": accs,
        "test_acc_by_epoch": runs[0].test_acc_by_epoch if runs else [],
        "epoch_times_s_all_runs": [r.epoch_times_s for r in runs],
    }


def _median(results: dict[str, dict[str, Any]], name: str) -> float | None:
    entry = results.get(name)
    return entry["epoch_time_s"]["median"] if entry else None


def _run_medians(entry: dict[str, Any]) -> list[float]:
    """Median measured epoch time of each run of a variant, in round order."""
    w = entry.get("warmup_epochs_per_run", 0)
    return [statistics.median(times[w:]) for times in entry.get("epoch_times_s_all_runs", []) if times[w:]]


def per_round_ratios(results: dict[str, dict[str, Any]], num: str, den: str) -> dict[str, Any]:
    """``num``/``den`` epoch-time ratio within each round (runs made minutes apart), then
    median/min/max over rounds: steadier than the ratio of pooled medians when the machine's
    speed drifts between rounds."""
    if num not in results or den not in results:
        return stats([])
    pairs = zip(_run_medians(results[num]), _run_medians(results[den]))
    return stats([n / d for n, d in pairs if d > 0])


def compute_ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """b/a speed-up and c/b epoch-time ratio from the medians (None when a side is missing),
    with the issue's targets and whether they are met; also the same ratios per round."""
    a, b, c = (_median(results, n) for n in "abc")
    speedup = a / b if a and b else None
    ratio_cb = c / b if c and b else None
    return {
        "speedup_b_over_a": speedup,
        "epoch_time_ratio_c_over_b": ratio_cb,
        "speedup_b_over_a_per_round": per_round_ratios(results, "a", "b"),
        "epoch_time_ratio_c_over_b_per_round": per_round_ratios(results, "c", "b"),
        "target_speedup_b_over_a": TARGET_SPEEDUP_B_OVER_A,
        "target_epoch_time_ratio_c_over_b": TARGET_EPOCH_RATIO_C_OVER_B,
        "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP_B_OVER_A,
        "ratio_met": None if ratio_cb is None else ratio_cb <= TARGET_EPOCH_RATIO_C_OVER_B,
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _spread(s: dict[str, Any], fmt: str = ".2f") -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def format_table(report: dict[str, Any]) -> str:
    """The human-readable result: one row per variant, then the ratios against the targets."""
    headers = ["", "what", "procs", "epochs", "epoch s: median [min-max]", "samples/s",
               "start-up s", "warm-up epoch s", "peak RSS MB/proc", "test acc"]
    rows = []
    for r in report["variants"].values():
        rss = "/".join(_num(v, ".0f") for v in r["peak_rss_mb_per_process"]) or "-"
        if r.get("peak_cuda_mb_per_process"):
            rss += " (cuda " + "/".join(_num(v, ".0f") for v in r["peak_cuda_mb_per_process"]) + ")"
        acc = "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f}% after {r['epochs_per_run']}"
        rows.append([
            r["name"], r["description"], str(r["nproc"]),
            f"{r['runs']}x({r['warmup_epochs_per_run']}+{r['epochs_per_run'] - r['warmup_epochs_per_run']})",
            _spread(r["epoch_time_s"]), _num(r["samples_per_s"]["median"], ",.0f"),
            _num(r["startup_s"]["median"], ".1f"), _num(r["warmup_epoch_s"]["median"], ".2f"), rss, acc,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    q = report["ratios"]

    def verdict(met: bool | None) -> str:
        return "" if met is None else ("met" if met else "NOT met")

    def per_round(key: str, fmt: str) -> str:
        r = q.get(key) or {}
        if not r.get("n"):
            return ""
        return f"; per round: median {r['median']:{fmt}} [{r['min']:{fmt}}-{r['max']:{fmt}}] over {r['n']}"

    if q["speedup_b_over_a"] is not None:
        lines.append(f"speed-up b/a (epoch time a / b): {q['speedup_b_over_a']:.1f}x  "
                     f"(target >= {q['target_speedup_b_over_a']:g}x: {verdict(q['speedup_met'])})"
                     + per_round("speedup_b_over_a_per_round", ".1f"))
    if q["epoch_time_ratio_c_over_b"] is not None:
        lines.append(f"epoch time c/b: {q['epoch_time_ratio_c_over_b']:.2f}  "
                     f"(target <= {q['target_epoch_time_ratio_c_over_b']:g}: {verdict(q['ratio_met'])})"
                     + per_round("epoch_time_ratio_c_over_b_per_round", ".2f"))
    m = report.get("machine", {})
    if m:
        load = "/".join(f"{x:.1f}" for x in m.get("load_avg_before", []))
        lines.append(f"machine: {m.get('nproc')} CPUs, {m.get('cpu_model')}; load average before the "
                     f"benchmark (1/5/15 min) {load}")
        o = m.get("others_cpus") or {}
        if o.get("median") is not None:
            lines.append(f"other processes kept {o['median']:.2f} CPUs busy during a run (median; max "
                         f"{o['max']:.2f})")
        if m.get("discarded_busy_runs"):
            lines.append(f"{m['discarded_busy_runs']} run(s) discarded and repeated because the machine was busy")
        if m.get("busy"):
            lines.append(f"WARNING: the machine was busy (other processes used more than {BUSY_CPUS} CPUs "
                         "during some runs): these times are not reliable; re-run on an idle machine")
    lines.append("epochs: RUNSx(WARM-UP+MEASURED), warm-up epochs are not in the epoch statistics; start-up = "
                 "command start to first step (launcher, imports, process group, data, model)")
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


# --------------------------------------------------------------------------------------
# Running


def machine_info(device: str) -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def build_command(variant: Variant, config: Path, run_dir: Path, epochs: int, device: str,
                  extra_overrides: list[str], train_script: Path = TRAIN_SCRIPT) -> list[str]:
    """The command line of one run: ``train_dist.py`` directly, or under ``accelerate launch``
    (``train_script``: another checkout's, to compare versions in one run)."""
    args = [str(train_script), "--config", str(config), "--run-dir", str(run_dir),
            *variant.overrides, *extra_overrides, f"train.epochs={epochs}", f"dist.device={device}"]
    if variant.nproc == 1:
        return [sys.executable, *args]
    accelerate = Path(sys.executable).parent / "accelerate"
    launcher = [str(accelerate)] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate.exists():
        launcher.append("launch")
    where = ["--config_file", str(CPU_LAUNCH_CONFIG)] if device == "cpu" else ["--multi_gpu"]
    return [*launcher, *where, "--num_processes", str(variant.nproc),
            "--main_process_port", str(free_port()), *args]


class MemorySampler:
    """Peak memory of a process tree, sampled from outside every ``MEMORY_SAMPLE_S`` seconds:
    resident memory of each process (psutil) and, with ``gpu``, each process's GPU memory as
    ``nvidia-smi`` reports it. Training itself measures nothing."""

    def __init__(self, root_pid: int, gpu: bool) -> None:
        self.root, self.gpu = psutil.Process(root_pid), gpu
        self.rss_mb: dict[int, float] = {}
        self.gpu_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="memory-sampler")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    self.rss_mb[p.pid] = max(self.rss_mb.get(p.pid, 0.0), p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            if self.gpu:
                self._sample_gpu({p.pid for p in procs})

    def _sample_gpu(self, pids: set[int]) -> None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in out.splitlines():
            pid_text, _, mb_text = line.partition(",")
            if pid_text.strip().isdigit() and int(pid_text) in pids:
                try:
                    self.gpu_mb[int(pid_text)] = max(self.gpu_mb.get(int(pid_text), 0.0), float(mb_text))
                except ValueError:
                    pass

    def stop(self, nproc: int) -> tuple[list[float], list[float | None]]:
        """(peak RSS MB, peak GPU MB or None) of the ``nproc`` largest processes: the workers
        (a launcher holds less than a worker with the data and model)."""
        self._stop.set()
        self._thread.join()
        workers = sorted(self.rss_mb, key=self.rss_mb.get, reverse=True)[:nproc]  # type: ignore[arg-type]
        return [self.rss_mb[p] for p in workers], [self.gpu_mb.get(p) if self.gpu else None for p in workers]


def machine_busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy since boot (/proc/stat; None elsewhere)."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds used by this process and its finished children (the launcher's workers too)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def others_cpus(busy_s: float | None, own_s: float, wall_s: float) -> float | None:
    """Average number of CPUs other processes kept busy: machine busy time minus ours, per second."""
    if busy_s is None or wall_s <= 0:
        return None
    return max(busy_s - own_s, 0.0) / wall_s


def wait_until_idle(max_wait_s: float, window_s: float = 2.0) -> float | None:
    """Wait (at most ``max_wait_s``) until other processes keep at most BUSY_CPUS busy over a
    ``window_s`` window; return the last measured value (None where /proc/stat is missing)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, own0 = machine_busy_cpu_s(), own_cpu_s()
        if busy0 is None:
            return None
        time.sleep(window_s)
        busy1, own1 = machine_busy_cpu_s(), own_cpu_s()
        others = others_cpus(busy1 - busy0, own1 - own0, window_s)  # type: ignore[operator]
        if others is None or others <= BUSY_CPUS or time.monotonic() >= deadline:
            return others


# The main rank prints this line after the process group, data, model and DDP are ready and
# just before the first step; its arrival time ends the start-up measurement.
READY_LINE = "training on "


def run_once(variant: Variant, config: Path, workdir: Path, tag: str, epochs: int, device: str,
             extra_overrides: list[str], timeout_s: float) -> RunResult:
    """Run one training and read its numbers. Start-up is measured from here: from starting the
    command (launcher included) to the main rank's "training on ..." line."""
    run_dir = workdir / f"{variant.name}-{tag}"
    cmd = build_command(variant, config, run_dir, epochs, device, extra_overrides)
    log = workdir / f"{variant.name}-{tag}.log"
    startup_s = None
    busy0, own0 = machine_busy_cpu_s(), own_cpu_s()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        memory = MemorySampler(proc.pid, gpu=device == "cuda")
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if startup_s is None and READY_LINE in line:
                    startup_s = time.perf_counter() - start
                out.write(line)
            returncode = proc.wait()
        finally:
            killer.cancel()
            rss, gpu = memory.stop(variant.nproc)
    wall_s = time.perf_counter() - start
    busy1, own1 = machine_busy_cpu_s(), own_cpu_s()
    if returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"variant {variant.name} failed (exit {returncode}): {shlex.join(cmd)}\n{tail}")
    result = read_run(run_dir, wall_s)
    result.startup_s = startup_s
    result.peak_rss_mb_per_rank, result.peak_cuda_mb_per_rank = rss, gpu
    if busy0 is not None and busy1 is not None:
        result.others_cpus = others_cpus(busy1 - busy0, own1 - own0, wall_s)
    return result


def run_bench(variants: list[Variant], *, config: Path, reps: int, epochs: int, warmup_epochs: int,
              device: str, extra_overrides: list[str], timeout_s: float, workdir: Path,
              retry_busy: int = 0, idle_wait_s: float = 600.0, log: Any = print) -> dict[str, Any]:
    """Run every variant ``reps`` times, round-robin, and return the report.

    With ``retry_busy`` > 0, every run first waits (up to ``idle_wait_s``) for the machine to be
    idle, and a run during which other processes still kept more than BUSY_CPUS busy is
    discarded and run again, at most ``retry_busy`` times over the whole benchmark."""
    machine = machine_info(device)
    machine["load_avg_before"] = list(os.getloadavg())
    started = datetime.now(timezone.utc)
    runs: dict[str, list[RunResult]] = {v.name: [] for v in variants}
    retries_left, discarded = retry_busy, 0
    for rep in range(reps):
        for v in variants:
            n_epochs = v.epochs or epochs
            attempt = 0
            while True:
                if retry_busy:
                    wait_until_idle(idle_wait_s)
                tag = f"rep{rep}" + (f"-retry{attempt}" if attempt else "")
                result = run_once(v, config, workdir, tag, n_epochs, device, extra_overrides, timeout_s)
                log(f"[round {rep + 1}/{reps}] {v.name}: epochs "
                    + " ".join(f"{t:.2f}" for t in result.epoch_times_s)
                    + f" s; start-up {_num(result.startup_s, '.1f')} s; wall {result.wall_s:.1f} s; "
                    f"other processes used {_num(result.others_cpus, '.2f')} CPUs")
                busy = result.others_cpus is not None and result.others_cpus > BUSY_CPUS
                if busy and retries_left > 0:
                    retries_left -= 1
                    discarded += 1
                    attempt += 1
                    log(f"  machine busy during that run: discarded, running {v.name} again")
                    continue
                break
            runs[v.name].append(result)
    machine["load_avg_after"] = list(os.getloadavg())
    results = {v.name: aggregate(v, runs[v.name], warmup_epochs) for v in variants}
    others = [r.others_cpus for rs in runs.values() for r in rs if r.others_cpus is not None]
    machine["others_cpus"] = stats(others)
    machine["busy"] = bool(others) and max(others) > BUSY_CPUS
    machine["discarded_busy_runs"] = discarded
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench " + shlex.join(sys.argv[1:]),
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "device": device,
        "reps": reps,
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "extra_overrides": extra_overrides,
        "machine": machine,
        "variants": results,
        "ratios": compute_ratios(results),
    }


# --------------------------------------------------------------------------------------
# Start-up: time to the first step, against a bare ``import torch``

BARE = "bare"
"""``python -c "import torch"``: what every training process pays."""
# Every torch.optim optimizer imports torch._dynamo when it is built (Optimizer.__init__ ->
# torch._disable_dynamo), a cost no training with a torch optimizer avoids: this row is that
# floor (docs/benchmarks.md, "Start-up").
FLOOR = "bare+optimizer"
REFERENCE_CODE = {
    BARE: "import torch",
    FLOOR: "import torch; torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)",
}
"""Timed to a line they print when done (``REFERENCE_DONE``), like a training run to its
first step: the interpreter's exit (torch._dynamo's exit handlers) is not start-up."""
REFERENCE_DONE = "reference done"
STARTUP_NPROCS = (1, 2)


def startup_command(nproc: int, checkout: Path, config: Path, run_dir: Path, device: str) -> list[str]:
    """A one-step training run of ``checkout`` on ``nproc`` processes (2: through the launcher)."""
    variant = Variant(f"train@{nproc}", "", nproc, ["train.max_steps=1"])
    return build_command(variant, config, run_dir, 1, device, [], train_script=checkout / "train_dist.py")


def time_until(cmd: list[str], cwd: Path, ready: str | None, timeout_s: float, log_path: Path) -> float:
    """Seconds from starting ``cmd`` to its first output line containing ``ready`` (None: to its
    exit). The command still runs to its end; a non-zero exit raises RuntimeError."""
    elapsed = None
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if elapsed is None and ready is not None and ready in line:
                    elapsed = time.perf_counter() - start
                out.write(line)
            returncode = proc.wait()
        finally:
            killer.cancel()
    if ready is None:
        elapsed = time.perf_counter() - start
    if returncode != 0 or elapsed is None:
        raise RuntimeError(f"exit {returncode}{'' if elapsed else f', no {ready!r} line'}: {shlex.join(cmd)}\n"
                           + log_path.read_text()[-3000:])
    return elapsed


def run_startup(checkouts: dict[str, Path], *, reps: int, config: Path, device: str, workdir: Path,
                timeout_s: float, log: Any = print) -> dict[str, Any]:
    """Each round: the reference commands (the bare import, the import with an optimizer),
    then for every checkout one 1-process and one 2-process run; start-up is command start to
    the main rank's "training on" line (just before the first step). Returns medians per row
    and, per round, the difference to that round's bare import (rounds minutes apart drift;
    the difference within a round is steadier)."""
    started = datetime.now(timezone.utc)
    rows: dict[str, list[float]] = {key: [] for key in REFERENCE_CODE}
    rows.update({f"{name} {n}p": [] for name in checkouts for n in STARTUP_NPROCS})
    over_bare: dict[str, list[float]] = {key: [] for key in rows if key != BARE}
    for rep in range(reps):
        line = []
        for key, code in REFERENCE_CODE.items():
            log_path = workdir / f"{key.replace('+', '-')}-rep{rep}.log"
            cmd = [sys.executable, "-c", f"{code}; print({REFERENCE_DONE!r}, flush=True)"]
            t = time_until(cmd, REPO, REFERENCE_DONE, timeout_s, log_path)
            rows[key].append(t)
            line.append(f"{key} {t:.2f}")
        bare = rows[BARE][-1]
        if FLOOR in over_bare:
            over_bare[FLOOR].append(rows[FLOOR][-1] - bare)
        for name, checkout in checkouts.items():
            for n in STARTUP_NPROCS:
                key, tag = f"{name} {n}p", f"{name}-{n}p-rep{rep}"
                cmd = startup_command(n, checkout, config, workdir / tag, device)
                t = time_until(cmd, checkout, READY_LINE, timeout_s, workdir / f"{tag}.log")
                rows[key].append(t)
                over_bare[key].append(t - bare)
                line.append(f"{key} {t:.2f}")
        log(f"[round {rep + 1}/{reps}] start-up s: " + ", ".join(line))
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench " + shlex.join(sys.argv[1:]),
        "device": device,
        "reps": reps,
        "checkouts": {name: str(path) for name, path in checkouts.items()},
        "machine": machine_info(device),
        "startup_s": {key: stats(values) for key, values in rows.items()},
        "over_bare_s": {key: stats(values) for key, values in over_bare.items()},
        "startup_s_all_rounds": rows,
    }


def format_startup(report: dict[str, Any]) -> str:
    """One line per row: start-up median [min-max] and its excess over the bare import."""
    lines = [f"{'what':<20}  {'start-up s: median [min-max]':<28}  minus bare import, per round: median [min-max]"]
    for key, s in report["startup_s"].items():
        extra = report["over_bare_s"].get(key)
        lines.append(f"{key:<20}  {_spread(s):<28}  {_spread(extra) if extra else '-'}")
    lines.append(f"{report['reps']} rounds; each runs every row once, in turn; start-up = command start to the "
                 f"main rank's \"{READY_LINE.strip()}\" line; {BARE}, {FLOOR}: to a line printed after `python -c` "
                 + " and ".join(f"\"{code}\"" for code in REFERENCE_CODE.values()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Epoch time, samples/s, start-up, peak memory and test accuracy of the training "
                    "pipelines (a: torchvision, b: tensor, c: tensor on 2 processes), measured in one run.",
    )
    p.add_argument("--which", default=None,
                   help="built-in variants to run, comma-separated from a,b,c (default: a,b,c on cpu, a,b on cuda)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[@N]:OVERRIDES",
                   help="extra variant: N (default 1) processes with comma-separated config overrides, "
                        "e.g. graph:dist.cuda_graph=true (repeatable)")
    p.add_argument("--reps", type=int, default=3, help="rounds; each runs every variant once (default 3)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3: 1 warm-up + 2 measured)")
    p.add_argument("--epochs-a", type=int, default=2,
                   help="epochs per run of variant a, the slow one (default 2: 1 warm-up + 1 measured)")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="leading epochs of each run reported as warm-up, not measured (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="dist.device of every run (default cpu)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (default configs/seed.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value", dest="overrides",
                   help="override for every run, e.g. train.max_steps=20 (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this path")
    p.add_argument("--keep", type=Path, default=None, help="keep run directories and logs here (default: a temp dir)")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="on a shared machine: wait for it to be idle before each run, and re-run a run "
                        "during which other processes were busy, at most N times in all (default 0: off)")
    p.add_argument("--idle-wait", type=float, default=600.0, metavar="S",
                   help="with --retry-busy: wait at most S seconds for an idle machine before a run (default 600)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before one run is killed (default 1800)")
    p.add_argument("--startup", action="store_true",
                   help="measure start-up instead: time to the first step of 1 and 2 processes against a bare "
                        "`python -c \"import torch\"`, --reps rounds (the variant options are ignored)")
    p.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR",
                   help="with --startup: also time the train_dist.py of another checkout, e.g. the code "
                        "before a change (`git archive HEAD | tar -x -C DIR`), in the same rounds (repeatable)")
    args = p.parse_args(argv)
    args.checkouts = {"current": REPO}
    for text in args.checkout:
        name, sep, path = text.partition("=")
        if not sep or not name or name in args.checkouts or not (Path(path) / "train_dist.py").is_file():
            p.error(f"--checkout {text!r}: expected a new NAME=DIR where DIR holds train_dist.py")
        args.checkouts[name] = Path(path).resolve()
    if args.retry_busy < 0:
        p.error("--retry-busy must be >= 0")
    for name in ("reps", "epochs", "epochs_a"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_epochs < 0:
        p.error("--warmup-epochs must be >= 0")
    which = args.which if args.which is not None else ("a,b,c" if args.device == "cpu" else "a,b")
    args.which_list = [w.strip() for w in which.split(",") if w.strip()]
    unknown = [w for w in args.which_list if w not in builtin_variants()]
    if unknown:
        p.error(f"--which: unknown variant(s) {', '.join(unknown)}; choose from a, b, c")
    try:
        args.extra_variants = [parse_variant(v) for v in args.variant]
    except ValueError as e:
        p.error(str(e))
    names = args.which_list + [v.name for v in args.extra_variants]
    if len(set(names)) != len(names):
        p.error("variant names must be unique")
    if not args.which_list and not args.extra_variants:
        p.error("nothing to run: --which is empty and no --variant given")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.startup:
        return startup_main(args)
    builtins = builtin_variants(epochs_a=args.epochs_a)
    variants = [builtins[w] for w in args.which_list] + args.extra_variants
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        workdir_ctx: Any = None
        workdir = args.keep
    else:
        workdir_ctx = tempfile.TemporaryDirectory(prefix="mnistdist-bench-")
        workdir = Path(workdir_ctx.name)
    try:
        report = run_bench(
            variants, config=args.config.resolve(), reps=args.reps, epochs=args.epochs,
            warmup_epochs=args.warmup_epochs, device=args.device, extra_overrides=args.overrides,
            timeout_s=args.timeout, workdir=workdir, retry_busy=args.retry_busy,
            idle_wait_s=args.idle_wait, log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if workdir_ctx is not None:
            workdir_ctx.cleanup()
    print(format_table(report))
    _write_json(args.json, report)
    return 0


def startup_main(args: argparse.Namespace) -> int:
    """``--startup``: the start-up table (and ``--json``)."""
    with tempfile.TemporaryDirectory(prefix="mnistdist-startup-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            report = run_startup(args.checkouts, reps=args.reps, config=args.config.resolve(), device=args.device,
                                 workdir=workdir, timeout_s=args.timeout,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(format_startup(report))
    _write_json(args.json, report)
    return 0


def _write_json(path: Path | None, report: dict[str, Any]) -> None:
    """``--json PATH``: the report as JSON."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_json(report))
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
