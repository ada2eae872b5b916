"""One capped exponential back-off for everything that tries again: restarts, setup retries, reconnects."""
from __future__ import annotations


def backoff(attempt: int, first: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to wait before try number `attempt` (1-based): `first`, doubled per attempt, never above `cap`."""
    if attempt < 1:
        return 0.0
    return min(first * 2.0 ** min(attempt - 1, 62), cap)
