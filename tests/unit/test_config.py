"""Config: every shipped file loads; precedence; each bad input names its key and exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mnistdist.config import DATA_ROOT_ENV, Config, ConfigError, load_config, to_yaml, validate
from tests.conftest import REPO, as_one_process, run_cmd, train_cmd, train_in_process

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_directory_is_not_empty():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "seed.yaml", "mse.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path, world_size=2)
    assert isinstance(cfg, Config)
    # The resolved config round-trips through YAML (it is written to every run directory).
    assert load_config_from_text(to_yaml(cfg), path.parent / "_roundtrip.yaml") == cfg


def load_config_from_text(text: str, tmp: Path) -> Config:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        Path(f.name).unlink()


def test_seed_config_is_the_seed_run(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    cfg = load_config(REPO / "configs" / "seed.yaml")
    assert cfg.model.final_relu is True
    t = cfg.train
    assert (t.lr, t.momentum, t.nesterov, t.lr_schedule, t.weight_decay) == (0.01, 0.0, False, "constant", 0.0)
    assert (t.global_batch_size, t.epochs, t.loss) == (200, 10, "cross_entropy")
    assert (cfg.data.normalize_mean, cfg.data.normalize_std) == (0.1307, 0.3081)


def test_default_and_mse_configs():
    default = load_config(REPO / "configs" / "default.yaml")
    assert default.model.final_relu is False and default.train.loss == "cross_entropy"
    assert load_config(REPO / "configs" / "mse.yaml").train.loss == "mse"


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n  epochs: 3\ndata:\n  root: from_file\n")
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    cfg = load_config(f, ["train.lr=0.25"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.momentum) == (0.25, 3, Config().train.momentum)
    assert cfg.data.root == "from_file"
    monkeypatch.setenv(DATA_ROOT_ENV, "/from/env")
    assert load_config(f).data.root == "/from/env"
    assert load_config(f, ["data.root=/from/cli"]).data.root == "/from/cli"


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, ["train.lr=1e-3", "model.final_relu=true", "train.epochs=2", "data.pipeline=torchvision"])
    assert cfg.train.lr == 0.001 and cfg.model.final_relu is True and cfg.train.epochs == 2
    assert cfg.data.pipeline == "torchvision"


BAD = [
    (["train.lrr=0.1"], "train.lrr: unknown key"),
    (["trian.lr=0.1"], "trian.lr: unknown key"),
    (["train.lr=-1"], "train.lr: must be > 0"),
    (["train.lr=0"], "train.lr: must be > 0"),
    (["train.lr=abc"], "train.lr: must be a number"),
    (["train.epochs=0"], "train.epochs: must be >= 1"),
    (["train.epochs=1.5"], "train.epochs: must be an integer"),
    (["train.loss=hinge"], "train.loss: must be one of cross_entropy, mse"),
    (["data.pipeline=pil"], "data.pipeline: must be one of tensor, torchvision"),
    (["model.final_relu=maybe"], "model.final_relu: must be true or false"),
    (["train.momentum=1.0"], "train.momentum: must be in [0, 1)"),
    (["train.global_batch_size=0"], "train.global_batch_size: must be >= 1"),
    (["dist.timeout_s=0"], "dist.timeout_s: must be > 0"),
    (["train.lr"], "overrides look like section.key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1] for b in BAD])
def test_bad_values_raise_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_global_batch_must_divide_by_world_size():
    load_config(None, ["train.global_batch_size=201"], world_size=1)
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        load_config(None, ["train.global_batch_size=201"], world_size=2)


@pytest.mark.parametrize(
    "text,message",
    [
        ("train: [1, 2]\n", "train: must be a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train: {lr: 0.1\n", "not valid YAML"),
        ("model:\n  depth: 3\n", "model.depth: unknown key"),
    ],
)
def test_bad_files(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(f)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.lr=-1"], "error: train.lr: must be > 0; got -1"),
        (["train.lr=inf"], "error: train.lr: must be a finite number; got inf"),
        (["train.seed=-1"], "error: train.seed: must be in 0..4294967295"),
        (["dist.timeout_s=1e300"], "error: dist.timeout_s: must be <= 604800"),
        (["--config", "/nonexistent.yaml"], "error: /nonexistent.yaml: config file not found"),
        (["--bogus-flag"], "error: unrecognized arguments: --bogus-flag"),
    ],
)
def test_cli_exits_2_with_one_line_and_no_traceback(args, message, capfd, monkeypatch, tmp_path):
    as_one_process(monkeypatch)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    code, out, err = train_in_process(capfd, *args)
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()], err
    assert message in err
    assert "Traceback" not in err + out


@pytest.mark.slow  # a real process: what the tests above call in this process, as the script
def test_train_dist_py_itself_exits_2_with_one_line_and_no_traceback():
    result = run_cmd(train_cmd("train.lr=-1"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: train.lr: must be > 0; got -1.0", result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------------------
# base: inheritance


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_is_applied_first_and_the_child_wins_per_key(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    write(tmp_path / "parent.yaml", "model:\n  final_relu: true\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(child)
    # train.lr from the child; train.epochs (same section, not named by the child) and
    # model.final_relu (a section the child lacks) from the base; the rest are defaults.
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.final_relu) == (0.25, 3, True)
    expected = Config()
    expected.train.lr, expected.train.epochs, expected.model.final_relu = 0.25, 3, True
    assert cfg == expected


def test_two_level_chain_resolves_each_base_next_to_the_file_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # relative to the naming file's directory, not the cwd
    write(tmp_path / "shared" / "root.yaml", "train:\n  lr: 0.5\n  epochs: 3\n  momentum: 0.5\n")
    write(tmp_path / "shared" / "mid.yaml", "base: root.yaml\ntrain:\n  epochs: 4\ndata:\n  root: mid\n")
    leaf = write(tmp_path / "variants" / "leaf.yaml", "base: ../shared/mid.yaml\ntrain:\n  momentum: 0.0\n  nesterov: false\n")
    cfg = load_config(leaf)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.momentum, cfg.train.nesterov) == (0.5, 4, 0.0, False)
    assert cfg.data.root == "mid"
    # Loaded by a path relative to the cwd as the CLI would get it.
    assert load_config("variants/leaf.yaml") == cfg


def test_cli_override_and_env_beat_base_and_child(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    write(tmp_path / "parent.yaml", "train:\n  lr: 0.5\n  epochs: 3\ndata:\n  root: parent\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\ntrain:\n  lr: 0.25\n")
    cfg = load_config(child, ["train.lr=0.125", "train.epochs=7"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.root) == (0.125, 7, "parent")
    monkeypatch.setenv(DATA_ROOT_ENV, "/from/env")
    assert load_config(child).data.root == "/from/env"
    assert load_config(child, ["data.root=/from/cli"]).data.root == "/from/cli"


BAD_BASES = {
    "missing": ({"a.yaml": "base: nope.yaml\n"}, "a.yaml: base: 'nope.yaml' not found"),
    "self": ({"a.yaml": "base: a.yaml\n"}, "a.yaml: base: 'a.yaml' names this file itself"),
    "self-via-dot": ({"a.yaml": "base: ./a.yaml\n"}, "a.yaml: base: './a.yaml' names this file itself"),
    "cycle": ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "b.yaml: base: 'a.yaml' makes a cycle"),
    "cycle-3": (
        {"a.yaml": "base: b.yaml\n", "b.yaml": "base: c.yaml\n", "c.yaml": "base: b.yaml\n"},
        "c.yaml: base: 'b.yaml' makes a cycle",
    ),
    "int": ({"a.yaml": "base: 3\n"}, "a.yaml: base: must be a non-empty string"),
    "list": ({"a.yaml": "base: [b.yaml]\n", "b.yaml": "{}\n"}, "a.yaml: base: must be a non-empty string"),
    "null": ({"a.yaml": "base:\n"}, "a.yaml: base: must be a non-empty string"),
    "empty": ({"a.yaml": "base: ''\n"}, "a.yaml: base: must be a non-empty string"),
    "missing-in-base": ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: gone.yaml\n"}, "b.yaml: base: 'gone.yaml' not found"),
}


@pytest.mark.parametrize("files,message", BAD_BASES.values(), ids=BAD_BASES.keys())
def test_bad_base_is_one_line_naming_the_file(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(tmp_path / message.split(":")[0]) + ":"), text
    assert message in text


def test_cycle_message_shows_the_loop(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert str(info.value).endswith(f"makes a cycle: {a} -> {b} -> {a}")


@pytest.mark.parametrize(
    "parent,child,message",
    [
        ("model:\n  depth: 3\n", "base: parent.yaml\n", "parent.yaml: model.depth: unknown key"),
        ("{}\n", "base: parent.yaml\nmodel:\n  depth: 3\n", "child.yaml: model.depth: unknown key"),
        ("train:\n  epochs: x\n", "base: parent.yaml\n", "parent.yaml: train.epochs: must be an integer"),
        ("train: 3\n", "base: parent.yaml\n", "parent.yaml: train: must be a mapping"),
        ("train: {lr: 0.1\n", "base: parent.yaml\n", "parent.yaml: not valid YAML"),
        ("base: child.yaml\n", "base: parent.yaml\n", "parent.yaml: base: 'child.yaml' makes a cycle"),
    ],
)
def test_bad_key_anywhere_in_the_chain_names_the_key_and_its_file(tmp_path, parent, child, message):
    write(tmp_path / "parent.yaml", parent)
    write(tmp_path / "child.yaml", child)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "child.yaml")
    assert f"{tmp_path}/{message}" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("model:\n  depth: 3\n", "model.depth: unknown key; model has final_relu, dtype"),
        ("train:\n  epochs: x\n", "train.epochs: must be an integer; got 'x'"),
        ("train:\n  loss: hinge\n", "train.loss: must be one of cross_entropy, mse; got 'hinge'"),
        ("trian:\n  lr: 0.1\n", "trian.lr: unknown key; sections are model, data, train"),
        # values no run can use are checked once everything is merged; the file that set one is named
        ("train:\n  lr: -1\n", "train.lr: must be > 0; got -1"),
        ("train:\n  momentum: 1.5\n", "train.momentum: must be in [0, 1); got 1.5"),
    ],
)
def test_bad_key_in_a_file_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    f = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value).startswith(f"{f}: {message}")
    assert "\n" not in str(info.value)


def test_bad_value_names_the_file_in_the_chain_that_set_it(tmp_path, monkeypatch):
    write(tmp_path / "parent.yaml", "train:\n  lr: -1\n  epochs: 0\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\ntrain:\n  lr: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert str(info.value) == f"{tmp_path / 'parent.yaml'}: train.epochs: must be >= 1; got 0"
    # a value set on the command line is the command line's: no file is named
    with pytest.raises(ConfigError) as info:
        load_config(child, ["train.epochs=2", "train.lr=-2"])
    assert str(info.value) == "train.lr: must be > 0; got -2.0"
    # nor for a value set by the environment
    monkeypatch.setenv(DATA_ROOT_ENV, "")
    write(tmp_path / "root.yaml", "data:\n  root: ''\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "root.yaml")
    assert str(info.value) == f"{tmp_path / 'root.yaml'}: data.root: must not be empty"


def test_cli_exits_2_on_a_base_cycle(tmp_path, capfd, monkeypatch):
    as_one_process(monkeypatch)
    write(tmp_path / "a.yaml", "base: a.yaml\n")
    code, out, err = train_in_process(capfd, "--config", str(tmp_path / "a.yaml"))
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()], err
    assert f"error: {tmp_path / 'a.yaml'}: base: 'a.yaml' names this file itself" in err
    assert "Traceback" not in err + out


def _stated_keys(data: dict) -> set[str]:
    return {f"{s}.{k}" for s, section in data.items() if s != "base" for k in section}


def _flat(cfg: Config) -> dict[str, object]:
    return {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}


VARIANTS = [p for p in SHIPPED if "base" in (yaml.safe_load(p.read_text()) or {})]


def test_shipped_variants_use_base():
    # The variants of seed.yaml state only what differs; seed.yaml and default.yaml stand alone.
    assert {"mse.yaml", "seed_no_final_relu.yaml"} <= {p.name for p in VARIANTS}
    assert not {"seed.yaml", "default.yaml"} & {p.name for p in VARIANTS}


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.name)
def test_shipped_variant_differs_from_its_base_exactly_in_the_keys_it_states(path: Path, monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    data = yaml.safe_load(path.read_text())
    base = load_config(path.parent / data["base"])
    variant = load_config(path)
    flat_base, flat_variant = _flat(base), _flat(variant)
    differing = {k for k in flat_variant if flat_variant[k] != flat_base[k]}
    # Every key it states must change something (no copies of the base's values), and nothing
    # it does not state may change.
    assert differing == _stated_keys(data)
    # Each stated key carries a comment saying why it differs.
    for line in path.read_text().splitlines():
        if line.startswith("  ") and not line.lstrip().startswith("#"):
            assert "#" in line, f"{path.name}: no comment on {line.strip()!r}"


def test_seed_variants_resolve_to_the_seed_run_with_one_change(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    seed = load_config(REPO / "configs" / "seed.yaml")
    no_relu = load_config(REPO / "configs" / "seed_no_final_relu.yaml")
    mse = load_config(REPO / "configs" / "mse.yaml")
    seed.model.final_relu = False
    assert no_relu == seed
    seed.model.final_relu, seed.train.loss = True, "mse"
    assert mse == seed


# --------------------------------------------------------------------------------------
# Finite values in range; the YAML-boolean spellings of Literal values

OUT_OF_RANGE = [
    ("train.lr=inf", "train.lr: must be a finite number"),
    ("train.lr=.inf", "train.lr: must be a finite number"),
    ("train.lr=nan", "train.lr: must be a finite number"),
    ("train.weight_decay=inf", "train.weight_decay: must be a finite number"),
    ("data.normalize_mean=nan", "data.normalize_mean: must be a finite number"),
    ("data.normalize_std=inf", "data.normalize_std: must be a finite number"),
    ("train.momentum=-inf", "train.momentum: must be a finite number"),
    ("dist.timeout_s=inf", "dist.timeout_s: must be a finite number"),
    # torch's TCPStore/gloo overflow near 9.2e9 s (int64 nanoseconds); a week is plenty.
    ("dist.timeout_s=1e300", "dist.timeout_s: must be <= 604800"),
    ("dist.timeout_s=604801", "dist.timeout_s: must be <= 604800"),
    ("tracking.finish_timeout_s=inf", "tracking.finish_timeout_s: must be a finite number"),
    ("tracking.finish_timeout_s=1e10", "tracking.finish_timeout_s: must be <= 604800"),
    ("tracking.init_timeout_s=1e10", "tracking.init_timeout_s: must be <= 604800"),
    # numpy's RandomState (seeded by accelerate's set_seed) takes 0..2**32-1 only.
    ("train.seed=-1", "train.seed: must be in 0..4294967295"),
    ("train.seed=4294967296", "train.seed: must be in 0..4294967295"),
    ("train.seed=100000000000000000000000", "train.seed: must be in 0..4294967295"),
    ("train.seed=1e23", "train.seed: must be an integer"),
    ("train.seed=1.0e+23", "train.seed: must be an integer"),
    ("data.validation_size=-1", "data.validation_size: must be in 0..59999"),
    ("data.validation_size=60000", "data.validation_size: must be in 0..59999"),
    ("data.validation_size=0.1", "data.validation_size: must be an integer"),
]


@pytest.mark.parametrize("override,message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_non_finite_and_out_of_range_values_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["train:\n  lr: .inf\n", "data:\n  normalize_mean: .nan\n",
                                  "dist:\n  timeout_s: 1.0e+300\n", "train:\n  seed: -1\n"])
def test_non_finite_and_out_of_range_values_in_a_file(tmp_path, text):
    f = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert str(info.value).startswith(f"{f}: " + text.split(":")[0] + ".")
    assert "\n" not in str(info.value)


def test_validate_catches_values_set_in_code():
    cfg = Config()
    cfg.train.lr = float("inf")
    with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
        validate(cfg)


def test_range_edges_are_accepted():
    cfg = load_config(None, ["train.seed=4294967295", "dist.timeout_s=604800", "tracking.finish_timeout_s=604800"])
    assert (cfg.train.seed, cfg.dist.timeout_s) == (2**32 - 1, 604800.0)
    assert load_config(None, ["train.seed=0"]).train.seed == 0
    assert load_config(None, ["data.validation_size=59999"]).data.validation_size == 59999
    assert load_config(None, []).data.validation_size == 0  # off unless asked for


def test_validation_size_is_a_trajectory_key_also_against_checkpoints_that_predate_it():
    """Another validation set is another training set: resuming with it is a config change.
    A checkpoint written before the key existed had none (0)."""
    from mnistdist.config import trajectory_changes

    saved = Config().to_dict()
    del saved["data"]["validation_size"]
    assert trajectory_changes(saved, Config()) == []
    assert trajectory_changes(saved, load_config(None, ["data.validation_size=5000"])) == [
        ("data.validation_size", 0, 5000)]


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("dist.compile=off", "compile", "off"),
        ("dist.compile=OFF", "compile", "off"),
        ("dist.compile=default", "compile", "default"),
        ("dist.mixed_precision=no", "mixed_precision", "no"),
        ("dist.mixed_precision=No", "mixed_precision", "no"),
        ("dist.mixed_precision=bf16", "mixed_precision", "bf16"),
    ],
)
def test_literal_values_yaml_reads_as_booleans_are_accepted(override, key, expected):
    cfg = load_config(None, [override])
    assert getattr(cfg.dist, key) == expected


def test_literal_values_yaml_reads_as_booleans_are_accepted_in_a_file(tmp_path):
    f = write(tmp_path / "c.yaml", "dist:\n  compile: off\n  mixed_precision: no\n")
    cfg = load_config(f)
    assert (cfg.dist.compile, cfg.dist.mixed_precision) == ("off", "no")
    # and the resolved config round-trips through to_yaml
    assert load_config(write(tmp_path / "r.yaml", to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        # a boolean that spells no allowed value is still refused
        ("dist.compile=on", "dist.compile: must be one of off, default, reduce-overhead, max-autotune; got True"),
        ("dist.mixed_precision=yes", "dist.mixed_precision: must be one of auto, no, bf16; got True"),
        ("train.loss=false", "train.loss: must be one of cross_entropy, mse; got False"),
    ],
)
def test_booleans_that_spell_no_allowed_value_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
