"""Compare finished runs: ``mnistdist compare DIR...``.

A DIR is a sweep directory (its ``sweep.json`` labels each run with its variant and grid
values), a run directory, or a directory of run directories. Runs are grouped by what varies
between them apart from the seed: a sweep's variant and grid keys, else every config key
whose value differs between the runs (and the number of processes, when that differs).
Each group gets the mean ± standard deviation over its seeds, and the range, of the final and
the best test accuracy, the mean training time and the steps, all read from the runs' own
``summary.json``; runs without one (unfinished) are left out with a note.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnistdist.config import ConfigError
from mnistdist.rundir import RunDir, write_text_atomic
from mnistdist.tools.sweep import read_manifest

# Keys that never make runs differ in what they learn: bookkeeping, logging, where files are.
IGNORED_SECTIONS = ("tracking", "checkpoint")
IGNORED_KEYS = ("train.seed", "data.root", "data.download", "train.log_every_steps", "data.num_workers",
                "train.eval_per_process_batch_size", "train.stop_check_every_steps", "dist.timeout_s")



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
    written = []
    try:
        if args.csv is not None:
            write_text_atomic(args.csv, to_csv(groups))
            written.append(args.csv)
        if not args.no_plot:
            written.append(plot(groups, args.plot or args.dirs[0] / "compare.png"))
    except OSError as e:
        raise ConfigError(f"cannot write {e.filename or 'output'}: {e.strerror or e}") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"groups": [g.as_record() for g in groups], "left_out": notes}))
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
    """What varies (None until known: taken from the configs for runs outside a sweep)."""
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def seed(self) -> Any:
        return self.config.get("train", {}).get("seed")


def _load_run(run_dir: Path, params: dict[str, Any] | None, notes: list[str]) -> RunResult | None:
    run = RunDir(run_dir)
    try:
        summary = json.loads(run.summary.read_text())
        config = yaml.safe_load(run.config.read_text())
    except FileNotFoundError as e:
        notes.append(f"{run_dir}: no {Path(e.filename).name} (not finished?); left out")
        return None
    except (OSError, ValueError, yaml.YAMLError) as e:
        notes.append(f"{run_dir}: unreadable ({type(e).__name__}); left out")
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("final_test_acc"), (int, float)):
        notes.append(f"{run.summary}: no final_test_acc; left out")
        return None
    return RunResult(run_dir, params, config if isinstance(config, dict) else {}, summary)


def collect(dirs: list[Path]) -> tuple[list[RunResult], list[str]]:
    """The finished runs under ``dirs`` and one note per run left out."""
    runs: list[RunResult] = []
    notes: list[str] = []
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"{d}: no such directory")
        manifest = read_manifest(d)
        if manifest is not None:
            for entry in manifest["runs"]:
                run = _load_run(d / entry["run_dir"], dict(entry.get("params") or {}), notes)
                if run is not None:
                    runs.append(run)
        elif RunDir(d).config.is_file():
            run = _load_run(d, None, notes)
            runs += [run] if run else []
        else:
            found = sorted(p for p in d.iterdir() if RunDir(p).config.is_file())
            if not found:
                raise ConfigError(f"{d}: neither a sweep directory (sweep.json) nor a run directory "
                                  "(config.yaml), nor a directory of run directories")
            for p in found:
                run = _load_run(p, None, notes)
                runs += [run] if run else []
    if not runs:
        raise ConfigError("no finished runs to compare (" + "; ".join(notes[:3]) + ")")
    _fill_params(runs)
    return runs, notes


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in config.items() if isinstance(section, dict)
            for k, v in section.items() if s not in IGNORED_SECTIONS and f"{s}.{k}" not in IGNORED_KEYS}


def _fill_params(runs: list[RunResult]) -> None:
    """Params of runs outside a sweep: the config keys that differ between them; and the
    number of processes for every run when that differs."""
    loose = [r for r in runs if r.params is None]
    flats = [_flat(r.config) for r in loose]
    keys = sorted({k for f in flats for k in f})
    varied = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    for run, flat in zip(loose, flats):
        run.params = {k: flat.get(k) for k in varied}
    if len({r.summary.get("world_size") for r in runs}) > 1:
        for run in runs:
            run.params["processes"] = run.summary.get("world_size")


@dataclass
class Stats:
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (0 for one value)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def as_record(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "min": min(self.values), "max": max(self.values),
                "values": self.values}


@dataclass
class Group:
    params: dict[str, Any]
    runs: list[RunResult]

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
    """Runs with the same params together, in the order they first appear."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(run.params, sort_keys=True)
        groups.setdefault(key, Group(dict(run.params), [])).runs.append(run)
    return list(groups.values())


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
        labels = [_value(g.params.get(k)) for k in keys] if g.params else ["all runs"]
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


def plot(groups: list[Group], path: Path) -> Path:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path
