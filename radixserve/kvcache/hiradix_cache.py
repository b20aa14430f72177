"""HiRadixCache (`--enable-hierarchical-cache`): the radix tree over three tiers, device → host → file.

Every node knows where its KV lives: `value` (device slots) and/or `host_value` (host slots), and its
pages may also be in the file tier under their hash-chain keys (file_storage.py). Two invariants keep
the tree simple:
  * every node has its KV on the device or on the host (or both);
  * the device-resident nodes form a prefix-closed subtree: a node on the device has its parent there.
So a lookup walks device nodes first, then host-only nodes; device eviction takes device *leaves* (no
child on the device) and, when the node has a host copy, frees only its device slots; host eviction takes
host-only leaves and removes them from the tree.

When a node gets a host copy (write policies, below), the copy runs on a side stream on CUDA; its device
slots are freed only after that copy has completed (eviction waits for it). When a request is admitted,
its host-resident pages are loaded back into fresh device slots in one batched transfer before the forward
that extends them, and a match that runs past device and host is looked up in the file tier and read back
in the background (prefetch policies, below).

Write policies (SGLang's names): write_through — a node is copied to the host when it enters the tree;
write_through_selective — when it is first hit again (a prefix used twice), so one-off prompts never take
host room; write_back — only when the device evicts it. With a file tier, every page that reaches the host
is also written to a file.
Prefetch policies: best_effort — never delay a request: it runs with what is already loaded, and pages
still being read join the tree for later requests; wait_complete — a request waits until its pages are
read; timeout — waits at most PREFETCH_TIMEOUT_BASE_S + PREFETCH_TIMEOUT_PER_KI_TOKEN_S per 1024 tokens.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass

import torch

from radixserve.kvcache.allocator import PageAllocator
from radixserve.kvcache.file_storage import FileStorage, PrefetchOp, chain_keys, identity_key
from radixserve.kvcache.host_pool import HostKVPool
from radixserve.kvcache.kv_transfer import KVTransfer, Transfer
from radixserve.kvcache.pool import KVPool
from radixserve.kvcache.radix_cache import MatchResult, RadixCache, TreeNode

logger = logging.getLogger(__name__)
WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
IO_BACKENDS = ("kernel", "direct")
PREFETCH_TIMEOUT_BASE_S = 1.0
PREFETCH_TIMEOUT_PER_KI_TOKEN_S = 0.25


class HiTreeNode(TreeNode):
    __slots__ = ("backup", "from_storage", "hashes", "hit_count", "host_value")

    def __init__(self, key: list[int], value: torch.Tensor | None, parent: TreeNode | None, lock_ref: int = 0,
                 last_access: int = 0) -> None:
        super().__init__(key, value, parent, lock_ref, last_access)
        self.host_value: torch.Tensor | None = None
        self.backup: Transfer | None = None  # device -> host copy in flight
        self.hashes: list[bytes] | None = None  # file-tier keys of its pages, computed when first needed
        self.hit_count = 0
        self.from_storage = False  # host copy read from the file tier and not yet loaded to the device


@dataclass
class HiCacheConfig:
    host_tokens: int
    write_policy: str = "write_through"
    io_backend: str = "kernel"
    prefetch_policy: str = "best_effort"
    storage_dir: str | None = None
    identity: dict | None = None  # what makes a page's KV valid: model config, dtypes, page size, TP rank


class HiRadixCache(RadixCache):
    node_cls = HiTreeNode

    def __init__(self, allocator: PageAllocator, page_size: int, dev_k: list[torch.Tensor],
                 dev_v: list[torch.Tensor], device: torch.device, cfg: HiCacheConfig,
                 kv_pool: KVPool | None = None) -> None:
        if cfg.write_policy not in WRITE_POLICIES:
            raise ValueError(f"--hicache-write-policy {cfg.write_policy!r}: choose {', '.join(WRITE_POLICIES)}")
        if cfg.prefetch_policy not in PREFETCH_POLICIES:
            raise ValueError(f"--hicache-storage-prefetch-policy {cfg.prefetch_policy!r}: choose "
                             f"{', '.join(PREFETCH_POLICIES)}")
        if cfg.host_tokens <= allocator.capacity_tokens:
            raise ValueError(f"HiCache host pool ({cfg.host_tokens} tokens) must be larger than the device pool "
                             f"({allocator.capacity_tokens} tokens): raise --hicache-ratio above 1 or --hicache-size")
        self.cfg = cfg
        self.host = HostKVPool(len(dev_k), cfg.host_tokens, page_size, tuple(dev_k[0].shape[1:]), dev_k[0].dtype,
                               pin_memory=device.type == "cuda")
        self.transfer = KVTransfer(dev_k, dev_v, self.host, device, cfg.io_backend, pool=kv_pool)
        self.storage = FileStorage(cfg.storage_dir, self.host.page_nbytes()) if cfg.storage_dir else None
        self.root_key = identity_key(cfg.identity or {})
        self.backups: list[HiTreeNode] = []  # nodes whose host copy is in flight
        self.prefetches: dict[str, tuple[PrefetchOp, list[int]]] = {}  # rid -> (file reads, the request's key)
        self._pinned: set[int] = set()  # node ids host eviction must not take (being loaded or extended)
        self.host_hit_tokens = self.storage_hit_tokens = 0
        super().__init__(allocator, page_size)

    # ---- lookup ----------------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> MatchResult:
        """Device-resident prefix only (what lpm probes and cache_running see); no transfers."""
        values, node, _, _ = self._walk(token_ids, device_only=True)
        return MatchResult(torch.cat(values) if values else torch.empty(0, dtype=torch.int64), node)

    def match_for_admission(self, token_ids: list[int], rid: str) -> MatchResult | None:
        """The match a request is admitted with: the device prefix, extended by host pages loaded back to
        fresh device slots now (one batched copy, which the next forward waits for). None: the request's
        pages are still being read from the file tier and the prefetch policy says to wait."""
        self.poll()
        key = list(token_ids[: len(token_ids) // self.page_size * self.page_size])
        if self.storage is not None and self._storage_wait(key, rid):
            return None
        values, node, chain, _ = self._walk(key)
        for n in self._path(node):
            n.hit_count += 1
            if self.cfg.write_policy == "write_through_selective" and n.host_value is None:
                self._backup(n)
        loaded, deepest, storage = self._load(node, chain)
        if not loaded:
            return MatchResult(torch.cat(values) if values else torch.empty(0, dtype=torch.int64), node)
        values += [n.value for n in loaded]
        host = sum(len(n.key) for n in loaded)
        self.host_hit_tokens += host
        self.storage_hit_tokens += storage
        return MatchResult(torch.cat(values), deepest, host_len=host, storage_len=storage)

    def _walk(self, key: list[int], device_only: bool = False):
        """(device values, deepest device node, host-only nodes after it, tokens covered)."""
        key = list(key[: len(key) // self.page_size * self.page_size])
        now = next(self._clock)
        node = dev_node = self.root
        node.last_access = now
        pos, values, chain = 0, [], []
        while pos < len(key):
            child = node.children.get(self._child_key(key[pos:]))
            if child is None or (device_only and child.value is None):
                break
            m = self._match_len(child.key, key[pos:])
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            if child.value is not None and not chain:
                values.append(child.value)
                dev_node = child
            else:
                chain.append(child)
            node, pos = child, pos + m
        return values, dev_node, chain, pos

    def _path(self, node: TreeNode) -> list[HiTreeNode]:
        out = []
        while node is not None and node is not self.root:
            out.append(node)
            node = node.parent
        return out

    # ---- host -> device --------------------------------------------------------------------------
    def _load(self, dev_node: TreeNode, chain: list[HiTreeNode]) -> tuple[list[HiTreeNode], TreeNode, int]:
        """Give the host-only nodes of `chain` device slots (as many whole nodes as fit) and copy them in
        one transfer. Each node is locked once it has slots, so making room for the next cannot evict it;
        the host copies are pinned against host eviction meanwhile."""
        if not chain:
            return [], dev_node, 0
        saved, self._pinned = self._pinned, self._pinned | {n.id for n in chain}
        locked, loaded, storage = [dev_node], [], 0
        self.inc_lock(dev_node)
        try:
            for n in chain:
                need = len(n.key)
                if self.allocator.free_tokens < need:
                    self._evict_device(need - self.allocator.free_tokens)
                if self.allocator.free_tokens < need:
                    break
                pages = self.allocator.alloc_pages(need // self.page_size)
                n.value = (pages[:, None] * self.page_size + torch.arange(self.page_size)).flatten()
                self._evictable += need  # host-only nodes are never locked
                self.inc_lock(n)
                locked.append(n)
                loaded.append(n)
                if n.from_storage:
                    storage += need
                    n.from_storage = False
            if loaded:
                self.transfer.load(torch.cat([n.host_value for n in loaded]), torch.cat([n.value for n in loaded]))
        finally:
            for n in locked:
                self.dec_lock(n)
            self._pinned = saved
        return loaded, (loaded[-1] if loaded else dev_node), storage

    # ---- device -> host --------------------------------------------------------------------------
    def _backup(self, node: HiTreeNode) -> bool:
        """Start the host copy of a device node; False when the host pool has no room even after evicting."""
        if node.host_value is not None:
            return True
        n = len(node.key)
        slots = self.host.alloc(n)
        if slots is None:
            self._evict_host(n - self.host.free_tokens)
            slots = self.host.alloc(n)
            if slots is None:
                return False
        node.host_value = slots
        node.backup = self.transfer.backup(node.value, slots)
        if node.backup.done:  # CPU: copied already
            self._backed_up(node)
        else:
            self.backups.append(node)
        return True

    def flush(self) -> None:
        """Finish every host copy and file write in flight (tests; before a clean shutdown)."""
        for n in self.backups:
            if n.backup is not None:
                self.transfer.wait(n.backup)
                self._backed_up(n)
        self.backups = []
        if self.storage is not None:
            self.storage.flush()

    def poll(self) -> None:
        """Retire completed host copies (then write their pages to the file tier) and completed file reads
        (their pages join the tree as host-only nodes)."""
        pending = []
        for n in self.backups:
            if n.backup is None:
                continue
            if self.transfer.poll(n.backup):
                self._backed_up(n)
            else:
                pending.append(n)
        self.backups = pending
        for rid, (op, key) in list(self.prefetches.items()):
            if op.done:
                del self.prefetches[rid]
                self._insert_from_storage(key, op, op.pages)

    def _backed_up(self, n: HiTreeNode) -> None:
        n.backup = None
        if self.storage is None:
            return
        for key, lo in zip(self._hashes(n), range(0, len(n.key), self.page_size)):
            if key not in self.storage.written:
                self.storage.write_async(key, self.host.page_bytes(n.host_value[lo:lo + self.page_size]))

    # ---- insertion -------------------------------------------------------------------------------
    def _insert(self, key: list[int], slots: torch.Tensor) -> None:
        """As RadixCache._insert, and: a host-only node on the path adopts our freshly computed slots as its
        device copy (the path from the root is then all on the device again); new nodes get their host
        copy now under write_through."""
        self.poll()
        now = next(self._clock)
        cur, pos = self.root, 0
        cur.last_access = now
        while pos < len(key):
            child = cur.children.get(self._child_key(key[pos:]))
            if child is None:
                new = HiTreeNode(key[pos:], slots[pos:].clone(), cur, 0, now)
                cur.children[self._child_key(new.key)] = new
                self._evictable += len(new.key)
                if self.cfg.write_policy == "write_through":
                    self._backup(new)
                break
            m = self._match_len(child.key, key[pos:])
            if m < len(child.key):
                child = self._split(child, m)
            ours = slots[pos: pos + m]
            if child.value is None:
                child.value = ours.clone()
                child.from_storage = False
                self._evictable += m
            elif not torch.equal(ours, child.value):
                self.allocator.free(ours[ours != child.value])
            child.last_access = now
            cur, pos = child, pos + m

    def _split(self, child: HiTreeNode, m: int) -> HiTreeNode:
        parent = child.parent
        assert parent is not None and 0 < m < len(child.key) and m % self.page_size == 0
        top = HiTreeNode(child.key[:m], None if child.value is None else child.value[:m], parent, child.lock_ref,
                         child.last_access)
        top.host_value = None if child.host_value is None else child.host_value[:m]
        top.backup, top.hit_count, top.from_storage = child.backup, child.hit_count, child.from_storage
        if child.hashes is not None:
            top.hashes, child.hashes = child.hashes[: m // self.page_size], child.hashes[m // self.page_size:]
        if child.backup is not None:
            self.backups.append(top)  # both halves wait for the same transfer
        if child.id in self._pinned:
            self._pinned.add(top.id)
        parent.children[self._child_key(child.key)] = top
        child.key, child.parent = child.key[m:], top
        child.value = None if child.value is None else child.value[m:]
        child.host_value = None if child.host_value is None else child.host_value[m:]
        top.children[self._child_key(child.key)] = child
        return top

    # ---- file tier ------------------------------------------------------------------------------
    def _hashes(self, node: HiTreeNode) -> list[bytes]:
        """File keys of the node's pages; the chain needs its ancestors' last keys, computed top-down."""
        todo = []
        n = node
        while n is not self.root and n.hashes is None:
            todo.append(n)
            n = n.parent
        for n in reversed(todo):
            n.hashes = chain_keys(self._last_key(n.parent), n.key, self.page_size)
        return node.hashes

    def _last_key(self, node: TreeNode) -> bytes:
        return self.root_key if node is self.root else self._hashes(node)[-1]

    def _storage_wait(self, key: list[int], rid: str) -> bool:
        """Start or check the file-tier read of the pages past what the tree holds; True: wait for it."""
        entry = self.prefetches.get(rid)
        if entry is not None:
            op, _ = entry
            pol = self.cfg.prefetch_policy
            limit = PREFETCH_TIMEOUT_BASE_S + PREFETCH_TIMEOUT_PER_KI_TOKEN_S * len(op.keys) * self.page_size / 1024
            if pol == "wait_complete" or (pol == "timeout" and time.monotonic() - op.started < limit):
                return True
            op.cancelled = True  # take what is there; the rest is not worth the wait
            del self.prefetches[rid]
            self._insert_from_storage(key, op, list(op.pages))
            return False
        _, dev_node, chain, covered = self._walk(key)
        if covered >= len(key):
            return False
        node = chain[-1] if chain else dev_node
        keys = chain_keys(self._last_key(node), key[covered:], self.page_size)
        if not keys or not self.storage.exists(keys[0]):
            return False
        self.prefetches[rid] = (self.storage.prefetch(keys, covered), key)
        return self.cfg.prefetch_policy != "best_effort"

    def _insert_from_storage(self, key: list[int], op: PrefetchOp, pages: list[bytes]) -> None:
        """Hang pages read from files under the tree's path for `key` as a host-only node. Positions the
        tree gained meanwhile are skipped; if it lost pages before op.start, the read is dropped."""
        ps = self.page_size
        _, dev_node, chain, covered = self._walk(key[: op.start + len(pages) * ps])
        parent = chain[-1] if chain else dev_node
        if covered < op.start or not pages:
            return
        skip = (covered - op.start) // ps
        pages = pages[skip:]
        keys = op.keys[skip: skip + len(pages)]
        if not pages:
            return
        saved, self._pinned = self._pinned, self._pinned | {n.id for n in self._path(parent)}
        try:
            need = len(pages) * ps
            if self.host.free_tokens < need:
                self._evict_host(need - self.host.free_tokens)
            pages = pages[: self.host.free_tokens // ps]
            if not pages:
                return
            slots = self.host.alloc(len(pages) * ps)
        finally:
            self._pinned = saved
        for i, data in enumerate(pages):
            self.host.set_page(slots[i * ps:(i + 1) * ps], data)
        node = HiTreeNode(key[covered: covered + len(pages) * ps], None, parent, 0, next(self._clock))
        node.host_value, node.hashes, node.from_storage = slots, keys[: len(pages)], True
        parent.children[self._child_key(node.key)] = node

    # ---- eviction --------------------------------------------------------------------------------
    def _device_leaf(self, n: HiTreeNode) -> bool:
        return (n is not self.root and n.value is not None and n.lock_ref == 0
                and all(c.value is None for c in n.children.values()))

    def evict(self, num_tokens: int) -> int:
        """Free device slots of least-recently-used device leaves. A node with a host copy stays in the tree
        (host-only); one without gets its copy now if the host has room (write_back), else it and its
        host-only subtree leave the tree. A copy still in flight is waited for before the slots are freed."""
        self.poll()
        return self._evict_device(num_tokens)

    def _evict_device(self, num_tokens: int) -> int:
        """evict() without retiring transfers first: safe in the middle of a load (poll may split nodes)."""
        heap = [(n.last_access, n.id, n) for n in self._nodes() if self._device_leaf(n)]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, n = heapq.heappop(heap)
            if n.host_value is None:
                self._backup(n)
            if n.backup is not None:
                self.transfer.wait(n.backup)
                self._backed_up(n)
            self.allocator.free(n.value)
            self._evictable -= len(n.key)
            freed += len(n.key)
            if n.host_value is not None:
                n.value = None
            else:
                self._drop(n)
            parent = n.parent
            if self._device_leaf(parent):
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def _drop(self, n: HiTreeNode) -> None:
        """Remove a node whose device slots are already freed, with its (host-only) subtree."""
        stack = list(n.children.values())
        while stack:
            d = stack.pop()
            self.host.free(d.host_value)
            stack.extend(d.children.values())
        del n.parent.children[self._child_key(n.key)]

    def _evict_host(self, num_tokens: int) -> int:
        """Free host slots of least-recently-used host-only leaves; they leave the tree."""
        self.transfer.sync_loads()  # a load still reading a host page must finish before it is reused
        heap = [(n.last_access, n.id, n) for n in self._nodes()
                if n.value is None and not n.children and n.id not in self._pinned]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, n = heapq.heappop(heap)
            parent = n.parent
            self.host.free(n.host_value)
            freed += len(n.key)
            del parent.children[self._child_key(n.key)]
            if (parent is not self.root and parent.value is None and not parent.children
                    and parent.id not in self._pinned):
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    # ---- sizes, reset, checks --------------------------------------------------------------------
    def host_info(self) -> dict[str, int]:
        return {"hicache_host_used_tokens": self.host.capacity_tokens - self.host.free_tokens,
                "hicache_host_capacity_tokens": self.host.capacity_tokens}

    def reset(self) -> None:
        """flush_cache: every device and host slot back to its allocator (copies in flight finish first);
        file-tier pages stay: they are what a restarted server reuses."""
        if hasattr(self, "root"):
            assert self._protected == 0, "reset with locked nodes"
            for n in self.backups:
                if n.backup is not None:
                    self.transfer.wait(n.backup)
                    self._backed_up(n)
            self.transfer.sync_loads()
            for op, _ in self.prefetches.values():
                op.cancelled = True
            for n in self._nodes():
                if n.value is not None:
                    self.allocator.free(n.value)
                if n.host_value is not None:
                    self.host.free(n.host_value)
        self.backups, self.prefetches = [], {}
        self.root = HiTreeNode([], torch.empty(0, dtype=torch.int64), None, lock_ref=1)
        self._evictable = 0
        self._protected = 0

    def check_invariants(self) -> None:
        ps = self.page_size
        evictable = protected = 0
        dev, host = [], []
        for n in self._nodes():
            assert n.parent is not None and n.parent.children.get(self._child_key(n.key)) is n
            assert len(n.key) > 0 and len(n.key) % ps == 0, f"{n}: key not page aligned"
            assert n.value is not None or n.host_value is not None, f"{n}: KV on no tier"
            if n.parent is not self.root:
                assert n.parent.lock_ref >= n.lock_ref, f"{n}: parent less locked than child"
            for slots, out in ((n.value, dev), (n.host_value, host)):
                if slots is None:
                    continue
                assert slots.numel() == len(n.key), f"{n}: key/value length mismatch"
                pages = slots.view(-1, ps)
                assert (pages == pages[:, :1] + torch.arange(ps)).all() and (pages[:, 0] % ps == 0).all(), \
                    f"{n}: slots split a page"
                out.append(slots)
            if n.value is None:
                assert n.lock_ref == 0, f"{n}: locked but not on the device"
                continue
            assert n.parent is self.root or n.parent.value is not None, f"{n}: on the device, parent is not"
            if n.lock_ref:
                protected += len(n.key)
            else:
                evictable += len(n.key)
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"sizes: counted {(evictable, protected)}, tracked {(self._evictable, self._protected)}")
        for slots, alloc in ((dev, self.allocator), (host, self.host.allocator)):
            if not slots:
                continue
            all_slots = torch.cat(slots)
            assert torch.unique(all_slots).numel() == all_slots.numel(), "slot appears twice in the tree"
            free = torch.tensor(alloc.free_pages, dtype=torch.int64)
            assert not torch.isin(all_slots // ps, free).any(), "tree slot is in its allocator's free pages"
        in_tree = sum(s.numel() for s in host)
        assert self.host.free_tokens + in_tree == self.host.capacity_tokens, (
            f"host slots leaked: {self.host.free_tokens} free + {in_tree} in the tree != "
            f"{self.host.capacity_tokens}")
