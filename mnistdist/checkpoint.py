"""Saving model weights: safetensors only (no pickle), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` via a temporary file and an atomic rename,
    so a reader never sees a half-written file."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))
