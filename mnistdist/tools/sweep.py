"""``mnistdist sweep``: one YAML file that expands to many runs, each a config file plus overrides.

A sweep file (see configs/sweeps/lessons.yaml)::

    name: lessons                  # optional; default: the file's name without .yaml
    config: ../seed.yaml           # optional; the config every run starts from
                                   # (default: configs/default.yaml); paths are relative to
                                   # the sweep file's directory, as `base:` in a config is
    overrides:                     # optional; section.key: value, for every run
      train.epochs: 10
    variants:                      # optional; named variants, each a config and/or overrides
      seed: {}
      mse: {config: ../mse.yaml}
      big_lr: {overrides: {train.lr: 0.1}}
    grid:                          # optional; every combination of these values
      train.global_batch_size: [100, 200]
    seeds: [0, 1, 2]               # optional; train.seed of each run

It expands to variants x grid x seeds (seeds innermost), in file order. Each element has a
stable name built from what varies (``mse-train.global_batch_size=100-seed2``) and trains in
``SWEEP_DIR/<name>`` (``SWEEP_DIR`` defaults to ``runs/sweeps/<sweep name>``). Later settings
win: the sweep's overrides, then the variant's, then the grid's, then the seed. Every run is
one W&B run in the group named after the sweep, tagged with its variant, grid values and seed.

Everything is checked when the file is loaded (every element's config is resolved), so a bad
sweep file is one ``ConfigError`` line before anything runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnistdist.config import DEFAULT_CONFIG, ConfigError, load_config, read_yaml, resolve_config_path
from mnistdist.rundir import CONFIG, SUMMARY

SWEEP_KEYS = ("name", "config", "overrides", "variants", "grid", "seeds")
VARIANT_KEYS = ("config", "overrides")
MANIFEST = "sweep.json"
"""Written into the sweep directory when runs start: what ``mnistdist compare`` reads to
label each run with its variant and grid values."""
MAX_RUNS = 10_000
MANIFEST_BYTES = 64 << 20
"""Largest manifest read (one of MAX_RUNS runs is a few MB)."""
BOOKKEEPING_SECTIONS = ("tracking", "checkpoint")
BOOKKEEPING_KEYS = ("data.root", "data.download", "data.num_workers", "train.log_every_steps",
                    "train.eval_per_process_batch_size", "train.stop_check_every_steps", "dist.timeout_s")
"""Config keys that never change what a run learns: bookkeeping, logging, where files are."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run a sweep: a YAML file that expands to many runs (variants x grid x seeds; "
                          "format in mnistdist/tools/sweep.py and docs/sweeps.md).")
    parser.add_argument("file", type=Path, metavar="SWEEP_FILE", help="e.g. configs/sweeps/lessons.yaml")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="the sweep directory, one run directory per run (default: runs/sweeps/<name>)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the runs, their status and how to submit them")
    what.add_argument("--run", type=int, metavar="INDEX",
                      help="train run INDEX (what a Slurm array task calls; works under a launcher); "
                           "a finished run is skipped, an interrupted one resumes")
    what.add_argument("--local", action="store_true",
                      help="train every run here, one after another, skipping finished ones and resuming "
                           "interrupted ones")
    what.add_argument("--print-run-dir", type=int, metavar="INDEX", help="print the run directory of run INDEX")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="with --local: processes per run (python -m mnistdist.launch; default 1)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="with --run/--local: overrides for every run, after the sweep's own "
                             "(for how it runs here, e.g. dist.device=cpu; they do not change run names)")


def main(args: argparse.Namespace) -> int:
    """List, run one element of (``--run``: the train command with its arguments), or run all of a sweep."""
    if args.processes < 1:
        raise ConfigError(f"--processes must be >= 1; got {args.processes}")
    loaded = load_sweep(resolve_config_path(args.file, "sweep file", under="sweeps"), args.out, args.overrides)
    if args.list:
        print(describe(loaded))
        return 0
    if args.print_run_dir is not None:
        print(loaded.element(args.print_run_dir).run_dir)
        return 0
    if args.local:
        return run_local(loaded, args.processes, args.overrides)
    element = loaded.element(args.run)
    from mnistdist.distributed import is_main_process

    if element.finished:  # checked by every rank before any process group: all skip together
        if is_main_process():
            print(f"sweep {loaded.name}: run {element.index} ({element.name}) finished before "
                  f"({element.run_dir / SUMMARY}); skipped", flush=True)
        return 0
    if is_main_process():
        write_manifest(loaded)
    from mnistdist.cli import train_main  # the run is the train command with the run's arguments

    return train_main(element.train_args(), prog=f"mnistdist sweep --run {element.index}")


