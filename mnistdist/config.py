"""Typed run configuration: dataclasses mirrored by YAML, with dotted CLI overrides.

Precedence, highest first: CLI overrides (``train.lr=0.05``) > ``MNISTDIST_DATA_ROOT`` (for
``data.root`` only) > the YAML file and its ``base:`` chain > the dataclass defaults below,
where every field has a docstring. Unknown keys, wrong types and impossible values raise
``ConfigError``: one line naming the key (and the file that set it), exit code 2 before any
process group starts. All YAML is read, bounded, by ``read_yaml``. docs/config.md says why
this is not a config library.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import reprlib
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DATA_ROOT_ENV = "MNISTDIST_DATA_ROOT"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configs, inside the package (a checkout's top-level ``configs`` links here)."""
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
"""The config used when none is named."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""Upper bound of every ``*timeout_s`` (one week): torch's TCPStore and gloo count timeouts in
int64 nanoseconds and fail at once from about 9.2e9 s."""
MNIST_TRAIN_IMAGES = 60_000
"""Images in MNIST's training set: ``data.validation_size`` holds some of them out."""
MAX_SEED = 2**32 - 1
"""The largest ``train.seed``: accelerate's ``set_seed`` also seeds numpy, which takes no more."""


class ConfigError(ValueError):
    """A bad configuration value; its message is one line meant for the user."""


_repr = reprlib.Repr()  # builds a short repr of a huge value without building the full one
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxdict = 6
_repr.maxlevel = 3


def _cut(text: str, limit: int = 100) -> str:
    """``text`` (a key as typed, say) cut to at most ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """``repr(value)`` cut short, however large the value is: what a message shows of it."""
    return _cut(_repr.repr(value))


@dataclass
class ModelConfig:
    final_relu: bool = False
    """Apply ReLU to the logits as the seed script does. It can leave whole classes dead
    (a logit stuck at 0 gets no gradient), so it is off except in configs/seed.yaml."""

    dtype: Literal["float32", "float64"] = "float32"
    """Parameter precision. float64 (slower) is for numerical checks: it shrinks rounding
    differences, e.g. between 1 and N processes summing gradients in another order."""


@dataclass
class DataConfig:
    root: str = "data"
    """Directory that holds ``MNIST/raw/`` (torchvision layout). ``MNISTDIST_DATA_ROOT``
    overrides it; a CLI override beats both."""

    pipeline: Literal["tensor", "torchvision"] = "tensor"
    """``tensor``: images normalized once on the training device, batches gathered by index.
    ``torchvision``: the seed's per-sample ToTensor/Normalize DataLoader (the slow baseline).
    Both yield the same samples in the same order for the same seed."""

    download: bool = True
    """Download MNIST when the files are missing (local rank 0 of each node, others wait)."""

    num_workers: int = 0
    """DataLoader worker processes for the ``torchvision`` pipeline (ignored by ``tensor``)."""

    normalize_mean: float = 0.1307
    """Mean used to normalize pixel values in [0, 1] (the seed's MNIST constant)."""

    normalize_std: float = 0.3081
    """Standard deviation used to normalize pixel values in [0, 1]."""

    validation_size: int = 0
    """Training images held out as a validation set (0..59999; 0 = none, the seed's recipe;
    5000 is usual), drawn by ``train.seed`` alike at any number of processes. Each epoch is
    then evaluated on it, the best model is kept as ``RUN_DIR/best.safetensors``, and the test
    set is evaluated once, at the end, for the final and the best model."""


@dataclass
class TrainConfig:
    epochs: int = 10
    """Passes over the 60,000 training images."""

    global_batch_size: int = 200
    """Samples per optimizer step summed over all processes; each process takes
    global_batch_size / num_processes, so results do not depend on the world size."""

    lr: float = 0.1
    """Peak learning rate of SGD."""

    momentum: float = 0.9
    """SGD momentum (0 = plain SGD as in the seed)."""

    nesterov: bool = True
    """Use Nesterov momentum (needs momentum > 0)."""

    weight_decay: float = 5e-4
    """L2 penalty added by SGD (the default beat 0 over three seeds: docs/config.md)."""

    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """``constant``: lr throughout. ``cosine``: linear warm-up, then cosine decay to 0."""

    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr (cosine schedule only)."""

    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    """``cross_entropy`` on logits, or ``mse`` between softmax outputs and one-hot targets
    (the seed's comparison of the two)."""

    seed: int = 0
    """Seeds the initialisation and the DistributedSampler's shuffle; same on every rank.
    0..2**32-1 (numpy's range)."""

    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = no limit); for smoke tests."""

    log_every_steps: int = 50
    """Optimizer steps between training lines in metrics.jsonl (each one all-reduces the loss)."""

    eval_per_process_batch_size: int = 2000
    """Test images per forward pass on each process during evaluation."""

    stop_check_every_steps: int = 10
    """Steps between the ranks' agreement on stop signals (SIGTERM/SIGUSR1/Ctrl-C), one tiny
    all-reduce that makes every rank stop after the same step; 1 stops after the very next
    step, larger values cost less (docs/config.md). NaN/Inf gradients are caught before every
    update regardless; with ``dist.cuda_graph`` a non-finite update is skipped at once, but
    the run stops only at the next agreement (larger values save a host-device sync there)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Also checkpoint every this many optimizer steps (0 = only at the end of each epoch)."""

    keep_last: int = 2
    """Newest checkpoints kept in RUN_DIR/checkpoints (0 = keep all). Older ones are deleted
    only after a newer one is complete."""


@dataclass
class DistConfig:
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """``auto``: the best device here, CUDA, then Apple's MPS, then the CPU (one line says
    which). CPU processes talk gloo, GPUs NCCL."""

    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """``bf16`` autocast for training (parameters and evaluation sums stay fp32/fp64). ``auto``
    follows the launcher (``accelerate launch --mixed_precision``), else ``no``; an explicit
    value wins, with one warning when they disagree. A GPU without bf16 falls back to fp32;
    on a CPU bf16 runs, slower than fp32."""

    threads_per_process: int = 0
    """CPU threads of each process (``torch.set_num_threads``). 0 follows the launcher
    (``OMP_NUM_THREADS``: torchrun and accelerate set 1 when several processes share a
    machine), else torch's default; an explicit value wins, with one warning."""

    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """``torch.compile`` the forward pass and loss with this mode (``reduce-overhead`` also
    captures CUDA graphs). GPU only: on CPU it falls back to eager with one warning, as it is
    no faster there (docs/config.md)."""

    cuda_graph: bool = False
    """Capture the whole training step once as a CUDA graph and replay it: the fast path of
    one GPU. Falls back to the eager step, with one warning, with several processes, bf16 or no CUDA."""

    timeout_s: float = 300.0
    """Process-group timeout: a collective that waits longer than this fails instead of
    hanging (for example when another rank died). At most one week."""


