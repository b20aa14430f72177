"""HiCache's tiers without a model: the tree over device, host and file pages, driven as the scheduler
drives it. The reference is the KV itself: every position's K/V is a known function of its prefix, written
when the position is "computed", so a page that comes back from the host pool or a file must hold exactly
the bytes that were computed for that prefix (any dtype: fp32, bf16, FP8)."""
from __future__ import annotations

import glob
import hashlib
import os
import random
import time

import pytest
import torch

from radixserve.args import ServerArgs, parse_args
from radixserve.kvcache.allocator import PageAllocator
from radixserve.kvcache.file_storage import chain_keys
from radixserve.kvcache.hiradix_cache import HiCacheConfig, HiRadixCache

LAYERS, SLOT_SHAPE = 2, (2, 4)
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else [])


def kv_value(tokens: list[int]) -> float:
    """The 'KV' of the last position of `tokens`: depends on the whole prefix, as real KV does."""
    return int.from_bytes(hashlib.sha256(str(tokens).encode()).digest()[:2], "little") % 200 / 8 - 12


class Tiers:
    """A device pool, its allocator and a HiRadixCache over them; `serve` plays one request."""

    def __init__(self, num_pages: int, page_size: int, dtype: torch.dtype, host_ratio: float = 3.0, **cfg) -> None:
        self.ps, self.dtype = page_size, dtype
        slots = num_pages * page_size
        self.k = [torch.zeros((slots, *SLOT_SHAPE), dtype=dtype) for _ in range(LAYERS)]
        self.v = [torch.zeros((slots, *SLOT_SHAPE), dtype=dtype) for _ in range(LAYERS)]
        self.alloc = PageAllocator(num_pages, page_size)
        host = int(self.alloc.capacity_tokens * host_ratio)
        self.cache = HiRadixCache(self.alloc, page_size, self.k, self.v, torch.device("cpu"),
                                  HiCacheConfig(host, identity={"model": "test", "page_size": page_size}, **cfg))
        self.rid = 0

    def expected(self, tokens: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        vals = torch.tensor([kv_value(tokens[:p + 1]) for p in range(len(tokens))])
        k = (vals + layer)[:, None, None].expand(-1, *SLOT_SHAPE).to(self.dtype).contiguous()
        return k, (-vals)[:, None, None].expand(-1, *SLOT_SHAPE).to(self.dtype).contiguous()

    def check_kv(self, tokens: list[int], slots: torch.Tensor) -> None:
        if not tokens:
            return
        for layer in range(LAYERS):
            k, v = self.expected(tokens, layer)
            assert torch.equal(self.k[layer][slots].view(torch.uint8), k.view(torch.uint8)), "K bytes differ"
            assert torch.equal(self.v[layer][slots].view(torch.uint8), v.view(torch.uint8)), "V bytes differ"

    def serve(self, tokens: list[int], wait_s: float = 10.0):
        """Admit (waiting while the prefetch policy says so), check the matched KV, compute the rest, release."""
        self.rid += 1
        deadline = time.monotonic() + wait_s
        while (m := self.cache.match_for_admission(tokens, f"r{self.rid}")) is None:
            assert time.monotonic() < deadline, "prefetch never completed"
            time.sleep(0.005)
        self.cache.inc_lock(m.node)
        self.check_kv(tokens[:m.length], m.slots)
        need = self.alloc.pages_needed(m.length, len(tokens)) * self.ps
        if need > self.alloc.free_tokens:
            self.cache.evict(need - self.alloc.free_tokens)
        last = int(m.slots[-1]) if m.length else 0
        new = self.alloc.alloc_extend(m.length, len(tokens), last)
        for layer in range(LAYERS):
            k, v = self.expected(tokens, layer)
            self.k[layer][new], self.v[layer][new] = k[m.length:], v[m.length:]
        self.cache.release(tokens, torch.cat([m.slots, new]), m.node, m.length)
        self.cache.check_invariants()
        return m

    def assert_clean(self) -> None:
        """No slot leaked on either tier: flush returns every one."""
        c = self.cache
        c.check_invariants()
        assert self.alloc.free_tokens + c.total_size == self.alloc.capacity_tokens
        c.reset()
        assert self.alloc.free_tokens == self.alloc.capacity_tokens
        assert c.host.free_tokens == c.host.capacity_tokens


def conversations(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000) for _ in range(length)] for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ps", [1, 4])
def test_evicted_prefixes_come_back_from_host(dtype, ps):
    t = Tiers(num_pages=9, page_size=ps, dtype=dtype, host_ratio=4)  # 8 device pages: one conversation
    convs = conversations(4, 6 * ps + 1)
    for c in convs:
        assert t.serve(c).length == 0
    for c in convs:  # each was evicted from the device by the ones after it; the host still has it
        m = t.serve(c)
        assert m.length == len(c) // ps * ps and m.host_len > 0
    assert t.cache.host_hit_tokens > 0
    # a longer turn of a conversation reuses the host copy, then extends it
    m = t.serve(convs[0] + [7] * ps)
    assert m.length == len(convs[0]) // ps * ps
    t.assert_clean()


