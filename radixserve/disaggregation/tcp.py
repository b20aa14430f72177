"""The TCP transport of PD disaggregation: runs on any machine, across hosts, CPU or GPU pools.

One connection per request and piece, opened by the decode side (it knows the room, and connecting out is what
firewalls allow from the decode pool):

```
decode ──frame {room, num_tokens, heads, decode_tp}──▶ prefill rank's sender (waits until the room's KV is offered)
decode ◀──frame {first_token, seed, cached_tokens, shape, dtype, nbytes} + nbytes of KV── or frame {error}
```
`heads` is the [start, stop) of the prefill rank's KV heads the decode rank takes (shards.fetch_plan: at equal
--tp all of them, from the rank with its number). The sender keeps a room's KV until every decode rank whose
plan names it has fetched (shards.fetchers, from the first ask's decode_tp); decode rank 0 releases the rooms of
prefill ranks no plan names (replicated KV heads) with {room, release: true}.
A frame is a 4-byte big-endian length and a msgpack map. Every blocking call has the transfer's deadline as
its timeout, so a silent peer costs a timeout and never a hung thread; a peer that closes early is reported
with how much of the KV had arrived.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

import msgspec
import torch

from radixserve.disaggregation.bootstrap import lookup, prefill_layout
from radixserve.disaggregation.shards import fetch_plan, fetchers
from radixserve.disaggregation.types import BootstrapInfo, KVPayload, PeerGone, TransferError, TransferTimeout

logger = logging.getLogger(__name__)
MAX_FRAME = 1 << 20
CHUNK = 1 << 22
DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                              torch.float8_e5m2)}


# ---- framing ---------------------------------------------------------------------------------------------
def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = msgspec.msgpack.encode(obj)
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_exact(sock: socket.socket, buf: memoryview, what: str) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise PeerGone(f"the prefill server closed the connection after {got} of {len(buf)} bytes of {what} "
                           f"(did it stop or die?)")
        got += n


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(4)
    recv_exact(sock, memoryview(head), "a frame header")
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise PeerGone(f"a {n}-byte frame is not this protocol (the peer is not a radixserve KV sender)")
    body = bytearray(n)
    recv_exact(sock, memoryview(body), "a frame")
    return msgspec.msgpack.decode(bytes(body))


def payload_header(p: KVPayload, kv: torch.Tensor) -> dict[str, Any]:
    return {"first_token": p.first_token, "seed": p.seed, "cached_tokens": p.cached_tokens,
            "logprob": p.logprob, "top_logprobs": p.top_logprobs, "shape": list(kv.shape),
            "dtype": str(kv.dtype), "nbytes": kv.numel() * kv.element_size()}


def tensor_bytes(kv: torch.Tensor) -> memoryview:
    return memoryview(kv.contiguous().view(torch.uint8).numpy()).cast("B")


# ---- prefill side ----------------------------------------------------------------------------------------
class TCPKVSender:
    """Holds each room's KV until its decode side fetches it, or `timeout_s` after it was offered (then it is
    dropped with a warning: that decode server gave up or was never asked)."""

    def __init__(self, host: str, timeout_s: float, tp_rank: int = 0, tp_size: int = 1,
                 num_kv_heads: int = 1) -> None:
        self.timeout_s, self.tp_rank, self.tp_size, self.num_kv_heads = timeout_s, tp_rank, tp_size, num_kv_heads
        self.server = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self.server.getsockname()[1]
        self.ready: dict[int, tuple[KVPayload, float]] = {}
        self.left: dict[int, int] = {}  # room -> decode ranks still to fetch it (known from the first ask)
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="pd-kv-sender").start()

    def offer(self, room: int, payload: KVPayload) -> None:
        now = time.monotonic()
        with self.cond:
            for r in [r for r, (_, exp) in self.ready.items() if exp < now]:
                del self.ready[r]
                self.left.pop(r, None)
                logger.warning(f"PD: no decode server fetched the KV of room {r} within {self.timeout_s:.0f} s; "
                               f"dropped it")
            self.ready[room] = (payload, now + self.timeout_s)
            self.cond.notify_all()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="pd-kv-send").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.timeout_s)
                ask = recv_frame(conn)
                room, deadline = int(ask["room"]), time.monotonic() + self.timeout_s
                with self.cond:
                    while room not in self.ready and not self.closed and time.monotonic() < deadline:
                        self.cond.wait(max(0.0, deadline - time.monotonic()))
                    entry = self._take(room, ask)
                if ask.get("release"):
                    send_frame(conn, {"released": entry is not None})
                    return
                if entry is None:
                    send_frame(conn, {"error": f"room {room} was not prefilled on this server within "
                                               f"{self.timeout_s:.0f} s"})
                    return
                payload = entry[0]
                start, stop = ask.get("heads") or (0, payload.kv.shape[3])
                kv = payload.kv[:, :, :, start:stop]
                if ask.get("num_tokens") not in (None, payload.kv.shape[2]):
                    send_frame(conn, {"error": f"room {room} holds {payload.kv.shape[2]} tokens of KV, the decode "
                                               f"side expects {ask['num_tokens']}: the two servers tokenized the "
                                               f"request differently (same model and tokenizer?)"})
                    return
                start = time.perf_counter()
                send_frame(conn, payload_header(payload, kv))
                data = tensor_bytes(kv)
                for i in range(0, len(data), CHUNK):
                    conn.sendall(data[i:i + CHUNK])
                dt = time.perf_counter() - start
                logger.debug(f"PD: sent room {room}: {len(data) / 1e6:.1f} MB in {dt * 1e3:.1f} ms")
            except (OSError, TransferError, ValueError, KeyError, msgspec.DecodeError) as e:
                logger.warning(f"PD: a KV transfer to a decode server failed: {e}")

    def _take(self, room: int, ask: dict[str, Any]) -> tuple[KVPayload, float] | None:
        """The room's entry for this ask (under the lock); dropped once its last fetcher (or a release) took it."""
        entry = self.ready.get(room)
        if entry is None:
            return None
        if ask.get("release"):
            left = 0
        else:
            decode_tp = int(ask.get("decode_tp", self.tp_size))
            left = self.left.get(room, fetchers(self.tp_rank, self.tp_size, decode_tp, self.num_kv_heads)) - 1
        if left <= 0:
            del self.ready[room]
            self.left.pop(room, None)
        else:
            self.left[room] = left
        return entry

    def close(self) -> None:
        self.closed = True
        with self.cond:
            self.cond.notify_all()
        self.server.close()


