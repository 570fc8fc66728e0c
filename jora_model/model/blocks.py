"""Cutting a sequence into equal blocks: attention's query blocks, the loss head's token chunks, and
the memory planner's account of both."""

from __future__ import annotations


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n not above limit (1 at least): the block length that cuts n tokens
    into equal blocks of at most `limit`."""
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)
