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

Loading a file checks its form, its size and every run's directory name; each element's
config is resolved when the element is asked for (``Sweep.element``), so one element's
lookup (``--run``, ``--print-run-dir``: what each Slurm array task calls) costs one config,
not the whole sweep. ``--list`` and ``--local`` resolve every element (``Sweep.check``), so
a bad sweep file is one ``ConfigError`` line before anything runs.

A run directory that holds a run of other settings than the sweep now gives is *stale*
(``Element.stale``): it is never counted as done, and ``--run``/``--local`` refuse it with
the keys that changed and how to go on.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import os
import re
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnistdist.config import (DEFAULT_CONFIG, Config, ConfigError, load_config, read_yaml, resolve_config_path,
                              trajectory_changes)
from mnistdist.rundir import CONFIG, LOCK, SUMMARY

SWEEP_KEYS = ("name", "config", "overrides", "variants", "grid", "seeds")
VARIANT_KEYS = ("config", "overrides")
MANIFEST = "sweep.json"
"""Written into the sweep directory when runs start: what ``mnistdist compare`` reads to
label each run with its variant and grid values."""
MAX_RUNS = 10_000
MANIFEST_BYTES = 64 << 20
"""Largest manifest read (one of MAX_RUNS runs is a few MB)."""
NAME_MAX = 255
"""Longest file name, in bytes, of the common filesystems (ext4, XFS, Lustre, NFS)."""
BOOKKEEPING_SECTIONS = ("tracking", "checkpoint")
BOOKKEEPING_KEYS = ("data.root", "data.download", "data.num_workers", "train.log_every_steps",
                    "train.eval_per_process_batch_size", "train.stop_check_every_steps", "dist.timeout_s")
"""Config keys that never change what a run learns: bookkeeping, logging, where files are."""
PLACEMENT_KEYS = ("dist.device", "dist.threads_per_process", "dist.compile", "dist.cuda_graph", "data.pipeline")
"""Keys that say where and how fast a run trains, not what it learns: the overrides a Slurm
task (DEVICE) or ``--local`` adds for the machine. A finished run is not stale for them."""
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
    one = args.run if args.run is not None else args.print_run_dir
    loaded = load_sweep(resolve_config_path(args.file, "sweep file", under="sweeps"), args.out, args.overrides,
                        check=one is None)
    if args.list:
        print(describe(loaded))
        return 0
    if args.local:
        return run_local(loaded, args.processes, args.overrides)
    element = loaded.element(one)
    why = element.stale()  # (every rank of a launched --run checks, before any process group)
    if why is not None:
        raise ConfigError(f"{loaded.file}: run {element.index} ({element.name}): {element.run_dir} holds a run "
                          f"of other settings than the sweep now gives ({why}); {FIX}")
    if args.print_run_dir is not None:
        print(element.run_dir)
        return 0
    from mnistdist.ranks import is_main_process

    if element.finished:  # checked by every rank before any process group: all skip together
        if is_main_process():
            print(f"sweep {loaded.name}: run {element.index} ({element.name}) finished before "
                  f"({element.run_dir / SUMMARY}); skipped", flush=True)
        return 0
    if is_main_process():
        write_manifest(loaded)
    from mnistdist.cli import train_main  # the run is the train command with the run's arguments

    return train_main(element.train_args(), prog=f"mnistdist sweep --run {element.index}")


FIX = ("to train the sweep as it is now, give it another --out DIR, or delete what is there "
       "(or restore the sweep file)")


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
    resolved: Config = field(hash=False, compare=False, repr=False)
    """The config the run trains with (``config`` + ``overrides``)."""

    def train_args(self) -> list[str]:
        """The arguments of ``train_dist.py`` that train this element."""
        return ["--config", str(self.config), "--run-dir", str(self.run_dir), *self.overrides]

    @property
    def finished(self) -> bool:
        """Its training ended (summary.json is the last file a finished run writes)."""
        return (self.run_dir / SUMMARY).is_file()

    def stale(self) -> str | None:
        """Why what the run directory holds is not a run of this element (the keys that differ,
        ``train.epochs: 1 -> 2``), or None. A finished run is stale when any key that decides
        its result differs (all but bookkeeping and placement keys); an unfinished one when a
        resume would refuse its checkpoint (``config.TRAJECTORY_KEYS``), since a resume
        applies every other key."""
        try:
            saved = read_run_config(self.run_dir)
        except ConfigError as e:
            return f"{e}" if self.finished else None  # (an unfinished run: training reports it)
        if saved is None:
            return None
        if self.finished:
            now = self.resolved.to_dict()
            changes = [(f"{s}.{k}", saved[s][k], v) for s, section in now.items() for k, v in section.items()
                       if s not in BOOKKEEPING_SECTIONS and f"{s}.{k}" not in (*BOOKKEEPING_KEYS, *PLACEMENT_KEYS)
                       and isinstance(saved.get(s), dict) and saved[s].get(k) is not None and saved[s][k] != v]
        else:
            changes = trajectory_changes(saved, self.resolved)
        if not changes:
            return None
        return ", ".join(f"{key}: {_text(old)} -> {_text(new)}" for key, old, new in changes)


