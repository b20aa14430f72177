"""Page copies between the device KV pool and the host pool (HiCache's L1 <-> L2).

Every transfer covers all layers of a set of scattered slots and is moved as raw bytes, so it works for
any KV dtype. Three paths behind one interface:
  * CPU device: plain index copies, complete when the call returns (what the tests run).
  * CUDA `direct`: per layer one gather kernel into a device staging buffer, then a single copy of the
    whole staging buffer over PCIe, then one scatter per layer on the other side; pinned staging.
  * CUDA `kernel`: per layer one Triton kernel that reads/writes the pinned host pool directly (UVA),
    no staging (kernels/kv_copy.py). It checks itself at start-up and falls back to `direct`.
On CUDA every copy runs on a side stream that first waits for the compute stream (the KV being backed
up was just computed; the slots being loaded into may have been read by the step in flight), and ends
with an event: a backup's device slots may be freed only once it has fired, and a load's event is what
the next forward waits for. Given the KV pool, a load records one event per layer instead and leaves them
in `pool.pending_load`: the next forward's attention at layer i waits only for layer i's pages, so the
copy of the later layers overlaps the compute of the earlier ones.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from radixserve.kernels import kv_copy
from radixserve.kvcache.host_pool import HostKVPool
from radixserve.kvcache.pool import KVPool
from radixserve.transfer import to_device

logger = logging.getLogger(__name__)
STAGING_BYTES = 256 << 20  # the direct path moves at most this much per staging round


@dataclass
class Transfer:
    """One copy in flight. `finish` runs on the CPU once the device part has completed (the direct
    backup's scatter into the host pool)."""

    event: torch.cuda.Event | None = None
    finish: list = field(default_factory=list)
    done: bool = False


class KVTransfer:
    def __init__(self, dev_k: list[torch.Tensor], dev_v: list[torch.Tensor], host: HostKVPool,
                 device: torch.device, io_backend: str = "kernel", pool: KVPool | None = None) -> None:
        self.device, self.pool = device, pool  # pool: the KVPool whose pending_load takes per-layer events
        self.cuda = device.type == "cuda"
        self.dev = [b.view(torch.uint8).reshape(b.shape[0], -1) for layer in zip(dev_k, dev_v) for b in layer]
        self.host = [b.view(torch.uint8).reshape(b.shape[0], -1) for layer in zip(host.k, host.v) for b in layer]
        self.row_bytes = self.dev[0].shape[1]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.last_load: torch.cuda.Event | None = None
        self.bytes_loaded = self.bytes_backed_up = 0
        self.load_seconds = 0.0  # host-measured time of synchronous loads (CPU path), for the bench
        self.io_backend = io_backend if self.cuda else "cpu"
        if self.io_backend == "kernel":
            self.io_backend = self._check_kernel()

    # ---- public ----------------------------------------------------------------------------------
    def backup(self, dev_slots: torch.Tensor, host_slots: torch.Tensor) -> Transfer:
        """Copy device slots -> host slots (all layers)."""
        self.bytes_backed_up += dev_slots.numel() * self.row_bytes * len(self.dev)
        if not self.cuda:
            for d, h in zip(self.dev, self.host):
                h.index_copy_(0, host_slots, d.index_select(0, dev_slots))
            return Transfer(done=True)
        t = Transfer()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dev_idx = to_device(dev_slots, self.device)
            if self.io_backend == "kernel":
                host_idx = to_device(host_slots, self.device)
                for d, h in zip(self._words(self.dev), self._words(self.host)):
                    kv_copy.copy_rows(d, h, dev_idx, host_idx)
            else:
                for lo, hi in self._chunks(dev_slots.numel()):
                    staged = torch.empty((len(self.dev), hi - lo, self.row_bytes), dtype=torch.uint8,
                                         device=self.device)
                    for i, d in enumerate(self.dev):
                        torch.index_select(d, 0, dev_idx[lo:hi], out=staged[i])
                    pinned = torch.empty(staged.shape, dtype=torch.uint8, pin_memory=True)
                    pinned.copy_(staged, non_blocking=True)
                    t.finish.append((pinned, host_slots[lo:hi]))
            t.event = torch.cuda.Event()
            t.event.record(self.stream)
        return t

    def load(self, host_slots: torch.Tensor, dev_slots: torch.Tensor) -> Transfer:
        """Copy host slots -> device slots (all layers); work enqueued after it on the compute stream waits."""
        n = host_slots.numel() * self.row_bytes * len(self.dev)
        self.bytes_loaded += n
        if not self.cuda:
            t0 = time.perf_counter()
            for d, h in zip(self.dev, self.host):
                d.index_copy_(0, dev_slots, h.index_select(0, host_slots))
            self.load_seconds += time.perf_counter() - t0
            return Transfer(done=True)
        t = Transfer()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        layer_events: list[torch.cuda.Event] = []
        with torch.cuda.stream(self.stream):
            dev_idx = to_device(dev_slots, self.device)
            if self.io_backend == "kernel":
                host_idx = to_device(host_slots, self.device)
                for i, (d, h) in enumerate(zip(self._words(self.dev), self._words(self.host))):
                    kv_copy.copy_rows(h, d, host_idx, dev_idx)
                    if i % 2:  # K then V of a layer copied
                        layer_events.append(self._record())
            else:
                chunks = self._chunks(host_slots.numel())
                for c, (lo, hi) in enumerate(chunks):
                    pinned = torch.empty((len(self.dev), hi - lo, self.row_bytes), dtype=torch.uint8,
                                         pin_memory=True)
                    for i, h in enumerate(self.host):
                        torch.index_select(h, 0, host_slots[lo:hi], out=pinned[i])
                    staged = pinned.to(self.device, non_blocking=True)
                    for i, d in enumerate(self.dev):
                        d.index_copy_(0, dev_idx[lo:hi], staged[i])
                        if i % 2 and c == len(chunks) - 1:  # stream order: the last chunk's layer i implies all
                            layer_events.append(self._record())
            t.event = layer_events[-1] if layer_events else self._record()
        if self.pool is not None and len(layer_events) == len(self.dev) // 2:
            # later loads run after earlier ones on this stream: the latest load's events cover them all
            self.pool.pending_load = layer_events
        else:  # everything enqueued on the compute stream from now on (the forward reading these pages) waits
            torch.cuda.current_stream(self.device).wait_event(t.event)
        self.last_load = t.event
        return t

    def _record(self) -> torch.cuda.Event:
        e = torch.cuda.Event()
        e.record(self.stream)
        return e

    def poll(self, t: Transfer) -> bool:
        """Whether `t` has completed (running its CPU-side finish if it just did)."""
        if not t.done and (t.event is None or t.event.query()):
            self._finish(t)
        return t.done

    def wait(self, t: Transfer) -> None:
        if not t.done:
            if t.event is not None:
                t.event.synchronize()
            self._finish(t)

    def sync_loads(self) -> None:
        """Block until every load issued so far has read its host pages (before host slots are reused)."""
        if self.last_load is not None:
            self.last_load.synchronize()
            self.last_load = None

    # ---- internals --------------------------------------------------------------------------------
    def _finish(self, t: Transfer) -> None:
        for pinned, host_slots in t.finish:
            for i, h in enumerate(self.host):
                h.index_copy_(0, host_slots, pinned[i])
        t.finish.clear()
        t.done = True

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        step = max(STAGING_BYTES // (self.row_bytes * len(self.dev)), 1)
        return [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def _words(self, bufs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [b.view(torch.int64) if self.row_bytes % 8 == 0 else b for b in bufs]

    def _check_kernel(self) -> str:
        """Copy a few rows both ways with the kernel and compare with the direct path; any failure (no
        triton, no UVA for this memory) falls back to `direct`, said once in the log."""
        if not kv_copy.HAS_TRITON:
            logger.warning("--hicache-io-backend kernel needs triton; using direct")
            return "direct"
        try:
            n = min(4, self.host[0].shape[0] - 1, self.dev[0].shape[0] - 1)
            src = torch.arange(1, n + 1, dtype=torch.int64)
            d, h = self._words(self.dev)[0], self._words(self.host)[0]
            keep_d, keep_h = d[src.to(self.device)].clone(), h[src].clone()
            probe = torch.randint(0, 1 << 30, (n, d.shape[1]), dtype=d.dtype) if d.dtype == torch.int64 else \
                torch.randint(0, 255, (n, d.shape[1]), dtype=d.dtype)
            h[src] = probe
            idx = src.to(self.device)
            kv_copy.copy_rows(h, d, idx, idx)
            torch.cuda.synchronize(self.device)
            ok = torch.equal(d[idx].cpu(), probe)
            h[src] = 0
            kv_copy.copy_rows(d, h, idx, idx)
            torch.cuda.synchronize(self.device)
            ok = ok and torch.equal(h[src], probe)
            d[idx] = keep_d
            h[src] = keep_h
        except Exception as e:  # noqa: BLE001 - any failure means the kernel path cannot be used here
            logger.warning(f"--hicache-io-backend kernel failed its self-check ({e}); using direct")
            return "direct"
        if not ok:
            logger.warning("--hicache-io-backend kernel copied wrong bytes in its self-check; using direct")
            return "direct"
        return "kernel"
