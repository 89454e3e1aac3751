"""Small deterministic models and training steps for checkpoint round trips."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Position:
    """A stand-in for a data loader's resumable position."""

    def __init__(self) -> None:
        self.index = 0
        self.history: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = state["index"]
        self.history = list(state["history"])


def make_model(width: int = 32) -> nn.Module:
    """A model with parameters, buffers (batch norm) and dropout (so RNG state matters)."""
    torch.manual_seed(0)
    head = nn.Linear(width, 16)
    return nn.Sequential(
        nn.Embedding(16, width),
        nn.Flatten(),
        nn.Linear(width * 4, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Dropout(0.2),
        head,
    )


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, position: Position) -> float:
    """One deterministic step on a batch that depends only on the position."""
    gen = torch.Generator().manual_seed(position.index)
    tokens = torch.randint(0, 16, (8, 4), generator=gen)
    target = torch.randint(0, 16, (8,), generator=gen)
    loss = nn.functional.cross_entropy(model(tokens), target)  # dropout draws from the RNG
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    position.history.append(position.index)
    position.index += 1
    return float(loss.detach())


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Deep copies of model and optimizer state for comparisons."""
    import copy

    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Exact (bitwise) equality of nested states."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
