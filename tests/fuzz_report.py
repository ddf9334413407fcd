"""How many fuzz cases each front door ran, printed at the end of the pytest run."""
from __future__ import annotations

from collections import Counter

CASES: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()  # status code (gRPC) or HTTP status -> cases


def count(kind: str) -> None:
    CASES[kind] += 1


def outcome(name: str) -> None:
    OUTCOMES[name] += 1


def summary_line() -> str | None:
    if not CASES:
        return None
    parts = ", ".join(f"{kind} {n}" for kind, n in sorted(CASES.items()))
    outcomes = ", ".join(f"{name} {n}" for name, n in OUTCOMES.most_common())
    return f"fuzz cases run: {sum(CASES.values())} ({parts}); outcomes: {outcomes}"
