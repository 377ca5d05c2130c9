"""The seed's network: a 784-200-200-10 MLP with ReLU and Kaiming-normal weights (a plain
``nn.Module``: it knows nothing about devices, ranks or wrappers)."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_PIXELS = 28 * 28
NUM_CLASSES = 10


class MLP(nn.Module):
    """784 -> 200 -> 200 -> 10, ReLU between layers; optionally ReLU on the logits (the seed)."""

    def __init__(self, hidden: int = 200, final_relu: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_PIXELS, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, NUM_CLASSES)
        self.final_relu = final_relu
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-normal (fan_in, gain sqrt(2)) keeps activation variance constant through
        # ReLU layers; biases start at zero, as in the seed.
        for layer in (self.fc1, self.fc2, self.fc3):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).to(self.fc1.weight.dtype)  # float32 batches into a float64 model too
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = self.fc3(x)
        return torch.relu(x) if self.final_relu else x
