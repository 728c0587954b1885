"""The `[sweep] ...` lines: what the driver says while it works, on stderr, so stdout stays the report's."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)
