"""Prefix caches: matching, duplicate freeing, locking/LRU eviction and a randomized workload that
checks the tree's invariants and that no slot leaks or is freed twice."""
from __future__ import annotations

import random

import pytest
import torch

from radixserve.kvcache.allocator import OutOfSlots, PageAllocator
from radixserve.kvcache.naive_cache import NaiveCache
from radixserve.kvcache.radix_cache import RadixCache

PAGE_SIZES = [1, 4]


def make(page_size: int, num_pages: int = 64) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages, page_size)
    return alloc, RadixCache(alloc, page_size)


class Run:
    """A request as the scheduler drives it: match + lock, allocate the rest, later release."""

    def __init__(self, cache: RadixCache, tokens: list[int]) -> None:
        self.cache, self.tokens = cache, list(tokens)
        m = cache.match_prefix(self.tokens)
        self.node, self.cached_len = m.node, m.length
        cache.inc_lock(self.node)
        self.slots = m.slots
        try:
            self.grow(len(self.tokens), extend=False)
        except OutOfSlots:
            cache.dec_lock(self.node)
            raise

    def grow(self, new_len: int, extend: bool = True) -> None:
        cur = self.slots.numel()
        last = int(self.slots[-1]) if cur else 0
        new = self.cache.allocator.alloc_extend(cur, new_len, last)
        self.slots = torch.cat([self.slots, new])
        if extend:
            self.tokens += [random.randrange(3) for _ in range(new_len - cur)]

    def own_tokens(self) -> int:
        """Tokens' worth of pages this request holds outside the tree."""
        return self.cache.allocator.pages_needed(self.cached_len, self.slots.numel()) * self.cache.page_size

    def release(self) -> None:
        self.cache.release(self.tokens, self.slots, self.node, self.cached_len)


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_insert_and_match(ps: int) -> None:
    alloc, cache = make(ps)
    a = list(range(100, 123))  # 23 tokens: unaligned tail for ps=4
    ra = Run(cache, a)
    assert ra.cached_len == 0
    slots_a = ra.slots.clone()
    ra.release()
    cache.check_invariants()
    assert cache.total_size == len(a) // ps * ps
    assert alloc.free_tokens + cache.total_size == alloc.capacity_tokens

    for shared in (0, 1, 5, 8, 13, 23):
        b = a[:shared] + [7, 7, 7, 7, 7, 7]
        m = cache.match_prefix(b)
        n = min(shared, len(b)) // ps * ps
        assert m.length == n
        assert torch.equal(m.slots, slots_a[:n])
        cache.check_invariants()
    # a full re-query hits the aligned part and the returned node covers exactly that
    m = cache.match_prefix(a)
    assert m.length == len(a) // ps * ps
    assert cache.total_size == len(a) // ps * ps  # splits changed no sizes


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_second_request_reuses_and_extends(ps: int) -> None:
    alloc, cache = make(ps)
    a = list(range(16))
    Run(cache, a).release()
    b = a[:8] + list(range(50, 62))
    rb = Run(cache, b)
    assert rb.cached_len == 8
    assert cache.protected_size == 8 and cache.evictable_size == 8
    rb.release()
    cache.check_invariants()
    assert cache.protected_size == 0
    assert cache.total_size == 16 + (len(b) - 8) // ps * ps
    assert alloc.free_tokens + cache.total_size == alloc.capacity_tokens


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_duplicates_freed(ps: int) -> None:
    alloc, cache = make(ps)
    prompt = list(range(30))
    r1, r2 = Run(cache, prompt), Run(cache, prompt)  # both miss: computed independently
    assert r1.cached_len == r2.cached_len == 0
    r1.release()
    cache.check_invariants()
    r2.release()
    cache.check_invariants()
    assert cache.total_size == len(prompt) // ps * ps
    assert alloc.free_tokens + cache.total_size == alloc.capacity_tokens
    # a third request that matched after r1 released and extends further: only its new part stays
    r3 = Run(cache, prompt + [99] * 9)
    r4 = Run(cache, prompt + [99] * 9)
    assert r3.cached_len == r4.cached_len == len(prompt) // ps * ps
    r3.release()
    r4.release()
    cache.check_invariants()
    assert alloc.free_tokens + cache.total_size == alloc.capacity_tokens
    total = cache.total_size
    assert total == (len(prompt) + 9) // ps * ps
    assert cache.evict(10**9) == total
    assert alloc.free_tokens == alloc.capacity_tokens


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_locked_nodes_survive_eviction(ps: int) -> None:
    alloc, cache = make(ps)
    base = list(range(12))
    Run(cache, base + [1] * 8).release()
    r = Run(cache, base + [2] * 8)  # splits the first node; locks the shared 12 (aligned) tokens
    shared = 12 // ps * ps
    assert r.cached_len == shared
    cache.check_invariants()
    freed = cache.evict(10**9)
    cache.check_invariants()
    assert freed == 20 - shared  # only the unlocked [1]*8 branch went
    assert cache.protected_size == shared and cache.evictable_size == 0
    r.release()
    cache.check_invariants()
    assert cache.evict(10**9) == 20  # now both branches and the shared prefix
    assert cache.total_size == 0 and alloc.free_tokens == alloc.capacity_tokens


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_evict_lru_first(ps: int) -> None:
    _, cache = make(ps)
    seqs = [[k] * 8 for k in range(3)]
    for s in seqs:
        Run(cache, s).release()
    cache.match_prefix(seqs[0])  # touch 0: now 1 is the oldest, then 2, then 0
    assert cache.evict(1) == 8
    assert cache.match_prefix(seqs[1]).length == 0
    assert cache.match_prefix(seqs[0]).length == 8 and cache.match_prefix(seqs[2]).length == 8
    assert cache.evict(8) == 8  # 2 was touched after 0 above, so 0 goes
    assert cache.match_prefix(seqs[0]).length == 0 and cache.match_prefix(seqs[2]).length == 8
    cache.check_invariants()


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_evict_frees_leaves_then_parents(ps: int) -> None:
    alloc, cache = make(ps)
    Run(cache, [5] * 8 + [1] * 8).release()
    Run(cache, [5] * 8 + [2] * 8).release()
    assert cache.evict(8) == 8  # one leaf only; the shared parent still has a child
    assert cache.match_prefix([5] * 8).length == 8
    assert cache.evict(9) == 16  # the other leaf, then the emptied parent
    assert cache.total_size == 0 and alloc.free_tokens == alloc.capacity_tokens
    cache.check_invariants()


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_reset_and_hit_stats(ps: int) -> None:
    alloc, cache = make(ps)
    Run(cache, list(range(20))).release()
    m = cache.match_prefix(list(range(20)))
    cache.record_hit(m.length, 20)
    assert cache.hit_tokens == 20 // ps * ps and cache.queried_tokens == 20
    cache.reset()
    cache.check_invariants()
    assert cache.total_size == 0 and alloc.free_tokens == alloc.capacity_tokens