# ---- decode side -----------------------------------------------------------------------------------------
class Transfer:
    """One request's KV on its way in. The scheduler polls `done`; then `payload` is set or `error` says why
    not. `cancel()` (the request was aborted) drops the connection."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.done = threading.Event()
        self.payload: KVPayload | None = None
        self.error: TransferError | None = None
        self.sock: socket.socket | None = None
        self.cancelled = False
        self.nbytes, self.seconds = 0, 0.0  # measured from the first byte of the reply to the last

    def cancel(self) -> None:
        self.cancelled = True
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TCPKVReceiver:
    """Fetches this TP rank's KV heads into CPU memory, one thread per transfer; the scheduler writes it into its
    slots. At the prefill server's --tp they come from the prefill rank with this rank's number; at another
    --tp from the prefill ranks shards.fetch_plan names, a piece each, joined along the head dimension."""

    def __init__(self, engine_rank: int, timeout_s: float, layout: tuple[int, int, int, torch.dtype],
                 tp_size: int = 1, num_kv_heads: int | None = None) -> None:
        self.engine_rank, self.timeout_s, self.layout, self.tp_size = engine_rank, timeout_s, layout, tp_size
        # the model's KV heads (all ranks): this rank's times tp_size, unless they are replicated
        self.num_kv_heads = num_kv_heads or layout[1] * tp_size

    def fetch(self, info: BootstrapInfo, num_tokens: int) -> Transfer:
        t = Transfer(info.room)
        threading.Thread(target=self._run, args=(t, info, num_tokens), daemon=True, name="pd-kv-recv").start()
        return t

    def _run(self, t: Transfer, info: BootstrapInfo, num_tokens: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            t.payload = self._receive(t, info, num_tokens, deadline)
        except TransferError as e:
            t.error = e
        except TimeoutError:
            t.error = TransferTimeout(f"the KV of this request (room {info.room}) did not arrive from the prefill "
                                      f"server {info.host}:{info.port} within {self.timeout_s:g} s "
                                      f"(--disaggregation-waiting-timeout); was the same request sent to a "
                                      f"prefill server?")
        except OSError as e:
            t.error = PeerGone(f"the KV transfer from the prefill server {info.host} failed: {e}")
        finally:
            if t.cancelled and t.error is None and t.payload is None:
                t.error = TransferError("aborted")
            t.done.set()

    def _receive(self, t: Transfer, info: BootstrapInfo, num_tokens: int, deadline: float) -> KVPayload:
        prefill_tp = prefill_layout(info.host, info.port, deadline)[0]
        layers, heads, dim, dtype = self.layout
        plan = fetch_plan(self.engine_rank, self.tp_size, prefill_tp, self.num_kv_heads)
        if sum(b - a for _, a, b in plan) != heads:
            raise PeerGone(f"the prefill server's --tp {prefill_tp} does not split this model's "
                           f"{self.num_kv_heads} KV heads into this rank's {heads}: serve the same model on both")
        kv = torch.empty([layers, 2, num_tokens, heads, dim], dtype=dtype)
        head, off = None, 0
        for rank, a, b in plan:
            head = self._piece(t, info, num_tokens, deadline, rank, (a, b), kv[:, :, :, off:off + b - a])
            off += b - a
        if self.engine_rank == 0:  # prefill ranks no plan names hold replicas nobody fetches: let them go now
            named = {q for r in range(self.tp_size) for q, _, _ in fetch_plan(r, self.tp_size, prefill_tp,
                                                                                self.num_kv_heads)}
            for q in sorted(set(range(prefill_tp)) - named):
                threading.Thread(target=self._release, args=(info, deadline, q), daemon=True,
                                 name="pd-kv-release").start()
        return KVPayload(kv, int(head["first_token"]), int(head["seed"]), int(head["cached_tokens"]),
                         head.get("logprob"), [tuple(e) for e in head.get("top_logprobs") or []] or None)

    def _piece(self, t: Transfer, info: BootstrapInfo, num_tokens: int, deadline: float, rank: int,
               heads: tuple[int, int], out: torch.Tensor) -> dict[str, Any]:
        """Receive KV heads [a, b) of prefill rank `rank` into `out` (a view of the request's KV)."""
        host, port = lookup(info.host, info.port, rank, deadline, info.room)
        sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        t.sock = sock
        with sock:
            send_frame(sock, {"room": info.room, "num_tokens": num_tokens, "engine_rank": self.engine_rank,
                              "heads": list(heads), "decode_tp": self.tp_size})
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            head = recv_frame(sock)
            start = time.perf_counter()
            if "error" in head:
                raise PeerGone(f"the prefill server refused the KV transfer: {head['error']}")
            shape, dtype = list(out.shape), self.layout[3]
            if head["shape"] != shape or head["dtype"] != str(dtype):
                raise PeerGone(f"prefill rank {rank} sends KV of shape {head['shape']} {head['dtype']}, this decode "
                               f"rank expects {shape} {dtype}: serve the same model and dtype on both")
            piece = out if out.is_contiguous() else torch.empty(shape, dtype=dtype)
            view = memoryview(piece.view(torch.uint8).numpy()).cast("B")
            if len(view) != head["nbytes"]:
                raise PeerGone("the prefill server's KV size does not match its shape")
            for i in range(0, len(view), CHUNK):
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                recv_exact(sock, view[i:i + CHUNK], "the KV")
            if piece is not out:
                out.copy_(piece)
            t.nbytes, t.seconds = t.nbytes + len(view), t.seconds + time.perf_counter() - start
            return head

    def _release(self, info: BootstrapInfo, deadline: float, rank: int) -> None:
        try:
            host, port = lookup(info.host, info.port, rank, deadline, info.room)
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())) as sock:
                send_frame(sock, {"room": info.room, "release": True})
                recv_frame(sock)
        except (OSError, TransferError) as e:  # it expires on the prefill side anyway
            logger.debug(f"PD: releasing room {info.room} on prefill rank {rank} failed: {e}")
