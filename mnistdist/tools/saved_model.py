"""A saved model as the tools take it (``--model``): its weights file and its run's config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mnistdist import rundir
from mnistdist.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from mnistdist.model import MLP

CONFIG_SEARCH_LEVELS = 2  # RUN_DIR/checkpoints/step-XXXXXXXX/model.safetensors -> RUN_DIR/config.yaml


def resolve_model(path: Path) -> Path:
    """``--model`` as a file: the file itself, or ``model.safetensors`` in a (checkpoint) directory."""
    if path.is_dir():
        if not (path / rundir.MODEL).is_file():
            raise ConfigError(f"--model {path}: directory holds no {rundir.MODEL}")
        return path / rundir.MODEL
    if not path.is_file():
        raise ConfigError(f"--model {path}: no such file or directory")
    return path


def find_run_config(model_file: Path) -> Path | None:
    """config.yaml next to the model file, else in its parent directories up to 2 levels up."""
    directory = model_file.absolute().parent
    for _ in range(CONFIG_SEARCH_LEVELS + 1):
        if (directory / rundir.CONFIG).is_file():
            return directory / rundir.CONFIG
        directory = directory.parent
    return None


def model_and_config(model_arg: Path, config_arg: Path | None,
                     overrides: Sequence[str] = ()) -> tuple[Path, Config]:
    """(the model file, the run's config): ``--config`` if given, else the one found near the model."""
    model_file = resolve_model(model_arg)
    config_path = config_arg if config_arg is not None else find_run_config(model_file)
    return model_file, load_config(config_path, list(overrides))


def load_weights(cfg: Config, model_file: Path) -> MLP:
    """The MLP of ``cfg`` with the weights of ``model_file`` (on the CPU); ConfigError when the
    file is not a state dict of that model."""
    from mnistdist import checkpoint
    from mnistdist.training import build_model

    model = build_model(cfg)  # final ReLU and dtype as in training
    try:
        model.load_state_dict(checkpoint.load_model_state(model_file))
    except Exception as e:  # noqa: BLE001 - safetensors, OS and shape errors all mean "bad file"
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"--model {model_file}: not mnistdist model weights ({reason})") from None
    return model
