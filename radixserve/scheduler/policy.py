"""Waiting-queue order: fcfs by arrival, or lpm (longest cached prefix first)."""
from __future__ import annotations

from radixserve.core import Req

# Matching every waiting request against the tree each step costs O(queue × prompt); past this
# queue length SGLang falls back to fcfs, and so do we.
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, cache) -> list[Req]:
    if policy == "lpm" and len(waiting) <= LPM_MAX_QUEUE:
        lens = {id(r): cache.match_prefix(r.fill_ids[:-1]).length for r in waiting}
        return sorted(waiting, key=lambda r: (-lens[id(r)], r.arrival))
    return sorted(waiting, key=lambda r: r.arrival)