def _text(value: Any) -> str:
    """A config value as YAML text, shortened."""
    text = override_text("", value)[1:]
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Variant:
    name: str | None
    config: Path
    overrides: dict[str, Any]


class Sweep:
    """A loaded sweep file: its runs, each built (and its config resolved) when asked for.

    ``root`` is the sweep directory (one run directory per element, and the manifest);
    ``names`` the name of every element, known at once (and checked: unique, short enough)."""

    def __init__(self, name: str, file: Path, root: Path, common: dict[str, Any], variants: list[Variant],
                 grid: dict[str, list[Any]], seeds: list[int | None], extra: tuple[str, ...]) -> None:
        self.name, self.file, self.root = name, file, root
        self.common, self.variants, self.grid, self.seeds, self.extra = common, variants, grid, seeds, extra
        self.size = len(variants) * math.prod(len(v) for v in grid.values()) * len(seeds)
        self.names = self._names()

    def _names(self) -> list[str]:
        """Every element's name (each one a directory name: unique, at most NAME_MAX bytes)."""
        grid_labels = [[f"{k}={_label(v)}" for v in values] for k, values in self.grid.items()]
        seed_labels = [[f"seed{s}"] if s is not None else [] for s in self.seeds]
        names: list[str] = []
        first: dict[str, int] = {}
        for variant in self.variants:
            for combo in itertools.product(*grid_labels):
                for seed_label in seed_labels:
                    name = "-".join([*([variant.name] if variant.name else []), *combo, *seed_label]) or "run"
                    if name in first:
                        raise ConfigError(f"{self.file}: runs {first[name]} and {len(names)} would share the "
                                          f"directory name {name!r}; make the variant names or grid values distinct")
                    if len(name.encode()) > NAME_MAX:
                        raise ConfigError(f"{self.file}: run {len(names)}: its directory name {name[:60]}... is "
                                          f"{len(name.encode())} bytes long; at most {NAME_MAX} (shorten the "
                                          "variant names or grid values)")
                    first[name] = len(names)
                    names.append(name)
        return names

    def _spec(self, index: int) -> tuple[Variant, dict[str, Any], int | None]:
        """(variant, grid point, seed) of element ``index``: the mixed-radix digits of the
        index, in the order of the expansion (variants outermost, seeds innermost)."""
        index, s = divmod(index, len(self.seeds))
        picks = []
        for values in reversed(self.grid.values()):
            index, j = divmod(index, len(values))
            picks.append(values[j])
        return self.variants[index], dict(zip(self.grid, reversed(picks))), self.seeds[s]

    def _settings(self, variant: Variant, point: dict[str, Any], seed: int | None) -> list[str]:
        """The sweep's own overrides of one element, later settings winning (no tags)."""
        settings = {**self.common, **variant.overrides, **point}
        if seed is not None:
            settings["train.seed"] = seed
        settings.setdefault("tracking.group", self.name)
        return [_override_text_cached(k, json.dumps(v, sort_keys=True)) for k, v in settings.items()]

    def element(self, index: int) -> Element:
        """Element ``index``, its config resolved (a ConfigError naming it when that fails)."""
        if not 0 <= index < self.size:
            raise ConfigError(f"{self.file}: no run {index}: the sweep has {self.size} runs (0-{self.size - 1})")
        variant, point, seed = self._spec(index)
        name = self.names[index]
        settings = self._settings(variant, point, seed)
        overrides = settings + list(self.extra)
        try:
            cfg = load_config(variant.config, overrides)
        except ConfigError as e:
            raise ConfigError(f"{self.file}: run {index} ({name}): {e}") from None
        tags = [f"sweep:{self.name}"] + ([f"variant:{variant.name}"] if variant.name else [])
        tags += [f"{k}={_label(v)}" for k, v in point.items()]
        tags += [f"seed:{seed}"] if seed is not None else []
        tags = list(dict.fromkeys(cfg.tracking.tags + [t[:64] for t in tags]))  # W&B: 64 chars a tag
        cfg.tracking.tags = tags  # what the override below gives
        overrides.insert(len(settings), override_text("tracking.tags", tags))
        params = ({"variant": variant.name} if variant.name is not None else {}) | point
        return Element(index, name, variant.config, tuple(overrides), params, seed, self.root / name, cfg)

    @functools.cached_property
    def elements(self) -> list[Element]:
        """Every element, each config resolved (see ``check``)."""
        return [self.element(i) for i in range(self.size)]

    def check(self) -> None:
        """Resolve every element's config; a ConfigError names the first bad one, or two runs
        that would train the same config (tracking aside: e.g. ``train.lr: [0.001, '1e-3']``)."""
        first: dict[str, Element] = {}
        for e in self.elements:
            learned = e.resolved.to_dict()
            learned.pop("tracking")
            key = json.dumps(learned, sort_keys=True)
            if key in first:
                raise ConfigError(f"{self.file}: runs {first[key].index} ({first[key].name}) and {e.index} "
                                  f"({e.name}) train the same config; keep one of them")
            first[key] = e

    def manifest(self) -> dict[str, Any]:
        """What ``write_manifest`` writes (no config is resolved for it)."""
        runs = []
        for i, name in enumerate(self.names):
            variant, point, seed = self._spec(i)
            params = ({"variant": variant.name} if variant.name is not None else {}) | point
            runs.append({"index": i, "name": name, "run_dir": name, "params": params, "seed": seed,
                         "overrides": self._settings(variant, point, seed) + list(self.extra)})
        return {"name": self.name, "file": str(self.file), "runs": runs}


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


