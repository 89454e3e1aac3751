"""Following the events the agents of a test bed append to their files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemini_ckpt.observability.events import parse_events


class EventTail:
    """Reads the events the agents append, a few new lines at a time."""

    def __init__(self, paths: list[Path]) -> None:
        self._offsets = dict.fromkeys(paths, 0)

    def new_events(self) -> list[dict[str, Any]]:
        """Complete lines written since the last call, merged in time order."""
        fresh: list[dict[str, Any]] = []
        for path, offset in self._offsets.items():
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offsets[path] = offset + len(complete)
            fresh.extend(parse_events(complete.decode("utf-8", errors="replace")))
        fresh.sort(key=lambda e: float(e.get("t", 0.0)))
        return fresh