@dataclass(frozen=True)
class Element:
    """One run of a sweep."""

    index: int
    name: str
    config: Path
    """The config file the run starts from (absolute)."""
    overrides: tuple[str, ...]
    """``section.key=value`` overrides, as train_dist.py takes them."""
    params: dict[str, Any] = field(hash=False)
    """What varies between the sweep's runs apart from the seed: ``variant`` and grid keys."""
    seed: int | None
    run_dir: Path

    def train_args(self) -> list[str]:
        """The arguments of ``train_dist.py`` that train this element."""
        return ["--config", str(self.config), "--run-dir", str(self.run_dir), *self.overrides]

    @property
    def finished(self) -> bool:
        """Its training ended (summary.json is the last file a finished run writes)."""
        return (self.run_dir / SUMMARY).is_file()


@dataclass(frozen=True)
class Sweep:
    name: str
    file: Path
    root: Path
    """The sweep directory: one run directory per element, and the manifest."""
    elements: list[Element]

    def element(self, index: int) -> Element:
        if not 0 <= index < len(self.elements):
            raise ConfigError(f"{self.file}: no run {index}: the sweep has {len(self.elements)} "
                              f"runs (0-{len(self.elements) - 1})")
        return self.elements[index]

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "file": str(self.file), "runs": [
            {"index": e.index, "name": e.name, "run_dir": e.run_dir.name, "params": e.params, "seed": e.seed,
             "overrides": list(e.overrides)} for e in self.elements]}