@functools.lru_cache(maxsize=65536)
def _override_text_cached(key: str, value_json: str) -> str:
    """``override_text`` of a JSON-encoded value: a sweep's values repeat over its runs."""
    return override_text(key, json.loads(value_json))


def _label(value: Any) -> str:
    text = override_text("", value)[1:]
    return _UNSAFE.sub("~", text)


def _same(value: Any) -> str:
    """What makes two grid values one: equal numbers (1 and 1.0, 1e-3 and 1.0e-3) are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return repr(float(value))
        except OverflowError:
            return repr(value)
    return json.dumps(value, sort_keys=True)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping; got {type(value).__name__}")
    return value


_SCALARS = (str, int, float, bool)


def _check_value(where: str, key: str, v: Any) -> None:
    """An override's value is what a command line can say: a YAML scalar or a list of them."""
    if isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v)):
        return
    if isinstance(v, (datetime.date, datetime.datetime)):
        raise ConfigError(f"{where}: {key}: {v} is a date; quote it to mean text")
    raise ConfigError(f"{where}: {key}: must be a number, text, true/false or a list of them; got {v!r:.60}")


def _overrides(where: str, value: Any, grid: bool = False) -> dict[str, Any]:
    """``{section.key: value}`` with every key spelled like one (checked again when loaded);
    with ``grid``, each value is a list of such values."""
    out = {}
    for key, v in _mapping(where, value).items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigError(f"{where}: {key!r}: keys look like section.key (e.g. train.lr)")
        if grid and isinstance(v, list):
            for item in v:
                _check_value(where, key, item)
        elif not grid:
            _check_value(where, key, v)
        out[key] = v
    return out


