"""The TCP transport of PD disaggregation: runs on any machine, across hosts, CPU or GPU pools.

One connection per request, opened by the decode side (it knows the room, and connecting out is what
firewalls allow from the decode pool):

```
decode ──frame {room, num_tokens}──▶ prefill rank's sender (waits until that room's KV is offered)
decode ◀──frame {first_token, seed, cached_tokens, shape, dtype, nbytes} + nbytes of KV── or frame {error}
```
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

from radixserve.disaggregation.bootstrap import lookup
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


def payload_header(p: KVPayload) -> dict[str, Any]:
    return {"first_token": p.first_token, "seed": p.seed, "cached_tokens": p.cached_tokens,
            "logprob": p.logprob, "top_logprobs": p.top_logprobs, "shape": list(p.kv.shape),
            "dtype": str(p.kv.dtype), "nbytes": p.kv.numel() * p.kv.element_size()}


def payload_bytes(p: KVPayload) -> memoryview:
    return memoryview(p.kv.contiguous().view(torch.uint8).numpy()).cast("B")


# ---- prefill side ----------------------------------------------------------------------------------------
class TCPKVSender:
    """Holds each room's KV until its decode side fetches it, or `timeout_s` after it was offered (then it is
    dropped with a warning: that decode server gave up or was never asked)."""

    def __init__(self, host: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.server = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self.server.getsockname()[1]
        self.ready: dict[int, tuple[KVPayload, float]] = {}
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="pd-kv-sender").start()

    def offer(self, room: int, payload: KVPayload) -> None:
        now = time.monotonic()
        with self.cond:
            for r in [r for r, (_, exp) in self.ready.items() if exp < now]:
                del self.ready[r]
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
                    entry = self.ready.pop(room, None)
                if entry is None:
                    send_frame(conn, {"error": f"room {room} was not prefilled on this server within "
                                               f"{self.timeout_s:.0f} s"})
                    return
                payload = entry[0]
                if ask.get("num_tokens") not in (None, payload.kv.shape[2]):
                    send_frame(conn, {"error": f"room {room} holds {payload.kv.shape[2]} tokens of KV, the decode "
                                               f"side expects {ask['num_tokens']}: the two servers tokenized the "
                                               f"request differently (same model and tokenizer?)"})
                    return
                start = time.perf_counter()
                send_frame(conn, payload_header(payload))
                data = payload_bytes(payload)
                for i in range(0, len(data), CHUNK):
                    conn.sendall(data[i:i + CHUNK])
                dt = time.perf_counter() - start
                logger.debug(f"PD: sent room {room}: {len(data) / 1e6:.1f} MB in {dt * 1e3:.1f} ms")
            except (OSError, TransferError, ValueError, KeyError, msgspec.DecodeError) as e:
                logger.warning(f"PD: a KV transfer to a decode server failed: {e}")

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
    """Fetches the KV of TP rank `engine_rank` into CPU memory, one thread per transfer; the scheduler writes it
    into its slots. The prefill server must have this server's `tp_size` (the bootstrap server checks): then its
    rank `engine_rank` holds exactly the KV heads this rank's pool holds."""

    def __init__(self, engine_rank: int, timeout_s: float, layout: tuple[int, int, int, torch.dtype],
                 tp_size: int = 1) -> None:
        self.engine_rank, self.timeout_s, self.layout, self.tp_size = engine_rank, timeout_s, layout, tp_size

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
        host, port = lookup(info.host, info.port, self.engine_rank, deadline, info.room, self.tp_size)
        sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        t.sock = sock
        with sock:
            send_frame(sock, {"room": info.room, "num_tokens": num_tokens, "engine_rank": self.engine_rank})
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            head = recv_frame(sock)
            start = time.perf_counter()
            if "error" in head:
                raise PeerGone(f"the prefill server refused the KV transfer: {head['error']}")
            layers, heads, dim, dtype = self.layout
            shape = [layers, 2, num_tokens, heads, dim]
            if head["shape"] != shape or head["dtype"] != str(dtype):
                raise PeerGone(f"the prefill server sends KV of shape {head['shape']} {head['dtype']}, this decode "
                               f"server holds {shape} {dtype}: serve the same model, dtype and --tp on both")
            kv = torch.empty(shape, dtype=DTYPES[head["dtype"]])
            view = memoryview(kv.view(torch.uint8).numpy()).cast("B")
            if len(view) != head["nbytes"]:
                raise PeerGone("the prefill server's KV size does not match its shape")
            for i in range(0, len(view), CHUNK):
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                recv_exact(sock, view[i:i + CHUNK], "the KV")
            t.nbytes, t.seconds = len(view), time.perf_counter() - start
            return KVPayload(kv, int(head["first_token"]), int(head["seed"]), int(head["cached_tokens"]),
                             head.get("logprob"), [tuple(e) for e in head.get("top_logprobs") or []] or None)
