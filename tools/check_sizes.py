"""Fail when a module grows past the house limit of 400 lines (ruff has no module-length rule)."""

import sys
from pathlib import Path

LIMIT = 400


def main(argv: list[str]) -> int:
    """Check every .py file under the given roots; print offenders and return 1 if any."""
    offenders = []
    for root in argv or ["src"]:
        for path in sorted(Path(root).rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > LIMIT:
                offenders.append(f"{path}: {lines} lines (limit {LIMIT})")
    for line in offenders:
        print(line)
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
