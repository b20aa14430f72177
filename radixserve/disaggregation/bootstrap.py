"""The bootstrap server of a prefill server, and the client the decode side asks it with.

It is a registry, as in SGLang: each prefill rank registers where its KV sender listens (`PUT /route` with
engine_rank and port), and a decode rank asks `GET /route?engine_rank=R` before it connects. A plain HTTP server
in a daemon thread: its traffic is one small request per rank at start-up and one per transferred request.
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


class BootstrapServer:
    def __init__(self, host: str, port: int) -> None:
        self.routes: dict[int, dict] = {}
        routes = self.routes

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
                    return
                if url.path != "/route":
                    self._answer(404, {"error": f"no such path {url.path}"})
                    return
                q = urllib.parse.parse_qs(url.query)
                try:
                    rank = int(q.get("engine_rank", ["0"])[0])
                except ValueError:
                    self._answer(400, {"error": "engine_rank must be an integer"})
                    return
                entry = routes.get(rank)
                if entry is None:
                    self._answer(404, {"error": f"prefill rank {rank} has not registered"})
                else:
                    self._answer(200, entry)

            def do_PUT(self) -> None:  # noqa: N802
                if urllib.parse.urlparse(self.path).path != "/route":
                    self._answer(404, {"error": "no such path"})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                    routes[int(body["engine_rank"])] = {"host": body.get("host"), "port": int(body["port"])}
                except (ValueError, KeyError, TypeError) as e:
                    self._answer(400, {"error": f"bad registration: {e}"})
                    return
                self._answer(200, {"ok": True})

        try:
            self.http = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} for the PD bootstrap server ({e.strerror}); pick "
                          f"another --disaggregation-bootstrap-port") from None
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True, name="pd-bootstrap").start()
        logger.info(f"PD bootstrap server listening on {host}:{self.port}")

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def register(host: str, port: int, engine_rank: int, sender_host: str | None, sender_port: int) -> None:
    """Tell the bootstrap server at host:port where this prefill rank's KV sender listens."""
    body = json.dumps({"engine_rank": engine_rank, "host": sender_host, "port": sender_port}).encode()
    req = urllib.request.Request(f"http://{_netloc(host, port)}/route", data=body, method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def lookup(host: str, port: int, engine_rank: int, deadline: float) -> tuple[str, int]:
    """Where prefill rank `engine_rank` behind the bootstrap server host:port sends KV from; retried until
    `deadline` (time.monotonic) while the server is unreachable or the rank not registered yet."""
    url = f"http://{_netloc(host, port)}/route?engine_rank={engine_rank}"
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as r:
                entry = json.loads(r.read())
            return entry.get("host") or host, int(entry["port"])
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, ValueError, KeyError) as e:
            last = str(e)
        if time.monotonic() + LOOKUP_RETRY_S >= deadline:
            raise TransferTimeout(f"the PD bootstrap server at {host}:{port} did not tell where prefill rank "
                                f"{engine_rank} is ({last}); is the prefill server up with "
                                f"--disaggregation-mode prefill --disaggregation-bootstrap-port {port}?")
        time.sleep(LOOKUP_RETRY_S)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
