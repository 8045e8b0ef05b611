"""Command line: ``gradwatch demo`` and ``gradwatch report`` (placeholder until the CLI lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("gradwatch: the demo and report commands are not built yet.", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
