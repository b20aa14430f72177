"""The bootstrap server of a prefill server, and the clients both sides reach it with.

It is a registry, as in SGLang: each prefill rank registers where its KV sender listens (`PUT /route` with its
dp_rank, engine_rank (TP rank), port and the server's tp_size and dp_size), and a decode rank asks
`GET /route?engine_rank=R&room=ROOM` before it connects: the answer is the sender of TP rank R in the DP replica
that prefilled the room (room % dp_size, the replica the prefill server routed the request to).
`GET /route?engine_rank=-1` answers the prefill server's {tp_size, dp_size}: a decode server of another --tp
plans from it which prefill ranks hold its KV heads (shards.py). It answers only once all tp_size x dp_size ranks
have registered (before: 503, naming the missing ranks, which the decode side retries until its deadline): the
ranks of a prefill server over several nodes register from each node as they come up, and a decode rank that
planned from a partial registry would look up a rank nobody has registered yet. A plain HTTP server in a daemon
thread: its traffic is one small request per rank at start-up and a few per transferred request and decode rank.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from radixserve.disaggregation.types import TransferTimeout

logger = logging.getLogger(__name__)
LOOKUP_RETRY_S = 0.2
REGISTER_TIMEOUT_S = 120.0  # a rank > 0 may register before TP rank 0 of DP replica 0 has its server up


class Registry:
    """Who registered, and the answers to lookups; the HTTP handler is a thin shell around it."""

    def __init__(self) -> None:
        self.routes: dict[tuple[int, int], dict] = {}  # (dp_rank, engine_rank) -> {host, port}
        self.tp_size: int | None = None
        self.dp_size: int | None = None
        self.lock = threading.Lock()

    def add(self, body: dict) -> tuple[int, dict]:
        tp, dp = int(body.get("tp_size", 1)), int(body.get("dp_size", 1))
        rank, dp_rank = int(body["engine_rank"]), int(body.get("dp_rank", 0))
        if not (0 <= rank < tp and 0 <= dp_rank < dp):
            return 400, {"error": f"rank {rank} of DP replica {dp_rank} is outside --tp {tp} --dp-size {dp}"}
        with self.lock:
            if self.tp_size is not None and (tp, dp) != (self.tp_size, self.dp_size):
                return 409, {"error": f"a prefill server with --tp {self.tp_size} --dp-size {self.dp_size} already "
                                      f"registered on this bootstrap port, and one with --tp {tp} --dp-size {dp} "
                                      f"tries to: give each prefill server its own --disaggregation-bootstrap-port"}
            self.tp_size, self.dp_size = tp, dp
            self.routes[(dp_rank, rank)] = {"host": body.get("host"), "port": int(body["port"]), "tp_size": tp}
        return 200, {"ok": True}

    def get(self, query: dict[str, list[str]]) -> tuple[int, dict]:
        try:
            rank = int(query.get("engine_rank", ["0"])[0])
            room = int(query["room"][0]) if "room" in query else None
            dp_group = int(query["target_dp_group"][0]) if "target_dp_group" in query else None
        except ValueError:
            return 400, {"error": "engine_rank, room and target_dp_group must be integers"}
        with self.lock:
            tp, dp = self.tp_size, self.dp_size
            if tp is None or dp is None:
                return 404, {"error": "no prefill rank has registered yet"}
            if rank == -1:
                missing = [f"TP rank {r} of DP replica {d}" for d in range(dp) for r in range(tp)
                           if (d, r) not in self.routes]
                if missing:
                    return 503, {"error": f"not ready: {tp * dp - len(missing)} of {tp * dp} prefill ranks have "
                                          f"registered (waiting for {', '.join(missing[:4])}"
                                          f"{', ...' if len(missing) > 4 else ''}); the prefill server is still "
                                          f"starting, or a node of it (--nnodes) is not up"}
                return 200, {"tp_size": tp, "dp_size": dp}
            if dp_group is None:
                dp_group = room % dp if room is not None else 0
            entry = self.routes.get((dp_group, rank))
        if entry is None:
            return 404, {"error": f"prefill rank {rank} of DP replica {dp_group} has not registered"}
        return 200, entry


class BootstrapServer:
    def __init__(self, host: str, port: int) -> None:
        self.registry = registry = Registry()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # no access log on stderr
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                url = urllib.parse.urlparse(self.path)
                if url.path == "/health":
                    self._answer(200, {"ok": True})
                elif url.path == "/route":
                    self._answer(*registry.get(urllib.parse.parse_qs(url.query)))
                else:
                    self._answer(404, {"error": f"no such path {url.path}"})

            def do_PUT(self) -> None:  # noqa: N802
                if urllib.parse.urlparse(self.path).path != "/route":
                    self._answer(404, {"error": "no such path"})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                    self._answer(*registry.add(body))
                except (ValueError, KeyError, TypeError) as e:
                    self._answer(400, {"error": f"bad registration: {e}"})

        try:
            self.http = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} for the PD bootstrap server ({e.strerror}); pick "
                          f"another --disaggregation-bootstrap-port") from None
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True, name="pd-bootstrap").start()
        logger.info(f"PD bootstrap server listening on {host}:{self.port}")

    @property
    def routes(self) -> dict[tuple[int, int], dict]:
        return self.registry.routes

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def register(host: str, port: int, engine_rank: int, sender_host: str | None, sender_port: int, *,
             tp_size: int = 1, dp_rank: int = 0, dp_size: int = 1, timeout_s: float = REGISTER_TIMEOUT_S) -> None:
    """Tell the bootstrap server at host:port where this prefill rank's KV sender listens. Retried while the
    server is not up yet (it runs in TP rank 0 of DP replica 0, which may start after this rank)."""
    body = json.dumps({"engine_rank": engine_rank, "dp_rank": dp_rank, "tp_size": tp_size, "dp_size": dp_size,
                       "host": sender_host, "port": sender_port}).encode()
    deadline = time.monotonic() + timeout_s
    while True:
        req = urllib.request.Request(f"http://{_netloc(host, port)}/route", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
            return
        except urllib.error.HTTPError as e:  # the server answered: retrying changes nothing
            raise ValueError(f"the PD bootstrap server at {host}:{port} refused prefill rank {engine_rank}: "
                             f"{_error_text(e)}") from None
        except OSError as e:
            if time.monotonic() + LOOKUP_RETRY_S >= deadline:
                raise OSError(f"prefill rank {engine_rank} could not register with the PD bootstrap server at "
                              f"{host}:{port} within {timeout_s:g} s ({e}); is node 0 of the prefill server up "
                              f"with a --host this node reaches (--host 0.0.0.0 on every node when it spans "
                              f"--nnodes), and no other program on --disaggregation-bootstrap-port {port}?") from None
        time.sleep(LOOKUP_RETRY_S)


def lookup(host: str, port: int, engine_rank: int, deadline: float, room: int | None = None) -> tuple[str, int]:
    """Where prefill rank `engine_rank` (of the DP replica that prefilled `room`) behind the bootstrap server
    host:port sends KV from; retried until `deadline` (time.monotonic) while the server is unreachable or the
    rank not registered yet."""
    entry = _get_route(host, port, {"engine_rank": engine_rank, **({"room": room} if room is not None else {})},
                       deadline, f"where prefill rank {engine_rank} is")
    return entry.get("host") or host, int(entry["port"])


def prefill_layout(host: str, port: int, deadline: float) -> tuple[int, int]:
    """The prefill server's (tp_size, dp_size), retried as lookup."""
    entry = _get_route(host, port, {"engine_rank": -1}, deadline, "the prefill server's --tp")
    return int(entry["tp_size"]), int(entry["dp_size"])


def _get_route(host: str, port: int, query: dict, deadline: float, what: str) -> dict:
    url = f"http://{_netloc(host, port)}/route?{urllib.parse.urlencode(query)}"
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {_error_text(e)}"
        except (OSError, ValueError, KeyError) as e:
            last = str(e)
        if time.monotonic() + LOOKUP_RETRY_S >= deadline:
            raise TransferTimeout(f"the PD bootstrap server at {host}:{port} did not tell {what} ({last}); is the "
                                  f"prefill server up with "
                                  f"--disaggregation-mode prefill --disaggregation-bootstrap-port {port}?")
        time.sleep(LOOKUP_RETRY_S)


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"HTTP {e.code}"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