def override_text(key: str, value: Any) -> str:
    """``section.key=value`` that reads back (as YAML) to ``value``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and "e" in repr(value) and "." not in repr(value):
        text = repr(value).replace("e", ".0e")  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
    elif isinstance(value, (int, float, str)) and yaml.safe_load(str(value)) == value and "\n" not in str(value):
        text = str(value)
    else:
        text = json.dumps(value)
    return f"{key}={text}"


def _label(value: Any) -> str:
    text = override_text("", value)[1:]
    return _UNSAFE.sub("~", text)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping; got {type(value).__name__}")
    return value


def _overrides(where: str, value: Any) -> dict[str, Any]:
    """``{section.key: value}`` with every key spelled like one (checked again when loaded)."""
    out = {}
    for key, v in _mapping(where, value).items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigError(f"{where}: {key!r}: keys look like section.key (e.g. train.lr)")
        if isinstance(v, (dict, type(None))):
            raise ConfigError(f"{where}: {key}: must be a value; got {v!r}")
        out[key] = v
    return out


def _config_path(where: str, value: Any, directory: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a config file path (relative to the sweep file); got {value!r}")
    path = (directory / value).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: {value!r} not found (looked for {path})")
    return path


def load_sweep(path: str | Path, out_dir: str | Path | None = None, extra: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read, expand and check the sweep file at ``path``; ConfigError names what is wrong.

    ``extra`` overrides (from the command line: how the runs run here, e.g. dist.device=cpu)
    come last in every run's overrides; they do not change the runs' names."""
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a sweep file has {', '.join(SWEEP_KEYS)}")
    directory = path.resolve().parent

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{path}: name: letters, digits, '_', '.', '-' (not starting with a "
                          f"punctuation mark); got {name!r}")
    config = _config_path(f"{path}: config", data["config"], directory) if "config" in data else DEFAULT_CONFIG
    common = _overrides(f"{path}: overrides", data.get("overrides"))

    variants: dict[str, tuple[Path, dict[str, Any]]] = {}
    for vname, spec in _mapping(f"{path}: variants", data.get("variants")).items():
        where = f"{path}: variants: {vname}"
        if not isinstance(vname, str) or not _NAME.fullmatch(vname):
            raise ConfigError(f"{where}: variant names use letters, digits, '_', '.', '-'")
        spec = _mapping(where, spec)
        bad = [k for k in spec if k not in VARIANT_KEYS]
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r}; a variant has {', '.join(VARIANT_KEYS)}")
        vconfig = _config_path(f"{where}: config", spec["config"], directory) if "config" in spec else config
        variants[vname] = (vconfig, _overrides(f"{where}: overrides", spec.get("overrides")))
    if "variants" in data and not variants:
        raise ConfigError(f"{path}: variants: empty; leave it out for a sweep without variants")

    grid = _overrides(f"{path}: grid", data.get("grid"))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid: {key}: must be a non-empty list of values; got {values!r}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"{path}: grid: {key}: a value is listed twice")
    if "train.seed" in grid and "seeds" in data:
        raise ConfigError(f"{path}: grid: train.seed and seeds both set the seed; keep one")

    seeds: list[int | None] = [None]
    if "seeds" in data:
        seeds = data["seeds"]
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise ConfigError(f"{path}: seeds: must be a non-empty list of integers; got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{path}: seeds: a seed is listed twice")

    count = max(len(variants), 1) * len(seeds)
    for values in grid.values():
        count *= len(values)
    if count > MAX_RUNS:
        raise ConfigError(f"{path}: expands to {count} runs; at most {MAX_RUNS}")

    root = Path(out_dir) if out_dir is not None else Path("runs") / "sweeps" / name
    root = root.absolute()
    elements: list[Element] = []
    names: dict[str, int] = {}
    for vname, (vconfig, voverrides) in (variants.items() or [(None, (config, {}))]):
        for combo in itertools.product(*grid.values()):
            point = dict(zip(grid, combo))
            for seed in seeds:
                settings = {**common, **voverrides, **point}
                if seed is not None:
                    settings["train.seed"] = seed
                settings.setdefault("tracking.group", name)
                params = ({"variant": vname} if vname is not None else {}) | point
                parts = ([vname] if vname is not None else []) + [f"{k}={_label(v)}" for k, v in point.items()]
                parts += [f"seed{seed}"] if seed is not None else []
                ename = "-".join(parts) or "run"
                index = len(elements)
                if ename in names:
                    raise ConfigError(f"{path}: runs {names[ename]} and {index} would share the directory "
                                      f"name {ename!r}; make the variant names or grid values distinct")
                names[ename] = index
                overrides = [override_text(k, v) for k, v in settings.items()] + list(extra)
                where = f"{path}: run {index} ({ename})"
                try:
                    cfg = load_config(vconfig, overrides)
                except ConfigError as e:
                    raise ConfigError(f"{where}: {e}") from None
                tags = [f"sweep:{name}"] + ([f"variant:{vname}"] if vname else [])
                tags += [f"{k}={_label(v)}" for k, v in point.items()]
                tags += [f"seed:{seed}"] if seed is not None else []
                tags = list(dict.fromkeys(cfg.tracking.tags + [t[:64] for t in tags]))  # W&B: 64 chars a tag
                overrides.insert(len(settings), override_text("tracking.tags", tags))
                elements.append(Element(index, ename, vconfig, tuple(overrides), params, seed, root / ename))
    return Sweep(name, path, root, elements)


def describe(sweep: Sweep) -> str:
    """What ``mnistdist sweep FILE --list`` prints."""
    n = len(sweep.elements)
    done = sum(e.finished for e in sweep.elements)
    lines = [f"sweep {sweep.name}: {n} runs ({done} finished) in {sweep.root}"]
    width = max(len(e.name) for e in sweep.elements)
    for e in sweep.elements:
        status = "finished" if e.finished else ("started" if e.run_dir.exists() else "-")
        settings = " ".join(o for o in e.overrides if not o.startswith(("tracking.group=", "tracking.tags=")))
        lines.append(f"{e.index:>4}  {e.name:<{width}}  {status:<8}  {e.config.name} {settings}")
    lines.append(f"on Slurm: sbatch --array=0-{n - 1}%4 --export=ALL,SWEEP={sweep.file} slurm/sweep.sbatch "
                 "(%4: at most 4 runs at once)")
    return "\n".join(lines)