@dataclass
class TrackingConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """W&B: ``auto`` is online when an API key is configured (WANDB_API_KEY or ~/.netrc), else
    offline. The environment variable WANDB_MODE always wins. The key is never read from here."""

    tensorboard: bool = True
    """Also write TensorBoard event files to ``RUN_DIR/tensorboard/`` (the same values as
    metrics.jsonl), for clusters where W&B is blocked; independent of ``mode``."""

    plots: bool = True
    """At the end, write the loss, accuracy and confusion-matrix PNGs into ``RUN_DIR/plots/``
    and send them to W&B and TensorBoard as images. ``false`` skips them (about a second per
    run, e.g. for sweeps of many runs); ``mnistdist plot RUN_DIR`` draws them later from
    metrics.jsonl."""

    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """Progress on the main process: ``bar`` (tqdm), ``lines`` (every ``train.log_every_steps``
    steps and at each epoch end: readable in Slurm logs), ``off``. ``auto``: a bar on a
    terminal, lines otherwise. ``TQDM_DISABLE=1`` means off."""

    project: str = "mnistdist"
    """W&B project."""

    entity: str = ""
    """W&B entity (user or team); empty = your default entity."""

    run_name: str = ""
    """Display name; empty = the run directory's name."""

    group: str = ""
    """W&B group, e.g. to put the seeds of one experiment together."""

    tags: list[str] = field(default_factory=list)
    """W&B tags (a YAML list, or comma-separated on the command line)."""

    init_timeout_s: float = 60.0
    """Longest wait for W&B to start; after it the run is logged offline instead."""

    finish_timeout_s: float = 60.0
    """Longest wait for W&B to finish uploading at the end (the rest stays on disk for wandb
    sync); at most 80% of ``dist.timeout_s``, which bounds the other ranks' wait for it."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where MNIST lives and how batches are built."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""

    dist: DistConfig = field(default_factory=DistConfig)
    """Devices and the process group."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When to checkpoint and how many checkpoints to keep."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Weights & Biases."""

    def to_dict(self) -> dict[str, Any]:
        """The config as nested dicts (``section -> key -> value``)."""
        return dataclasses.asdict(self)


@functools.cache
def _section_types(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, worked out once per class (a sweep loads many configs)."""
    return typing.get_type_hints(cls)


