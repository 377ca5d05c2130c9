"""Compare finished runs: ``mnistdist compare DIR...``.

A DIR is a sweep directory (its ``sweep.json`` labels each run with its variant and grid
values), a run directory, or a directory of run directories. Runs are grouped by what
actually differs between them apart from the seed: their resolved configs (bookkeeping keys
left out) and their number of processes. Each group is labelled by its sweep's variant and
grid values when those tell the groups apart, else also by every config key whose value
differs between the groups. A run given twice counts once, and a run with the config and
seed of another is left out with a note naming both.

Each group gets the mean ± standard deviation over its seeds, and the range, of the final and
the best test accuracy, the mean training time and the steps, all read from the runs' own
``summary.json``; runs without one (unfinished) or with values training never writes are left
out with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import reprlib
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnistdist.config import ConfigError
from mnistdist.rundir import RunDir, fsync_dir
from mnistdist.tools.sweep import (BOOKKEEPING_KEYS, BOOKKEEPING_SECTIONS, MANIFEST, read_file, read_manifest,
                                   read_run_config)

# What never makes runs differ: bookkeeping (see sweep.BOOKKEEPING_KEYS), and the seed, which
# is what a group is taken over.
IGNORED_SECTIONS = BOOKKEEPING_SECTIONS
IGNORED_KEYS = ("train.seed", *BOOKKEEPING_KEYS)
SUMMARY_BYTES = 1 << 20
"""Largest summary.json read (training writes a few hundred bytes)."""
MAX_COUNT = 2**63 - 1



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Compare finished runs: final and best test accuracy (mean ± std over seeds, and "
                          "range), train time and steps, grouped by what varies apart from the seed.")
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                        help="sweep directories, run directories, or directories of run directories")
    parser.add_argument("--csv", type=Path, default=None, metavar="PATH", help="also write the table as CSV")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="the PNG plot (default: compare.png in the first DIR)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")


def main(args: argparse.Namespace) -> int:
    """Collect, group, write the CSV and the plot, print the table (or JSON)."""
    runs, notes = collect(args.dirs)
    groups = group(runs)
    outputs = [("--csv", args.csv)] if args.csv is not None else []
    if not args.no_plot:
        outputs.append(("--plot", args.plot or args.dirs[0] / "compare.png"))
    for flag, path in outputs:  # before anything is written
        if path.is_dir():
            raise ConfigError(f"{flag} {path}: is a directory; name a file")
    written = []
    if args.csv is not None:
        written.append(write_output("--csv", args.csv, to_csv(groups).encode()))
    if not args.no_plot:
        written.append(plot(groups, args.plot or args.dirs[0] / "compare.png"))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"groups": [g.as_record() for g in groups], "left_out": notes}, default=str))
    else:
        print(format_table(groups))
        for path in written:
            print(f"wrote {path}")
    return 0


@dataclass
class RunResult:
    """One finished run, as compare sees it."""

    run_dir: Path
    params: dict[str, Any] | None
    """Its sweep's variant and grid values (None for a run outside a sweep)."""
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def seed(self) -> Any:
        train = self.config.get("train")
        return train.get("seed") if isinstance(train, dict) else None

    @property
    def processes(self) -> Any:
        return self.summary.get("world_size")

    @property
    def flat(self) -> dict[str, Any]:
        """The config keys that can make runs differ (``section.key``), the seed aside."""
        return _flat(self.config)

    @property
    def key(self) -> str:
        """What it learned from: equal for the runs of one group."""
        return json.dumps([self.flat, self.processes], sort_keys=True, default=str)