def read_file(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file at ``path``, or None when there is none; a ConfigError
    naming it when it is something else (a FIFO or a device: opened without blocking and
    refused, where reading could wait forever), unreadable or longer than ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit} bytes")
    return data


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config a run directory holds (its config.yaml, a mapping of sections), or
    None when it has none; a ConfigError naming the file when it is not a readable mapping
    (a FIFO or a device is refused before it is opened: reading one could wait forever)."""
    path = Path(run_dir) / CONFIG
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: not a regular file")
    data = read_yaml(path, "run config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a mapping of config sections")
    return data


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a sweep directory, or None when it has none (or an unreadable one)."""
    try:
        text = read_file(directory / MANIFEST, MANIFEST_BYTES)
        data = json.loads(text) if text is not None else None
    except (ConfigError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("runs"), list) else None


def write_manifest(sweep: Sweep) -> None:
    """The sweep directory's manifest (main process; every task of an array writes the same)."""
    from mnistdist.rundir import write_text_atomic

    sweep.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep.root / MANIFEST, json.dumps(sweep.manifest(), indent=1) + "\n")


def element_command(sweep: Sweep, index: int, processes: int, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The command that trains element ``index`` in its own process(es): ``mnistdist sweep
    FILE --run INDEX``, under ``python -m mnistdist.launch`` for several processes."""
    import sys

    run = ["-m", "mnistdist.cli", "sweep", str(sweep.file), "--out", str(sweep.root), "--run", str(index), *extra]
    if processes == 1:
        return [sys.executable, *run]
    launch_config = DEFAULT_CONFIG.parent / "accelerate" / "cpu.yaml"
    return [sys.executable, "-m", "mnistdist.launch", "--config_file", str(launch_config),
            "--num_processes", str(processes), *run]


def run_local(sweep: Sweep, processes: int = 1, extra: list[str] | tuple[str, ...] = ()) -> int:
    """Train every element here, one after another: finished ones are skipped, interrupted
    ones resume from their newest checkpoint (train_dist.py's ``--resume auto``). ``extra``:
    the command line's overrides, passed on to each run.

    Each element runs in fresh processes (nothing leaks from one run into the next).
    SIGINT, SIGTERM and SIGUSR1 are passed on to the running element, which checkpoints and
    stops; the sweep then stops too and says how to continue. A failed element is reported and
    the sweep goes on; the exit code is 1 when any failed.
    """
    import signal
    import subprocess

    from mnistdist.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED

    write_manifest(sweep)
    n = len(sweep.elements)
    failed: list[str] = []
    trained = skipped = 0
    child: subprocess.Popen | None = None
    requested: list[int] = []  # stop signals received

    def forward(signum: int, frame: object) -> None:
        # A terminal's Ctrl-C reaches the child directly too; the child counts the two as one
        # (signals.py debounces SIGINT for 1 s).
        requested.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        for e in sweep.elements:
            if requested:  # came between two runs
                print(f"sweep {sweep.name}: stopped by {signal.Signals(requested[0]).name} before run {e.index} "
                      f"({e.name}); run the same command again to continue", flush=True)
                return EXIT_INTERRUPTED if requested[0] == signal.SIGINT else EXIT_PREEMPTED
            if e.finished:
                print(f"[{e.index + 1}/{n}] {e.name}: finished before, skipped", flush=True)
                skipped += 1
                continue
            print(f"[{e.index + 1}/{n}] {e.name}: training in {e.run_dir}", flush=True)
            child = subprocess.Popen(element_command(sweep, e.index, processes, extra))
            code = child.wait()
            if code in (EXIT_INTERRUPTED, EXIT_PREEMPTED):
                how = "Ctrl-C" if code == EXIT_INTERRUPTED else "a stop signal"
                print(f"sweep {sweep.name}: stopped by {how} during run {e.index} ({e.name}), its checkpoint "
                      f"written; run the same command again to continue", flush=True)
                return code
            if code != 0:
                print(f"[{e.index + 1}/{n}] {e.name}: failed (exit {code}); going on with the next run", flush=True)
                failed.append(e.name)
            else:
                trained += 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"sweep {sweep.name}: {trained} trained, {skipped} skipped (finished before), {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else "") + f"; compare them: mnistdist compare {sweep.root}",
          flush=True)
    return 1 if failed else 0
