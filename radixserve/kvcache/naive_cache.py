"""No-op prefix cache (`--cache naive` / `--disable-radix-cache`): same interface as RadixCache, but
nothing is ever shared, so a finished request's slots all go straight back to the allocator. Useful
as a baseline and to rule the radix tree out when debugging."""
from __future__ import annotations

import torch

from radixserve.kvcache.allocator import PageAllocator
from radixserve.kvcache.radix_cache import MatchResult


class NaiveCache:
    evictable_size = protected_size = total_size = 0

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.hit_tokens = 0
        self.queried_tokens = 0

    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        return MatchResult(torch.empty(0, dtype=torch.int64), None)

    def match_for_admission(self, token_ids: list[int], rid: str) -> MatchResult:
        return self.match_prefix(token_ids)

    def host_info(self) -> dict[str, int]:
        return {}

    def record_hit(self, matched: int, total: int) -> None:
        self.hit_tokens += matched
        self.queried_tokens += total

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def inc_lock(self, node: object) -> None:
        pass

    def dec_lock(self, node: object) -> None:
        pass

    def cache_running(self, token_ids: list[int], slots: torch.Tensor, node: object, cached_len: int) -> MatchResult:
        return MatchResult(slots[:0], None)

    def release(self, token_ids: list[int], slots: torch.Tensor, node: object, cached_len: int) -> None:
        self.allocator.free(slots)

    def evict(self, num_tokens: int) -> int:
        return 0

    def reset(self) -> None:
        pass

    def check_invariants(self) -> None:
        pass
