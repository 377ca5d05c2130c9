"""What the config layer reads as YAML (files, overrides, sweep files): bounded, and floats as
floats. Each hostile input is one ConfigError line, raised at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnistdist.config import MAX_YAML_BYTES, MAX_YAML_VALUES, ConfigError, load_config, read_yaml


def alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML flow list whose anchors and aliases expand to ``width ** levels`` items: short
    text, huge once expanded (each level lists the previous one ``width`` times)."""
    items = [f"&l0 [{', '.join(['0'] * width)}]"]
    for i in range(1, levels):
        items.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "[" + ", ".join(items) + "]"


def one_short_line(error: ConfigError, limit: int = 300) -> str:
    text = str(error)
    assert "\n" not in text
    assert len(text) < limit, f"{len(text)} characters: {text[:200]}..."
    return text


def test_the_issue_alias_bomb_is_small_text():
    assert len("train.lr=" + alias_bomb(9)) < 600


def test_alias_bomb_override_is_refused_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=" + alias_bomb(9)])
    text = one_short_line(info.value)
    assert text.startswith("train.lr: ")
    assert f"more than {MAX_YAML_VALUES} values" in text


def test_alias_bomb_in_a_config_file_is_refused_at_once(tmp_path: Path):
    f = tmp_path / "bomb.yaml"
    f.write_text(f"train:\n  lr: {alias_bomb(9)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    text = one_short_line(info.value)
    assert text.startswith(f"{f}: ") and f"more than {MAX_YAML_VALUES} values" in text


def test_alias_bomb_in_a_sweep_file_is_refused_at_once(tmp_path: Path):
    f = tmp_path / "sweep.yaml"
    f.write_text(f"grid:\n  train.lr: {alias_bomb(9)}\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(f, "sweep file")
    assert f"more than {MAX_YAML_VALUES} values" in one_short_line(info.value)


def test_a_recursive_alias_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=&a [*a]"])
    assert "refers to itself" in one_short_line(info.value)


def test_deep_nesting_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=" + "[" * 5000 + "]" * 5000])
    assert one_short_line(info.value).startswith("train.lr: ")


def test_a_large_value_under_the_bound_is_shown_shortened():
    # 9**4 = 6561 items: within the bound, but the message shows only the start of the value.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=" + alias_bomb(4)])
    assert one_short_line(info.value).startswith("train.lr: must be a number; got [[0, 0, 0, 0, 0, 0, ...")


def test_a_long_string_value_is_shown_shortened():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.loss=" + "x" * 100_000])
    assert one_short_line(info.value).startswith("train.loss: must be one of cross_entropy, mse; got 'xxx")


def test_a_file_larger_than_the_bound_is_not_read(tmp_path: Path):
    f = tmp_path / "big.yaml"
    f.write_text("# " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert one_short_line(info.value) == f"{f}: config file is larger than {MAX_YAML_BYTES} bytes"


def test_an_endless_file_is_not_read():
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero")
    assert "larger than" in one_short_line(info.value)


# --------------------------------------------------------------------------------------
# Python's limit on the digits of an integer read from text (4300 by default)


@pytest.mark.parametrize("key", ["train.lr", "train.seed", "tracking.group"])
def test_an_integer_with_too_many_digits_is_one_line(key: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=" + "1" * 5000])
    text = one_short_line(info.value)
    assert text.startswith(f"{key}: ") and "5000 digits" in text


def test_an_integer_with_too_many_digits_in_a_file_names_file_and_line(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n  seed: " + "7" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    text = one_short_line(info.value)
    assert text.startswith(f"{f}: ") and "line 3" in text and "5000 digits" in text


# --------------------------------------------------------------------------------------
# Floats: YAML 1.1 (PyYAML) reads 1e-3 as a string; the config layer reads it as a float


@pytest.mark.parametrize("text,expected", [
    ("1e-3", 0.001), ("1.0e-3", 0.001), ("1E3", 1000.0), ("-2e+2", -200.0), ("+5e0", 5.0),
    ("0.5", 0.5), (".5", 0.5), ("1_000.5", 1000.5), (".inf", float("inf")),
])
def test_exponent_floats_are_floats(tmp_path: Path, text: str, expected: float):
    f = tmp_path / "v.yaml"
    f.write_text(f"value: {text}\n")
    value = read_yaml(f)["value"]
    assert type(value) is float and value == expected


@pytest.mark.parametrize("text,expected", [
    ("1", 1), ("0x10", 16), ("1_000", 1000), ("e3", "e3"), ("1e", "1e"), ("1e-3x", "1e-3x"),
    ("'1e-3'", "1e-3"), ("true", True), ("off", False), ("~", None), ("1.2.3", "1.2.3"),
])
def test_other_scalars_are_unchanged(tmp_path: Path, text: str, expected: object):
    f = tmp_path / "v.yaml"
    f.write_text(f"value: {text}\n")
    value = read_yaml(f)["value"]
    assert type(value) is type(expected) and value == expected


def test_sweep_grid_1e_3_and_1_0e_3_are_the_same_value(tmp_path: Path):
    from mnistdist.tools import sweep

    f = tmp_path / "s.yaml"
    f.write_text("grid:\n  train.lr: [1e-3, 1.0e-3]\n")
    with pytest.raises(ConfigError, match="a value is listed twice"):
        sweep.load_sweep(f, tmp_path / "out")


def test_sweep_grid_exponent_floats_name_runs_like_dotted_ones(tmp_path: Path):
    from mnistdist.tools import sweep

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("grid:\n  train.lr: [1e-3, 2e-2]\n")
    b.write_text("grid:\n  train.lr: [0.001, 0.02]\n")
    names = [[e.name for e in sweep.load_sweep(f, tmp_path / "out").elements] for f in (a, b)]
    assert names[0] == names[1]


def test_override_with_an_exponent_is_a_float():
    assert load_config(None, ["train.lr=2e-3"]).train.lr == 0.002
    with pytest.raises(ConfigError, match="train.epochs: must be an integer; got 1000.0"):
        load_config(None, ["train.epochs=1e3"])


@pytest.mark.parametrize("override", ["train." + "x" * 100_000 + "=1", "t" * 100_000 + ".lr=1", "x" * 100_000])
def test_a_long_key_is_shown_shortened(override: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    one_short_line(info.value, limit=500)  # the key cut to 100 characters, then the keys allowed
