"""Data-parallel routing: which of the --dp-size replicas serves a request.

Each replica is a whole engine (its own scheduler, KV pool, radix tree and TP group), so routing is the
only thing replicas share. The router lives in the API server, which sees every request start and end, so
its load figures are exact without asking the schedulers:

  shortest_queue (default)  the replica with the fewest requests in flight, then the fewest tokens
                            (prompt + max_new_tokens). Requests first: max_new_tokens is only a bound, and
                            one that defaults to the whole context would outweigh the real work.
  round_robin               in turn, blind to load.
  prefix                    the replica that served the longest common prefix before, where the radix
                            cache most likely still holds it; shortest_queue for a prefix never seen, or
                            when the preferred replica is far busier than the least busy one.

A PD prefill server overrides the method for a request that carries a bootstrap room: replica room % N
(SGLang's follow_bootstrap_room), the replica its bootstrap server points the decode side to.
"""
from __future__ import annotations

from collections import OrderedDict

PREFIX_BLOCK = 16  # tokens per hashed block: prefixes are matched at this granularity
PREFIX_INDEX_SIZE = 1 << 17  # blocks remembered, least recently used dropped first
BALANCE_ABS, BALANCE_REL = 32, 1.5  # prefix affinity yields when busier by both this many and this ratio


def block_hashes(ids: list[int]) -> list[int]:
    """Hash of ids[:k] for every whole block k, chained so that each costs one block."""
    out, h = [], 0
    for i in range(PREFIX_BLOCK, len(ids) + 1, PREFIX_BLOCK):
        h = hash((h, tuple(ids[i - PREFIX_BLOCK:i])))
        out.append(h)
    return out


class Router:
    def __init__(self, n: int, method: str = "shortest_queue") -> None:
        self.n, self.method = n, method
        self.reqs = [0] * n  # requests in flight
        self.tokens = [0] * n  # their prompt + max_new_tokens
        self.routed = [0] * n  # requests routed since start
        self.where: dict[str, tuple[int, int]] = {}  # rid → (replica, tokens)
        self.turn = 0
        self.prefixes: OrderedDict[int, int] = OrderedDict()  # block hash → replica

    def route(self, rid: str, ids: list[int], max_new_tokens: int, room: int | None = None) -> int:
        if self.n == 1:
            d = 0
        elif room is not None:
            d = room % self.n
        elif self.method == "round_robin":
            d, self.turn = self.turn, (self.turn + 1) % self.n
        elif self.method == "prefix":
            d = self._by_prefix(ids)
        else:
            d = self.least_busy()
        work = len(ids) + max_new_tokens
        self.where[rid] = (d, work)
        self.reqs[d] += 1
        self.tokens[d] += work
        self.routed[d] += 1
        return d

    def replica(self, rid: str) -> int | None:
        entry = self.where.get(rid)
        return None if entry is None else entry[0]

    def finish(self, rid: str) -> None:
        """The API server stopped waiting for `rid` (finished, aborted, failed); unknown rids are ignored."""
        entry = self.where.pop(rid, None)
        if entry is not None:
            self.reqs[entry[0]] -= 1
            self.tokens[entry[0]] -= entry[1]

    def least_busy(self) -> int:
        return min(range(self.n), key=lambda d: (self.reqs[d], self.tokens[d], d))

    def _by_prefix(self, ids: list[int]) -> int:
        hashes = block_hashes(ids)
        best = next((self.prefixes[h] for h in reversed(hashes) if h in self.prefixes), None)
        least = self.least_busy()
        if best is None or (self.reqs[best] - self.reqs[least] > BALANCE_ABS
                            and self.reqs[best] > BALANCE_REL * self.reqs[least]):
            best = least
        for h in hashes:
            self.prefixes[h] = best
            self.prefixes.move_to_end(h)
        while len(self.prefixes) > PREFIX_INDEX_SIZE:
            self.prefixes.popitem(last=False)
        return best

    def stats(self, d: int) -> dict[str, int]:
        return {"dp_rank": d, "num_routed_reqs": self.routed[d], "num_inflight_reqs": self.reqs[d]}