_SCALARS = {bool: "true or false", int: "an integer", str: "a string"}
"""The scalar field types taken exactly as YAML reads them, and how messages name them."""


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Return ``value`` converted to ``typ`` or raise ConfigError naming ``key``."""
    if typing.get_origin(typ) is Literal:
        allowed = typing.get_args(typ)
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted `off` or `no` as False: give back the literal it
            # spelled when exactly one allowed value is such a spelling.
            spellings = ("true", "yes", "on") if value else ("false", "no", "off")
            matches = [a for a in allowed if str(a).lower() in spellings]
            if len(matches) == 1:
                return matches[0]
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {_show(value)}")
        return value
    if typ in _SCALARS:
        if type(value) is not typ:  # True is not an integer here, nor 1 a boolean
            raise ConfigError(f"{key}: must be {_SCALARS[typ]}; got {_show(value)}")
        return value
    if typ is float:
        try:  # a quoted number ("1e-3") counts too
            number = float(value) if type(value) in (int, float, str) else None
        except ValueError:
            number = None
        except OverflowError:  # an int beyond float's range
            raise ConfigError(f"{key}: must be a finite number; got {_show(value)}") from None
        if number is None:
            raise ConfigError(f"{key}: must be a number; got {_show(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number; got {number}")
        return number
    if typing.get_origin(typ) is list:
        if isinstance(value, str):  # "a,b" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: must be a list of strings; got {_show(value)}")
    raise AssertionError(f"unsupported config type {typ} for {key}")


def _apply(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.name`` on ``cfg`` with type checking."""
    sections = _section_types(Config)
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"{_cut(key)}: unknown key; sections are {', '.join(sections)}")
    section_name, name = parts
    section = getattr(cfg, section_name)
    fields = _section_types(type(section))
    if name not in fields:
        raise ConfigError(f"{_cut(key)}: unknown key; {section_name} has {', '.join(fields)}")
    setattr(section, name, _coerce(key, value, fields[name]))


MAX_YAML_BYTES = 1 << 20
"""Largest YAML file read (config and sweep files are a few KiB); a larger file, or an endless
one such as /dev/zero, is refused after reading this many bytes."""

MAX_YAML_VALUES = 100_000
"""Most values (scalars, lists, mappings; each use of an alias counted in full) one YAML
document or override may hold. Anchors and aliases let a few hundred bytes stand for
billions of values (an "alias bomb"), which would exhaust memory as soon as anything walks
them; a sweep of ``sweep.MAX_RUNS`` runs stays far below this."""


class _Unreadable(Exception):
    """YAML the config layer refuses to build: ``args`` are ``(problem, line)``, the line
    1-based or None."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with floats as YAML 1.2 reads them and integers within Python's
    digit limit."""