def _short(value: Any) -> str:
    return reprlib.repr(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def summary_problem(summary: Any) -> str | None:
    """What is wrong with a summary.json's values (None: nothing). Training writes accuracies
    in 0..1, times >= 0 and whole counts; anything else is not one of its summaries."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    if "final_test_acc" not in summary:
        return "no final_test_acc"
    for key in ("final_test_acc", "best_test_acc", "train_time_s", "steps", "world_size"):
        value = summary.get(key)
        if value is None and key != "final_test_acc":
            continue  # optional (null: an older or interrupted writer)
        if key.endswith("_acc") and not (_is_number(value) and 0 <= value <= 1):
            return f"{key}: must be a number in 0..1; got {_short(value)}"
        if key == "train_time_s" and not (_is_number(value) and value >= 0):
            return f"{key}: must be a finite number >= 0; got {_short(value)}"
        lowest = 1 if key == "world_size" else 0
        if key in ("steps", "world_size") and not (isinstance(value, int) and not isinstance(value, bool)
                                                   and lowest <= value <= MAX_COUNT):
            return f"{key}: must be a whole number in {lowest}..{MAX_COUNT}; got {_short(value)}"
    return None


def _load_run(run_dir: Path, params: dict[str, Any] | None, notes: list[str]) -> RunResult | None:
    run = RunDir(run_dir)
    try:
        config = read_run_config(run_dir)
        text = read_file(run.summary, SUMMARY_BYTES)
        summary = json.loads(text) if text is not None else None
    except ConfigError as e:
        notes.append(f"{e}; left out")
        return None
    except (ValueError, RecursionError):
        notes.append(f"{run.summary}: not JSON; left out")
        return None
    if config is None:
        notes.append(f"{run_dir}: no config.yaml (not a run directory?); left out")
        return None
    if summary is None:
        notes.append(f"{run_dir}: no summary.json (not finished?); left out")
        return None
    problem = summary_problem(summary)
    if problem is not None:
        notes.append(f"{run.summary}: {problem}; left out")
        return None
    return RunResult(run_dir, params, config, summary)


def _manifest_entry(entry: Any) -> tuple[str, dict[str, Any]] | str:
    """(run directory name, params) of one of sweep.json's run entries, or what is wrong with it."""
    if not isinstance(entry, dict):
        return "not a mapping"
    name = entry.get("run_dir")
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"run_dir: must be the name of a directory in the sweep directory; got {_short(name)}"
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        return f"params: must be a mapping; got {_short(params)}"
    return name, dict(params)


def collect(dirs: list[Path]) -> tuple[list[RunResult], list[str]]:
    """The finished runs under ``dirs``, each once, and one note per run left out."""
    runs: list[RunResult] = []
    notes: list[str] = []
    seen: set[Path] = set()

    def add(run_dir: Path, params: dict[str, Any] | None) -> None:
        real = run_dir.resolve()
        if real in seen:
            notes.append(f"{run_dir}: given more than once; counted once")
            return
        seen.add(real)
        run = _load_run(run_dir, params, notes)
        if run is not None:
            runs.append(run)

    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"{d}: no such directory")
        manifest = read_manifest(d)
        if manifest is not None:
            for i, entry in enumerate(manifest["runs"]):
                found = _manifest_entry(entry)
                if isinstance(found, str):
                    notes.append(f"{d / MANIFEST}: run entry {i}: {found}; left out")
                else:
                    add(d / found[0], found[1])
        elif RunDir(d).config.exists():
            add(d, None)
        else:
            children = sorted(p for p in d.iterdir() if RunDir(p).config.exists())
            if not children:
                raise ConfigError(f"{d}: neither a sweep directory (sweep.json) nor a run directory "
                                  "(config.yaml), nor a directory of run directories")
            for p in children:
                add(p, None)
    runs = _without_copies(runs, notes)
    if not runs:
        raise ConfigError("no finished runs to compare (" + "; ".join(notes[:3]) + ")")
    return runs, notes


def _without_copies(runs: list[RunResult], notes: list[str]) -> list[RunResult]:
    """The runs, less those with the config and seed of an earlier one (a copied run
    directory, or one trained twice): counted twice they would shrink the spread."""
    first: dict[tuple[str, str], RunResult] = {}
    kept = []
    for run in runs:
        key = (run.key, json.dumps(run.seed, default=str))
        if key in first:
            notes.append(f"{run.run_dir}: the same config and seed as {first[key].run_dir}; left out")
        else:
            first[key] = run
            kept.append(run)
    return kept


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in config.items() if isinstance(section, dict)
            for k, v in section.items() if s not in IGNORED_SECTIONS and f"{s}.{k}" not in IGNORED_KEYS}


@dataclass
class Stats:
    values: list[float]
    """Possibly none (every run's summary left the value out): then every statistic is None."""

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (0 for one value)."""
        if not self.values:
            return None
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def as_record(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "min": min(self.values, default=None),
                "max": max(self.values, default=None), "values": self.values}


@dataclass
class Group:
    params: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)

    def stats(self, key: str) -> Stats:
        return Stats([float(r.summary[key]) for r in self.runs if isinstance(r.summary.get(key), (int, float))])

    def as_record(self) -> dict[str, Any]:
        return {
            "params": self.params, "runs": len(self.runs), "seeds": [r.seed for r in self.runs],
            "final_test_acc": self.stats("final_test_acc").as_record(),
            "best_test_acc": self.stats("best_test_acc").as_record(),
            "train_time_s": self.stats("train_time_s").as_record(),
            "steps": self.stats("steps").as_record(),
            "run_dirs": [str(r.run_dir) for r in self.runs],
        }


def group(runs: list[RunResult]) -> list[Group]:
    """Runs that learned from the same config (seed aside) on as many processes together, in
    the order they first appear, each group labelled (``Group.params``, see ``label_groups``)."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.key, Group({})).runs.append(run)
    label_groups(list(groups.values()))
    return list(groups.values())


