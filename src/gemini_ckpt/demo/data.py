"""A deterministic stream of arithmetic text ("17+25=42;") for each rank, with a resumable position.

Batch `i` of rank `r` depends only on (seed, r, i), so a run that resumes at position `i` sees
exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = "0123456789+=;"
STOI = {ch: i for i, ch in enumerate(VOCAB)}


class ArithmeticStream:
    """Batches of (tokens, targets); `state_dict()` is the position in the stream."""

    def __init__(self, rank: int, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.rank = rank
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.position = 0

    def _text(self, generator: torch.Generator, length: int) -> str:
        parts: list[str] = []
        while sum(map(len, parts)) < length:
            a, b = torch.randint(0, 100, (2,), generator=generator).tolist()
            parts.append(f"{a}+{b}={a + b};")
        return "".join(parts)[:length]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current position; advances the position."""
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.rank) * 1_000_003 + self.position
        )
        rows = [
            [STOI[c] for c in self._text(generator, self.seq_len + 1)]
            for _ in range(self.batch_size)
        ]
        data = torch.tensor(rows, dtype=torch.long)
        self.position += 1
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is."""
        return {"position": self.position, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position."""
        if state["rank"] != self.rank or state["seed"] != self.seed:
            raise ValueError(
                f"data state of rank {state['rank']}/seed {state['seed']} given to "
                f"rank {self.rank}/seed {self.seed}"
            )
        self.position = int(state["position"])