# YAML 1.1 (PyYAML) reads 1e-3, 1E3 and 1.0e3 as strings (an exponent needs a dot and a sign
# there); YAML 1.2 reads them as floats, as people mean them. PyYAML's float resolver still
# reads every other float; this one, tried after it, the exponents it refuses.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # more digits than int() takes from text (sys.set_int_max_str_digits)
        digits = sum(c.isdigit() for c in node.value)
        raise _Unreadable(
            f"an integer of {digits} digits; at most {sys.get_int_max_str_digits()}", node.start_mark.line + 1
        ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _size(node: yaml.Node, sizes: dict[int, int], path: set[int]) -> int:
    """The values ``node`` expands to (``sizes`` caches each node's, ``path`` holds the nodes
    above it); _Unreadable, before anything is built, beyond MAX_YAML_VALUES or for an alias
    inside its own anchor (an endless structure). Deep nesting ends in RecursionError."""
    if id(node) in path:
        raise _Unreadable("an alias refers to itself (an endless structure)", node.start_mark.line + 1)
    if id(node) not in sizes:
        path.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum([_size(child, sizes, path) for child in children])
        path.discard(id(node))
        if sizes[id(node)] > MAX_YAML_VALUES:
            raise _Unreadable(f"expands to more than {MAX_YAML_VALUES} values (through aliases)",
                              node.start_mark.line + 1)
    return sizes[id(node)]


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` with 1.2 floats, bounded in size; _Unreadable when refused,
    yaml.YAMLError when not YAML."""
    if len(text) > MAX_YAML_BYTES:
        raise _Unreadable(f"longer than {MAX_YAML_BYTES} characters", None)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _size(node, {}, set())
        return loader.construct_document(node)
    except RecursionError:
        raise _Unreadable("nested too deeply", None) from None
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The YAML document at ``path``; a missing, unreadable, unparsable or oversized file is a
    one-line ConfigError naming it as ``what``. Reads YAML 1.2 floats (``1e-3``) as floats."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {what} is larger than {MAX_YAML_BYTES} bytes")
    try:
        return _load_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except _Unreadable as e:
        problem, line = e.args
        at = f" at line {line}" if line is not None else ""
        raise ConfigError(f"{path}: {what}{at}: {problem}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None


def _read_chain(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, sections)`` for the file at ``path`` and its ``base:`` files, the root base
    first, ``base`` removed from the sections. A missing base, a cycle and a ``base`` that is
    not a non-empty string raise a one-line ConfigError naming the file."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: dict[Path, Path] = {}  # resolved path -> the path as shown in messages
    current = path
    while True:
        seen[current.resolve()] = current
        data = read_yaml(current)
        data = {} if data is None else data  # an empty file, or one of comments only
        if not isinstance(data, dict):
            raise ConfigError(f"{current}: top level must be a mapping of sections, got {type(data).__name__}")
        chain.append((current, data))
        if "base" not in data:
            break
        base = data.pop("base")
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{current}: base: must be a non-empty string naming a config file "
                              f"(relative to this file's directory); got {_show(base)}")
        base_path = current.parent / base
        resolved = base_path.resolve()
        if resolved == current.resolve():
            raise ConfigError(f"{current}: base: {base!r} names this file itself")
        if resolved in seen:
            loop = [str(p) for p, _ in chain] + [str(seen[resolved])]
            raise ConfigError(f"{current}: base: {base!r} makes a cycle: {' -> '.join(loop)}")
        if not base_path.is_file():
            raise ConfigError(f"{current}: base: {base!r} not found (looked for {base_path})")
        current = base_path
    return chain[::-1]


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.05"`` -> ``("train.lr", 0.05)``; the value is read as YAML (as files are:
    ``1e-3`` is a float), text that is not YAML as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{_cut(text)}: overrides look like section.key=value")
    key = key.strip()
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except _Unreadable as e:
        raise ConfigError(f"{_cut(key)}: {e.args[0]}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


def shipped_configs(under: str = "") -> list[str]:
    """Names of the shipped YAML files (``seed``; ``sweeps/lessons`` with ``under="sweeps"``),
    sorted: the names ``resolve_config_path`` takes."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
                  for p in (CONFIG_DIR / under).glob("*.yaml"))


def resolve_config_path(name: str | os.PathLike, what: str = "config file", under: str = "") -> Path:
    """The file ``name`` names: the path itself when it exists, else a shipped file (``seed``,
    ``seed.yaml`` and ``configs/seed.yaml`` work from any directory after an install; the
    sub-folder ``under`` is searched first), else a one-line ConfigError listing the shipped names."""
    path = Path(name)
    if path.exists():
        return path
    relative = path.as_posix().removeprefix("./").removeprefix("configs/")
    if not path.is_absolute() and ".." not in Path(relative).parts:
        for folder in (CONFIG_DIR / under, CONFIG_DIR):
            for candidate in (folder / relative, folder / f"{relative}.yaml"):
                if candidate.is_file():
                    return candidate
    names = ", ".join(shipped_configs(under))
    raise ConfigError(f"{path}: {what} not found; shipped {what.split()[0]}s: {names}")


def version_string() -> str:
    """``mnistdist VERSION``, plus ``(git COMMIT)`` (``-dirty`` with uncommitted changes) when the
    package runs from a git checkout rather than an installed copy."""
    from mnistdist import __version__

    text = f"mnistdist {__version__}"
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists() and (root / "pyproject.toml").is_file():
        try:
            git = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12",
                                  "--exclude=*"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return text
        if git.returncode == 0 and git.stdout.strip():
            text += f" (git {git.stdout.strip()})"
    return text


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int | None = None) -> Config:
    """Build and validate the config: defaults < YAML file chain < env < CLI overrides.

    ``path`` is a file or a shipped name (``resolve_config_path``). Its top-level ``base:
    other.yaml`` (relative to it; a base may name a base in turn) is applied first, so a file
    states only the keys it changes. A bad key or value is a ``ConfigError`` naming the file it
    came from, unless the environment or an override replaced it."""
    cfg = Config()
    set_by: dict[str, Path] = {}  # key -> the file whose value it has
    if path is not None:
        for file, data in _read_chain(resolve_config_path(path)):
            for section_name, section in data.items():
                if not isinstance(section, dict):
                    raise ConfigError(f"{file}: {section_name}: must be a mapping of keys, "
                                      f"got {type(section).__name__}")
                for name, value in section.items():
                    try:
                        _apply(cfg, f"{section_name}.{name}", value)
                    except ConfigError as e:
                        raise ConfigError(f"{file}: {e}") from None
                    set_by[f"{section_name}.{name}"] = file
    if os.environ.get(DATA_ROOT_ENV):
        cfg.data.root = os.environ[DATA_ROOT_ENV]
        set_by.pop("data.root", None)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value)
        set_by.pop(key, None)
    try:
        validate(cfg, world_size)
    except ConfigError as e:
        key = str(e).partition(":")[0]  # validate's messages start with the key they are about
        if key in set_by:
            raise ConfigError(f"{set_by[key]}: {e}") from None
        raise
    return cfg


_TIMEOUTS = ("dist.timeout_s", "tracking.init_timeout_s", "tracking.finish_timeout_s")

_RULES: tuple[tuple[str, Callable[[Any], bool], tuple[str, ...]], ...] = (
    (f"in 0..{MAX_SEED} (numpy's seed range)", lambda v: 0 <= v <= MAX_SEED, ("train.seed",)),
    (">= 1", lambda v: v >= 1, ("train.epochs", "train.global_batch_size", "train.log_every_steps",
                                "train.eval_per_process_batch_size", "train.stop_check_every_steps")),
    (">= 0", lambda v: v >= 0, ("train.weight_decay", "train.warmup_steps", "data.num_workers",
                                "checkpoint.every_steps", "checkpoint.keep_last")),
    (">= 0 (0 = no limit)", lambda v: v >= 0, ("train.max_steps",)),
    ("> 0", lambda v: v > 0, ("train.lr", "data.normalize_std", *_TIMEOUTS)),
    (f"<= {MAX_TIMEOUT_S:.0f} (one week)", lambda v: v <= MAX_TIMEOUT_S, _TIMEOUTS),
    ("in [0, 1)", lambda v: 0 <= v < 1, ("train.momentum",)),
    (f"in 0..{MNIST_TRAIN_IMAGES - 1} (training images held out for validation; 0 = none)",
     lambda v: 0 <= v < MNIST_TRAIN_IMAGES, ("data.validation_size",)),
    ("in 0..1024 (0 = follow the launcher)", lambda v: 0 <= v <= 1024, ("dist.threads_per_process",)),
)
"""``(what a value must be, the test of it, the keys it applies to)``: ``validate``'s bounds."""


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Reject values no run can use. ``world_size`` (if known) checks the batch split."""
    # Every float finite (also for a Config built in code, which _coerce never saw).
    for section_name, section_type in _section_types(Config).items():
        section = getattr(cfg, section_name)
        for name, typ in _section_types(section_type).items():
            value = getattr(section, name)
            if typ is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ConfigError(f"{section_name}.{name}: must be a finite number; got {_show(value)}")
    for requirement, ok, keys in _RULES:
        for key in keys:
            section_name, name = key.split(".")
            value = getattr(getattr(cfg, section_name), name)
            if not ok(value):
                raise ConfigError(f"{key}: must be {requirement}; got {value}")
    if cfg.train.nesterov and cfg.train.momentum <= 0:
        raise ConfigError("train.nesterov: needs train.momentum > 0")
    if not cfg.data.root:
        raise ConfigError("data.root: must not be empty")
    if world_size is not None and cfg.train.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size: {cfg.train.global_batch_size} is not divisible by the "
                          f"{world_size} processes; use a multiple of {world_size}")


# Keys that change the training trajectory: continuing a checkpoint with another value of any
# of them is another experiment, refused unless asked for (``--allow-config-change``). Every
# other key (tracking, logging, checkpoint cadence, devices, max_steps, which only stops
# early) just applies on resume. train.epochs is here because it stretches the LR schedule.
TRAJECTORY_KEYS = (
    "model.final_relu", "model.dtype", "data.normalize_mean", "data.normalize_std", "data.validation_size",
    "train.epochs", "train.global_batch_size", "train.lr", "train.momentum", "train.nesterov",
    "train.weight_decay", "train.lr_schedule", "train.warmup_steps", "train.loss", "train.seed",
)

# Trajectory keys added after checkpoints were first written, with the value their absence in
# an older checkpoint's config means.
ADDED_KEYS = {"data.validation_size": 0}


def trajectory_changes(saved: dict[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for each trajectory key where the config a checkpoint
    was written with (``saved``, ``Config.to_dict()`` form) differs from ``cfg``."""
    now = cfg.to_dict()
    changes = []
    for key in TRAJECTORY_KEYS:
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name, ADDED_KEYS.get(key)), now[section][name]
        if old is not None and old != new:
            changes.append((key, old, new))
    return changes


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written to the run directory)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
