"""What every server process shares: the log format, ZMQ sockets, and dying with the parent."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import zmq

SIGTERM_GRACE_S = 1.0
LOG_FORMAT = "[%(asctime)s%(tag)s] %(message)s"


def setup_logging(level: str = "info", tag: str = "") -> None:
    """SGLang's `[2025-01-01 12:00:00] message` lines on stderr; `tag` names the process (` TP0`, ` DETOK`)
    so interleaved output from several processes stays readable."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_TagFilter(tag))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _TagFilter(logging.Filter):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.tag = self.tag
        return True


def init_child(log_level: str, tag: str, parent_pid: int) -> None:
    """Start-up of a spawned child.

    Ctrl-C, or a SIGTERM sent to the whole process group (`timeout`, systemd), reaches every process at
    once, but only the parent should act on it: it stops the children itself. So a child ignores
    SIGINT and, on SIGTERM, waits a moment before exiting, long enough for a parent that got the same
    signal to be shutting down already (and kill it), while a SIGTERM aimed at this child alone still
    ends it and the parent reports the dead child. A child never outlives its parent, even one killed by
    SIGKILL: a thread polls the parent pid (model loading blocks the main thread for tens of seconds,
    so the check cannot live in the child's main loop).

    tqdm's default lock is a multiprocessing semaphore registered with the parent's resource tracker,
    which warns about a leak when the child is killed at shutdown; a thread lock is all a child needs."""
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_soon)
    setup_logging(log_level, tag)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()


def _exit_soon(signum: int, frame: object) -> None:
    threading.Timer(SIGTERM_GRACE_S, os._exit, (128 + signum,)).start()


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def push(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return sock


def pull(ctx: zmq.Context, addr: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    return sock