def _common_params(g: Group) -> dict[str, Any] | None:
    """The sweep params every run of the group shares; None when one of its runs has none."""
    if any(r.params is None for r in g.runs):
        return None
    first = g.runs[0].params or {}
    return {k: v for k, v in first.items() if all((r.params or {}).get(k, ...) == v for r in g.runs)}


def label_groups(groups: list[Group]) -> None:
    """Set each group's params: its sweep's variant and grid values when they tell every group
    apart, else those and every config key whose value differs between the groups, and the
    number of processes when that differs."""
    from_sweeps = [_common_params(g) for g in groups]
    flats = [g.runs[0].flat for g in groups]
    varied = [k for k in sorted({k for f in flats for k in f})
              if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    processes = len({json.dumps(g.runs[0].processes) for g in groups}) > 1
    known = [p for p in from_sweeps if p is not None]
    enough = (len(known) == len(groups) and len({tuple(p) for p in known}) <= 1
              and len({json.dumps(p, sort_keys=True, default=str) for p in known}) == len(groups))
    for g, params, flat in zip(groups, from_sweeps, flats):
        g.params = dict(params or {})
        if not enough:
            g.params.update((k, flat.get(k)) for k in varied)
        if processes:
            g.params["processes"] = g.runs[0].processes


def param_keys(groups: list[Group]) -> list[str]:
    return list(dict.fromkeys(k for g in groups for k in g.params))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


def _pct(stats: Stats) -> tuple[str, str]:
    if not stats.values:
        return "-", "-"
    return (f"{100 * stats.mean:.2f} ± {100 * stats.std:.2f}%",
            f"{100 * min(stats.values):.2f}-{100 * max(stats.values):.2f}%")


def format_table(groups: list[Group]) -> str:
    """The comparison as an aligned text table (accuracies in percent)."""
    keys = param_keys(groups) or ["run"]
    header = [*keys, "runs", "final acc (mean ± std)", "range", "best acc (mean ± std)", "train s", "steps"]
    rows = [header]
    for g in groups:
        final, final_range = _pct(g.stats("final_test_acc"))
        best, _ = _pct(g.stats("best_test_acc"))
        time_s, steps = g.stats("train_time_s"), g.stats("steps")
        labels = [_value(g.params.get(k)) for k in keys] if param_keys(groups) else ["all runs"]
        rows.append([*labels, str(len(g.runs)), final, final_range, best,
                     f"{time_s.mean:.1f}" if time_s.values else "-",
                     f"{steps.mean:.0f}" if steps.values else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    numeric = set(range(len(keys), len(header)))
    return "\n".join("  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in rows)


def to_csv(groups: list[Group]) -> str:
    """One row per group; accuracies as fractions, as in summary.json."""
    keys = param_keys(groups)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    stats = ("final_test_acc", "best_test_acc")
    writer.writerow([*keys, "runs", "seeds", *(f"{s}_{m}" for s in stats for m in ("mean", "std", "min", "max")),
                     "train_time_s_mean", "steps_mean"])
    for g in groups:
        row: list[Any] = [_value(g.params.get(k)) for k in keys]
        row += [len(g.runs), " ".join(_value(r.seed) for r in g.runs)]
        for s in stats:
            rec = g.stats(s).as_record()
            row += [rec["mean"], rec["std"], rec["min"], rec["max"]]
        row += [g.stats("train_time_s").mean, g.stats("steps").mean]
        writer.writerow(row)
    return out.getvalue()


def label(group_: Group) -> str:
    return ", ".join(f"{k}={_value(v)}" if k != "variant" else _value(v) for k, v in group_.params.items()) \
        or "all runs"


def write_output(flag: str, path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (readers see the old
    file or the new one); the temporary file is removed when that fails, and the failure is a
    ConfigError naming ``flag`` and ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{flag} {path}: cannot write it ({e.strerror or e})") from None
    return path


def plot(groups: list[Group], path: Path, flag: str = "--plot") -> Path:
    """Final test accuracy per group: each seed a dot, the mean ± std a bar (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.4, 1.1 * len(groups) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, g in enumerate(groups):
        s = g.stats("final_test_acc")
        values = [100 * v for v in s.values]
        ax.errorbar([i], [100 * s.mean], yerr=[100 * s.std], fmt="s", color="tab:blue", capsize=6, markersize=7,
                    label="mean ± std" if i == 0 else None)
        ax.plot([i + 0.12] * len(values), values, "o", color="tab:orange", alpha=0.7, markersize=4,
                label="each seed" if i == 0 else None)
    ax.set_xticks(range(len(groups)), [label(g) for g in groups], rotation=20, ha="right")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("final test accuracy per variant")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    return write_output(flag, path, png.getvalue())
