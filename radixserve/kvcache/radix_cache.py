"""Radix prefix cache: a tree over token ids whose nodes own the KV slots of their tokens.

Requests that share a prompt prefix reuse the slots already computed for it instead of
recomputing. The tree is keyed by whole pages (page_size tokens): the allocator hands out whole
pages, so a node boundary inside a page would leave a page owned by two nodes and it could be
neither evicted nor freed on its own. Every key and slot list is therefore a multiple of
page_size, and a partial match is rounded down to a page boundary.

Ownership: once released into the tree, slots belong to the tree until evicted; a running
request only *locks* the node of its matched prefix (lock counts propagate to the root, as in
SGLang's inc_lock_ref), which keeps that path from being evicted. Slot tensors are kept on the CPU
because the allocator and eviction are CPU-side bookkeeping; the scheduler copies match results
to the device when it writes `req_to_token`.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch

from radixserve.kvcache.allocator import PageAllocator


@dataclass
class MatchResult:
    slots: torch.Tensor  # int64 [n], n a multiple of page_size
    node: object  # lock this while a request uses the prefix (None for the naive cache)
    host_len: int = 0  # HiCache: tokens of the match loaded back from the host tier for it
    storage_len: int = 0  # HiCache: of those, tokens read from the file tier first

    @property
    def length(self) -> int:
        return int(self.slots.numel())


_node_ids = itertools.count()


class TreeNode:
    __slots__ = ("children", "id", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None, lock_ref: int = 0,
                 last_access: int = 0) -> None:
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[object, TreeNode] = {}
        self.lock_ref = lock_ref
        self.last_access = last_access
        self.id = next(_node_ids)  # heap tie-break: nodes are not orderable

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock={self.lock_ref})"


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


class RadixCache:
    node_cls = TreeNode  # HiRadixCache's nodes carry more state

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        assert allocator.page_size == page_size, "cache and allocator must agree on page_size"
        self.allocator = allocator
        self.page_size = page_size
        # A logical clock instead of wall time: deterministic and never ties within one process.
        self._clock = itertools.count(1)
        self.hit_tokens = 0
        self.queried_tokens = 0
        self.reset()

    # ---- helpers -------------------------------------------------------------------------------
    def _child_key(self, key: list[int]) -> object:
        """Children are keyed by their first page: siblings can never share a first page, because
        two keys sharing it would have been merged into one node up to at least that page."""
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _match_len(self, a: list[int], b: list[int]) -> int:
        """Length of the common prefix of a and b, rounded down to a page boundary."""
        n = min(len(a), len(b))
        if a[:n] == b[:n]:  # fast path in C; both lengths are page multiples here
            return n
        ps = self.page_size
        for i in range(0, n, ps):
            if a[i: i + ps] != b[i: i + ps]:
                return i
        return n

    def _split(self, child: TreeNode, m: int) -> TreeNode:
        """Cut `child` after m tokens; the new upper node inherits the lock count and access time so
        the lock propagation invariant (parent >= child) and the size accounting stay intact, and a
        request holding `child` as its handle still unlocks the right path."""
        parent = child.parent
        assert parent is not None and 0 < m < len(child.key) and m % self.page_size == 0
        top = self.node_cls(child.key[:m], child.value[:m], parent, child.lock_ref, child.last_access)
        parent.children[self._child_key(child.key)] = top
        child.key, child.value, child.parent = child.key[m:], child.value[m:], top
        top.children[self._child_key(child.key)] = child
        return top

    # ---- lookup --------------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        """Longest cached page-aligned prefix. Splits a node on a partial hit so the returned handle
        covers exactly the match (the split changes no contents or sizes); besides that only LRU
        times change, so policies may probe many requests. Callers that need at least one token to
        compute (for logits) should pass token_ids[:-1]."""
        key = list(token_ids[: len(token_ids) // self.page_size * self.page_size])
        now = next(self._clock)
        node, pos, values = self.root, 0, []
        node.last_access = now
        while pos < len(key):
            child = node.children.get(self._child_key(key[pos:]))
            if child is None:
                break
            m = self._match_len(child.key, key[pos:])
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + m
        return MatchResult(torch.cat(values) if values else _empty(), node)

    def match_for_admission(self, token_ids: list[int], rid: str) -> MatchResult | None:
        """The match a request is admitted with (HiRadixCache also loads host pages and may say wait)."""
        return self.match_prefix(token_ids)

    def host_info(self) -> dict[str, int]:
        """HiCache's host pool figures for /metrics (none without it)."""
        return {}

    def record_hit(self, matched: int, total: int) -> None:
        self.hit_tokens += matched
        self.queried_tokens += total

    # ---- locking -------------------------------------------------------------------------------
    def inc_lock(self, node: object) -> None:
        """Lock node and all ancestors: eviction only removes unlocked leaves, so a locked node's whole
        path survives, and the first lock moves the node's tokens from evictable to protected."""
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: object) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, f"unlock of unlocked {node}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    # ---- insertion -----------------------------------------------------------------------------
    def release(self, token_ids: list[int], slots: torch.Tensor, node: object, cached_len: int) -> None:
        """Hand a finished/retracted request's KV to the tree. The unaligned tail cannot be a node (it
        is a partial page), so it is freed. The lock is dropped last, so our path cannot be evicted
        while we insert below it."""
        ps = self.page_size
        assert cached_len % ps == 0 and slots.numel() >= len(token_ids) >= cached_len
        slots = slots.to("cpu", torch.int64)
        aligned = len(token_ids) // ps * ps
        self._insert(list(token_ids[:aligned]), slots[:aligned])
        self.allocator.free(slots[aligned:])
        self.dec_lock(node)

    def cache_running(self, token_ids: list[int], slots: torch.Tensor, node: object, cached_len: int) -> MatchResult:
        """Insert a running request's computed, page-aligned prefix so requests admitted while it is
        still running can share it (SGLang's cache_unfinished_req). Its lock moves from `node` to the
        new deepest node; the returned slots (the tree's) replace the request's own for that prefix."""
        aligned = len(token_ids) // self.page_size * self.page_size
        if aligned <= cached_len:
            return MatchResult(slots[:cached_len], node)
        self._insert(list(token_ids[:aligned]), slots[:aligned].to("cpu", torch.int64))
        match = self.match_prefix(list(token_ids[:aligned]))
        self.inc_lock(match.node)
        self.dec_lock(node)
        return match

    def _insert(self, key: list[int], slots: torch.Tensor) -> None:
        """Insert page-aligned `key` with `slots`. Positions someone else inserted already have slots
        in the tree; ours for them are duplicates and are freed (the tree's copy wins so holders of it
        stay valid)."""
        now = next(self._clock)
        cur, pos = self.root, 0
        cur.last_access = now
        while pos < len(key):
            child = cur.children.get(self._child_key(key[pos:]))
            if child is None:
                new = self.node_cls(key[pos:], slots[pos:].clone(), cur, 0, now)
                cur.children[self._child_key(new.key)] = new
                self._evictable += len(new.key)
                break
            m = self._match_len(child.key, key[pos:])
            if m < len(child.key):
                child = self._split(child, m)
            ours = slots[pos: pos + m]
            if not torch.equal(ours, child.value):  # equal slots are our own matched prefix (the usual case)
                self.allocator.free(ours[ours != child.value])
            child.last_access = now
            cur, pos = child, pos + m

    # ---- eviction ------------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until num_tokens are freed. Only leaves go: an
        inner node's tokens are a prefix of its children's, so it becomes evictable once they are
        gone, which the loop handles by pushing the emptied parent."""
        heap = [(n.last_access, n.id, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            self.allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def _nodes(self) -> list[TreeNode]:
        """All non-root nodes (iterative: deep trees of page_size 1 would overflow recursion)."""
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    # ---- sizes, reset, checks ------------------------------------------------------------------
    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

    @property
    def total_size(self) -> int:
        return self._evictable + self._protected

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def reset(self) -> None:
        """Return every cached slot to the allocator (flush_cache). Locked nodes are in use by running
        requests, whose KV would be freed under them, hence the assert."""
        if hasattr(self, "root"):
            assert self._protected == 0, "reset with locked nodes"
            for n in self._nodes():
                self.allocator.free(n.value)
        self.root = self.node_cls([], _empty(), None, lock_ref=1)  # permanently locked: never evicted
        self._evictable = 0
        self._protected = 0

    def check_invariants(self) -> None:
        ps = self.page_size
        evictable = protected = 0
        seen: list[torch.Tensor] = []
        for n in self._nodes():
            assert n.parent is not None and n.parent.children.get(self._child_key(n.key)) is n
            assert len(n.key) > 0 and len(n.key) % ps == 0, f"{n}: key not page aligned"
            assert n.value.numel() == len(n.key), f"{n}: key/value length mismatch"
            assert n.lock_ref >= 0, f"{n}: negative lock"
            if n.parent is not self.root:
                assert n.parent.lock_ref >= n.lock_ref, f"{n}: parent less locked than child"
            pages = n.value.view(-1, ps)
            assert torch.equal(pages % ps, torch.arange(ps).expand_as(pages)), f"{n}: slots split a page"
            assert (pages == pages[:, :1] + torch.arange(ps)).all(), f"{n}: page slots not contiguous"
            if n.lock_ref:
                protected += len(n.key)
            else:
                evictable += len(n.key)
            seen.append(n.value)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"sizes: counted {(evictable, protected)}, tracked {(self._evictable, self._protected)}")
        if seen:
            all_slots = torch.cat(seen)
            assert torch.unique(all_slots).numel() == all_slots.numel(), "slot appears twice in the tree"
            free = torch.tensor(self.allocator.free_pages, dtype=torch.int64)
            assert not torch.isin(all_slots // ps, free).any(), "tree slot is in the allocator's free pages"
