"""Shared fixtures: a real radixserve server (the bundled model) on a free loopback port.

`launch_server(*flags)` is a context manager any test module can use for its own configuration; the
session-scoped `server` fixture starts one server (default flags plus --enable-metrics, which changes no
answer) for every test file that needs one. Stopping
a server checks the shutdown contract too: SIGTERM ends it with code 0 and leaves no child behind.

`hf_gguf_model` is HF transformers' float32 model of the bundled GGUF, loaded once per session (the GGUF
dequantization in transformers takes ~30 s on two cores) for every file that compares against it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """All live descendants of `pid`, from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: str
    children: set[int] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server and wait for it; returns its exit code. Raises if it or a child lingers."""
        if self.proc.poll() is None:
            self.children = descendants(self.proc.pid)
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"server ignored signal {sig} for {STOP_TIMEOUT_S} s:\n{self.log()[-3000:]}") from None
        self.wait_children_gone()
        return code

    def wait_children_gone(self, timeout: float = STOP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while (left := {p for p in self.children if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"child processes {sorted(left)} outlived the server"


def wait_healthy(server: Server, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            code = server.proc.returncode
            raise RuntimeError(f"server exited with {code} during start-up:\n{server.log()[-5000:]}")
        try:
            with urllib.request.urlopen(server.base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{server.log()[-5000:]}")


def start_server(*flags: str) -> Server:
    """Start `python -m radixserve` without waiting for it (several can load at once)."""
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix=f"radixserve-{port}-", suffix=".log")
    cmd = [sys.executable, "-m", "radixserve", "--port", str(port), "--max-total-tokens", "16384",
           "--shutdown-grace-period", "5", *flags]
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, stdin=subprocess.DEVNULL)
    return Server(proc, port, log_path)


# Servers started ahead of need (`prestart`), by their flags: start-up is ~14 s of mostly one core, so a file
# starts every server it will need at once and each `launch_server`/`take_server` then picks its own up.
_PRESTARTED: dict[tuple[str, ...], list[Server]] = {}


def prestart(*flags: str) -> None:
    """Start a server with `flags` now, for a later `launch_server(*flags)` or `take_server(*flags)`."""
    _PRESTARTED.setdefault(flags, []).append(start_server(*flags))


def take_server(*flags: str) -> Server:
    """A prestarted server with exactly these flags (started now if there is none); not waited for."""
    pending = _PRESTARTED.get(flags)
    return pending.pop(0) if pending else start_server(*flags)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Prestarted servers nobody took (a test deselected or failed early) must not outlive the run."""
    for servers in _PRESTARTED.values():
        for s in servers:
            if s.proc.poll() is None:
                children = descendants(s.proc.pid)
                s.proc.kill()
                s.proc.wait()
                for p in children:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
    _PRESTARTED.clear()


@contextlib.contextmanager
def launch_server(*flags: str) -> Iterator[Server]:
    server = take_server(*flags)
    try:
        wait_healthy(server)
        yield server
    finally:
        if server.proc.poll() is None:
            code = server.stop()
            assert code == 0, f"server exited with {code} on SIGTERM:\n{server.log()[-3000:]}"


# --cpu-weight-dtype float16: the API tests compare answers across paths (a prompt's logprobs from a prefill with
# a sampled token's, cached with recomputed); float16 has the same numerics on all of them, while auto's 4-bit
# weights serve only batches of <= 4 rows (tests/test_cpu_int4.py holds that path against float32)
SESSION_FLAGS = ("--enable-metrics", "--cpu-weight-dtype", "float16")
_SESSION_SERVER: list[Server] = []


def prestart_session_server() -> None:
    """Let the session server below load now (beside a file's own), unless it runs or loads already."""
    if not _SESSION_SERVER and not _PRESTARTED.get(SESSION_FLAGS):
        prestart(*SESSION_FLAGS)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with launch_server(*SESSION_FLAGS) as s:
        _SESSION_SERVER.append(s)
        yield s


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def hf_gguf_model():
    """transformers' own load of the bundled GGUF (float32, eval mode). Shared: tests only read it."""
    import torch
    from transformers import AutoModelForCausalLM

    from radixserve.weights.loader import bundled_model_path
    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32, local_files_only=True).eval()