def _config_path(where: str, value: Any, directory: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a config file path (relative to the sweep file); got {value!r}")
    path = (directory / value).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: {value!r} not found (looked for {path})")
    return path


def load_sweep(path: str | Path, out_dir: str | Path | None = None, extra: list[str] | tuple[str, ...] = (),
               check: bool = True) -> Sweep:
    """Read and check the sweep file at ``path``; ConfigError names what is wrong. With
    ``check``, every element's config is resolved too (``Sweep.check``); without, only the
    elements asked for (``Sweep.element``).

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
    if len(name.encode()) > NAME_MAX:
        raise ConfigError(f"{path}: name: at most {NAME_MAX} bytes (it names the sweep directory); "
                          f"got {len(name.encode())}")
    config = _config_path(f"{path}: config", data["config"], directory) if "config" in data else DEFAULT_CONFIG
    common = _overrides(f"{path}: overrides", data.get("overrides"))

    variants: list[Variant] = []
    for vname, spec in _mapping(f"{path}: variants", data.get("variants")).items():
        where = f"{path}: variants: {vname}"
        if not isinstance(vname, str) or not _NAME.fullmatch(vname):
            raise ConfigError(f"{where}: variant names use letters, digits, '_', '.', '-'")
        spec = _mapping(where, spec)
        bad = [k for k in spec if k not in VARIANT_KEYS]
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r}; a variant has {', '.join(VARIANT_KEYS)}")
        vconfig = _config_path(f"{where}: config", spec["config"], directory) if "config" in spec else config
        variants.append(Variant(vname, vconfig, _overrides(f"{where}: overrides", spec.get("overrides"))))
    if "variants" in data and not variants:
        raise ConfigError(f"{path}: variants: empty; leave it out for a sweep without variants")

    grid = _overrides(f"{path}: grid", data.get("grid"), grid=True)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid: {key}: must be a non-empty list of values; got {values!r}")
        if len({_same(v) for v in values}) != len(values):
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
    sweep = Sweep(name, path, root.absolute(), common, variants or [Variant(None, config, {})], grid, seeds,
                  tuple(extra))
    if check:
        sweep.check()
    return sweep


def describe(sweep: Sweep) -> str:
    """What ``mnistdist sweep FILE --list`` prints: each run's status is ``finished``,
    ``stale`` (followed by the keys that changed), ``running`` (its run directory is held by
    a job), ``started`` (resumes from its newest checkpoint) or ``-``."""
    rows, counts = [], dict.fromkeys(("finished", "stale", "running"), 0)
    width = max(len(name) for name in sweep.names)
    for e in sweep.elements:
        why = e.stale()
        if why is not None:
            status = "stale"
        elif e.finished:
            status = "finished"
        elif lock_holder(e.run_dir) is not None:
            status = "running"
        else:
            status = "started" if e.run_dir.exists() else "-"
        counts[status] = counts.get(status, 0) + 1
        settings = " ".join(o for o in e.overrides if not o.startswith(("tracking.group=", "tracking.tags=")))
        rows.append(f"{e.index:>4}  {e.name:<{width}}  {status:<8}  {e.config.name} {settings}"
                    + (f"  [was: {why}]" if why is not None else ""))
    state = ", ".join([f"{counts['finished']} finished"] + [f"{counts[k]} {k}" for k in ("stale", "running")
                                                           if counts[k]])
    lines = [f"sweep {sweep.name}: {sweep.size} runs ({state}) in {sweep.root}", *rows]
    if counts["stale"]:
        lines.append(f"stale: {counts['stale']} run directories hold runs of other settings than the sweep now "
                     f"gives (their [was: ...]); --run and --local refuse them: {FIX}")
    lines.append(f"on Slurm: sbatch --array=0-{sweep.size - 1}%4 --export=ALL,SWEEP={sweep.file} slurm/sweep.sbatch "
                 "(%4: at most 4 runs at once)")
    return "\n".join(lines)


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run directory's lock (the holder line a training job writes into
    ``.lock``, see rundir.claim), or None when no job holds it. Creates nothing: a shared
    flock is tried on the existing lock file and let go at once."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 1024).decode(errors="replace").strip()
            return " ".join(text.split()) or "another process"
        except OSError:
            return None
        return None
    finally:
        os.close(fd)  # (lets go of the shared lock, when it was had)


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
    """The sweep directory's manifest (main process; every task of an array writes the same,
    so it is written only when it differs from what is there). A directory that cannot be
    made or written is one ConfigError line."""
    from mnistdist.rundir import write_text_atomic

    manifest = sweep.manifest()
    if read_manifest(sweep.root) == manifest:
        return
    try:
        sweep.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(sweep.root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    except OSError as e:
        raise ConfigError(f"sweep directory {sweep.root}: cannot write there ({e.strerror or e}); "
                          "give another --out DIR") from None


def element_command(sweep: Sweep, index: int, processes: int, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The command that trains element ``index`` in its own process(es): ``mnistdist sweep
    FILE --run INDEX``, under ``python -m mnistdist.launch`` for several processes."""
    run = ["-m", "mnistdist.cli", "sweep", str(sweep.file), "--out", str(sweep.root), "--run", str(index), *extra]
    if processes == 1:
        return [sys.executable, *run]
    launch_config = DEFAULT_CONFIG.parent / "accelerate" / "cpu.yaml"
    return [sys.executable, "-m", "mnistdist.launch", "--config_file", str(launch_config),
            "--num_processes", str(processes), *run]


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` for Popen: the child gets SIGTERM when this process ends, however it
    ends (SIGKILL too; Linux's PR_SET_PDEATHSIG). SIGTERM is a run's checkpointed stop; a
    launcher passes it on to its workers (which stop by themselves, too, once their launcher
    is gone: signals._stop_when_orphaned). None where the kernel has no such request.

    The kernel sends the signal when the *thread* that started the child ends: call Popen from
    the main thread."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    parent = os.getpid()

    def preexec() -> None:
        prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGTERM))
        if os.getppid() != parent:  # this process ended before the request was made
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def run_local(sweep: Sweep, processes: int = 1, extra: list[str] | tuple[str, ...] = ()) -> int:
    """Train every element here, one after another: finished ones are skipped, interrupted
    ones resume from their newest checkpoint (train_dist.py's ``--resume auto``), and ones
    whose run directory another job holds are left to it (``running elsewhere``). ``extra``:
    the command line's overrides, passed on to each run. Stale run directories (see
    ``Element.stale``) are refused, all of them in one line, before anything runs.

    Each element runs in fresh processes (nothing leaks from one run into the next), which end
    with the sweep, however it ends (``die_with_this_process``).
    SIGINT, SIGTERM and SIGUSR1 are passed on to the running element, which checkpoints and
    stops; the sweep then stops too and says how to continue. A failed element is reported and
    the sweep goes on; the exit code is 1 when any failed.
    """
    import subprocess

    from mnistdist.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED

    stale = [(e, why) for e in sweep.elements if (why := e.stale()) is not None]
    if stale:
        (e, why), more = stale[0], len(stale) - 1
        raise ConfigError(f"{sweep.file}: {len(stale)} of the sweep's run directories hold runs of other settings "
                          f"than the sweep now gives (run {e.index} ({e.name}): {why}"
                          + (f"; and {more} more: mnistdist sweep {sweep.file} --list" if more else "")
                          + f"); {FIX}")
    write_manifest(sweep)
    n = sweep.size
    failed: list[str] = []
    elsewhere: list[str] = []
    trained = skipped = 0
    child: subprocess.Popen | None = None
    requested: list[int] = []  # stop signals received
    preexec = die_with_this_process()

    def forward(signum: int, frame: object) -> None:
        # A terminal's Ctrl-C reaches the child directly too; the child counts the two as one
        # (signals.py debounces SIGINT for 1 s).
        requested.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def held(e: Element) -> bool:
        holder = lock_holder(e.run_dir)
        if holder is not None:
            print(f"[{e.index + 1}/{n}] {e.name}: running elsewhere ({holder}); left to it", flush=True)
            elsewhere.append(e.name)
        return holder is not None

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
            if held(e):
                continue
            print(f"[{e.index + 1}/{n}] {e.name}: training in {e.run_dir}", flush=True)
            child = subprocess.Popen(element_command(sweep, e.index, processes, extra), preexec_fn=preexec)
            code = child.wait()
            if code in (EXIT_INTERRUPTED, EXIT_PREEMPTED):
                how = "Ctrl-C" if code == EXIT_INTERRUPTED else "a stop signal"
                print(f"sweep {sweep.name}: stopped by {how} during run {e.index} ({e.name}), its checkpoint "
                      f"written; run the same command again to continue", flush=True)
                return code
            if code == 0:
                trained += 1
            elif held(e):  # another job took the run directory between the check and our start
                pass
            elif e.finished:
                print(f"[{e.index + 1}/{n}] {e.name}: finished by another job meanwhile; skipped", flush=True)
                skipped += 1
            else:
                print(f"[{e.index + 1}/{n}] {e.name}: failed (exit {code}); going on with the next run", flush=True)
                failed.append(e.name)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"sweep {sweep.name}: {trained} trained, {skipped} skipped (finished before), "
          + (f"{len(elsewhere)} running elsewhere, " if elsewhere else "") + f"{len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else "") + f"; compare them: mnistdist compare {sweep.root}",
          flush=True)
    return 1 if failed else 0