def test_write_policies():
    ps, conv = 2, conversations(3, 9)
    t = Tiers(num_pages=6, page_size=ps, dtype=torch.float32, write_policy="write_back")
    t.serve(conv[0])
    assert t.cache.host.free_tokens == t.cache.host.capacity_tokens  # nothing copied until evicted
    t.serve(conv[1])  # evicts conv[0] from the device: its copy is made now
    assert t.cache.host.free_tokens < t.cache.host.capacity_tokens
    assert t.serve(conv[0]).host_len == 8
    t.assert_clean()

    t = Tiers(num_pages=12, page_size=ps, dtype=torch.float32, write_policy="write_through_selective")
    t.serve(conv[0])
    assert t.cache.host.free_tokens == t.cache.host.capacity_tokens  # a one-off prompt takes no host room
    assert t.serve(conv[0]).length == 8  # first reuse: now it gets a host copy
    assert t.cache.host.capacity_tokens - t.cache.host.free_tokens == 8
    t.assert_clean()

    t = Tiers(num_pages=12, page_size=ps, dtype=torch.float32)  # write_through: copied on insertion
    t.serve(conv[0])
    assert t.cache.host.capacity_tokens - t.cache.host.free_tokens == 8
    t.assert_clean()


@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
def test_random_workload_keeps_tiers_consistent(policy):
    """Shared prefixes, branches, device and host pressure (a host barely larger than the device, so host
    eviction and dropped nodes happen too); every served prefix's KV is checked, and nothing leaks."""
    rng = random.Random(1)
    t = Tiers(num_pages=10, page_size=2, dtype=torch.bfloat16, host_ratio=1.5, write_policy=policy)
    bases = conversations(5, 8, seed=2)
    hits = 0
    for _ in range(120):
        b = rng.choice(bases)
        tokens = b[: rng.randrange(3, len(b) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(0, 6))]
        hits += t.serve(tokens).host_len
        if rng.random() < 0.1:
            t.cache.evict(rng.randrange(1, 12))
            t.cache.check_invariants()
    assert hits > 0
    t.assert_clean()


def test_host_pool_must_exceed_device_pool():
    with pytest.raises(ValueError, match="larger than the device pool"):
        Tiers(num_pages=9, page_size=1, dtype=torch.float32, host_ratio=1.0)


