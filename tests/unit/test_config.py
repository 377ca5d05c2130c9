"""Config: every shipped file loads; precedence; each bad input names its key and exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnistdist.config import DATA_ROOT_ENV, Config, ConfigError, load_config, to_yaml
from tests.conftest import REPO, run_cmd, train_cmd

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
        (["--config", "/nonexistent.yaml"], "error: /nonexistent.yaml: config file not found"),
        (["--bogus-flag"], "error: unrecognized arguments: --bogus-flag"),
    ],
)
def test_cli_exits_2_with_one_line_and_no_traceback(args, message):
    result = run_cmd(train_cmd(*args), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
