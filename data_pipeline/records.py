"""The records every data-pipeline module shares: documents with their location, counted skips,
and the error for bad input. (Kept apart from ``sources`` so the readers -- ``wiki``, ``demo`` --
and ``sources`` depend on it, not on each other.)"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

SKIP_EXAMPLES = 20  # locations kept per skip reason in the manifest
SKIP_WARNINGS = 5  # skips printed per reason before going quiet


class DataError(ValueError):
    """Bad input, with its location in the message."""


@dataclass(frozen=True)
class Document:
    text: str
    where: str


@dataclass
class Skips:
    """Counted skips by reason, with the first locations of each; raises instead when strict."""

    strict: bool = False
    verbose: bool = True  # print the first few skips of each reason to stderr
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        message = f"{where}: {reason}" + (f": {detail}" if detail else "")
        if self.strict:
            raise DataError(message + " (strict mode; drop --strict to skip and count such input)")
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < SKIP_EXAMPLES:
            seen.append(message)
        if self.verbose and self.counts[reason] <= SKIP_WARNINGS:
            print(f"skipped {message}", file=sys.stderr)