def test_file_tier_survives_a_restart_and_rejects_bad_pages(tmp_path):
    ps, d = 4, str(tmp_path / "kv")
    convs = conversations(3, 5 * ps + 2)
    first = Tiers(num_pages=12, page_size=ps, dtype=torch.bfloat16, storage_dir=d)
    for c in convs:
        first.serve(c)
    first.cache.flush()
    files = glob.glob(os.path.join(d, "*", "*.kv"))
    assert len(files) == 3 * 5 and not glob.glob(os.path.join(d, "*", "*.tmp"))  # whole pages, renamed in place

    # a "restarted server": empty device and host pools, same directory and identity
    second = Tiers(num_pages=12, page_size=ps, dtype=torch.bfloat16, storage_dir=d, prefetch_policy="wait_complete")
    m = second.serve(convs[0])
    assert (m.length, m.host_len, m.storage_len) == (5 * ps, 5 * ps, 5 * ps)  # and its KV bytes were checked

    # corrupt page 3 of conversation 1 (a flipped payload byte) and truncate page 2 of conversation 2
    k1 = chain_keys(second.cache.root_key, convs[1], ps)
    k2 = chain_keys(second.cache.root_key, convs[2], ps)
    p = second.cache.storage.path(k1[2])
    blob = bytearray(open(p, "rb").read())
    blob[-5] ^= 0xFF
    open(p, "wb").write(bytes(blob))
    p = second.cache.storage.path(k2[1])
    open(p, "r+b").truncate(os.path.getsize(p) - 7)
    m1, m2 = second.serve(convs[1]), second.serve(convs[2])
    assert (m1.storage_len, m2.storage_len) == (2 * ps, 1 * ps)  # the chain stops at the bad page: a miss
    assert second.cache.storage.corrupt_pages == 2
    second.cache.storage.flush()
    assert os.path.exists(second.cache.storage.path(k1[2]))  # recomputed and written again, intact
    assert second.cache.storage.read(k1[2]) is not None

    # another model identity never matches these files
    other = Tiers(num_pages=12, page_size=ps, dtype=torch.bfloat16, storage_dir=d, prefetch_policy="wait_complete")
    other.cache.root_key = hashlib.sha256(b"another model").digest()
    assert other.serve(convs[0]).length == 0
    for t in (first, second, other):
        t.assert_clean()


@pytest.mark.parametrize("policy", ["best_effort", "timeout"])
def test_prefetch_policies(tmp_path, policy):
    ps, d = 2, str(tmp_path / "kv")
    conv = conversations(2, 9)
    writer = Tiers(num_pages=12, page_size=ps, dtype=torch.float32, storage_dir=d)
    for c in conv:
        writer.serve(c)
    writer.cache.flush()
    t = Tiers(num_pages=12, page_size=ps, dtype=torch.float32, storage_dir=d, prefetch_policy=policy)
    if policy == "best_effort":  # never waits: the first request runs without its pages...
        assert t.cache.match_for_admission(conv[0], "a").length == 0
        deadline = time.monotonic() + 10
        while t.cache.prefetches and time.monotonic() < deadline:
            time.sleep(0.005)
            t.cache.poll()
        assert t.serve(conv[0]).storage_len == 8  # ...and they join the tree for the next one
    else:
        assert t.serve(conv[1]).storage_len == 8
    t.assert_clean()


def test_flags():
    a = ServerArgs(device="cpu")
    assert (a.hicache_ratio, a.hicache_size, a.hicache_write_policy, a.hicache_io_backend,
            a.hicache_storage_prefetch_policy, a.hicache_storage_backend) == (
        2.0, 0, "write_through", "kernel", "best_effort", None)
    for backend in ("hf3fs", "mooncake", "nixl"):
        with pytest.raises(ValueError, match="use `file`"):
            ServerArgs(device="cpu", enable_hierarchical_cache=True, hicache_storage_backend=backend)
    with pytest.raises(SystemExit):
        parse_args(["--enable-hierarchical-cache", "--hicache-write-policy", "write_around"])
    with pytest.raises(ValueError, match="ratio > 1"):
        ServerArgs(device="cpu", enable_hierarchical_cache=True, hicache_ratio=1.0)
    a = parse_args(["--enable-hierarchical-cache", "--hicache-storage-backend", "file", "--hicache-storage-dir",
                    "/tmp/x", "--hicache-storage-prefetch-policy", "wait_complete", "--hicache-size", "4"])
    assert (a.hicache_storage_backend, a.hicache_storage_dir, a.hicache_size) == ("file", "/tmp/x", 4.0)