@pytest.mark.parametrize("ps", PAGE_SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_randomized_workload(ps: int, seed: int) -> None:
    random.seed(seed)
    alloc, cache = make(ps, num_pages=200 // ps + 1)
    bases = [[random.randrange(3) for _ in range(40)] for _ in range(4)]
    active: list[Run] = []

    def accounted() -> None:
        cache.check_invariants()
        held = sum(r.own_tokens() for r in active)
        assert alloc.free_tokens + cache.total_size + held == alloc.capacity_tokens

    for _ in range(600):
        op = random.random()
        if op < 0.4:
            tokens = random.choice(bases)[: random.randrange(0, 41)]
            tokens += [random.randrange(3) for _ in range(random.randrange(1, 12))]
            need = len(tokens)
            if alloc.free_tokens < need + ps:
                cache.evict(need + ps)
            try:
                active.append(Run(cache, tokens))
            except OutOfSlots:
                pass
        elif op < 0.6 and active:
            r = random.choice(active)  # decode a few tokens
            try:
                r.grow(r.slots.numel() + random.randrange(1, 6))
            except OutOfSlots:
                pass
        elif op < 0.85 and active:  # finish or retract
            r = active.pop(random.randrange(len(active)))
            r.release()
        elif op < 0.9 and active:  # lock/unlock pairs on another request's handle
            r = random.choice(active)
            cache.inc_lock(r.node)
            accounted()
            cache.dec_lock(r.node)
        else:
            cache.evict(random.randrange(1, 60))
        accounted()

    for r in active:
        r.release()
    active.clear()
    accounted()
    assert cache.protected_size == 0
    cache.evict(10**9)
    accounted()
    assert cache.total_size == 0
    assert alloc.free_tokens == alloc.capacity_tokens


@pytest.mark.parametrize("ps", PAGE_SIZES)
def test_naive_cache_frees_everything(ps: int) -> None:
    alloc = PageAllocator(32, ps)
    cache = NaiveCache(alloc, ps)
    tokens = list(range(21))
    m = cache.match_prefix(tokens)
    assert m.length == 0 and m.node is None
    cache.inc_lock(m.node)
    slots = alloc.alloc_extend(0, len(tokens), 0)
    cache.release(tokens, slots, m.node, 0)
    assert alloc.free_tokens == alloc.capacity_tokens
    assert cache.match_prefix(tokens).length == 0
    assert cache.evict(100) == 0
    assert cache.total_size == cache.evictable_size == cache.protected_size == 0
