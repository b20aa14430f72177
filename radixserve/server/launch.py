"""Server start-up and shutdown: three processes, one watchdog.

```
main process: API server (FastAPI/uvicorn) + TokenizerManager (tokenize, route outputs), watchdog
  ├─ scheduler process:   Engine (model runner + scheduler) driven by ZMQ  (scheduler_process.py)
  └─ detokenizer process: token ids → text deltas                          (detokenizer.py)
```
Tokenization is merged into the API server process (tokenizer_manager.py says why). Children are
`spawn`ed: a forked copy of a process that has imported torch or started threads is unsafe. The main
process checks --model and binds the HTTP port first, so those mistakes fail in milliseconds instead of
after loading the model, and prints `API server is ready to serve on HOST:PORT` only once the scheduler
has loaded the model (its memory line comes first) and uvicorn listens.

Shutdown: SIGTERM drains: /health and new requests answer 503 while the requests in flight get
--shutdown-grace-period seconds to finish; whatever is left then ends with an error (an error event and
`[DONE]` for a stream, a 503 otherwise). SIGINT (Ctrl-C), or a second signal, stops at once: every request
is aborted (open streams end with finish_reason "abort"). Then uvicorn stops (connections get
TIMEOUT_GRACEFUL_S), the output socket's reader is cancelled before any socket closes, and every child is
killed and reaped. A child that dies
on its own is seen at once (its process sentinel is an fd on the event loop): the server logs which one,
fails the pending requests and exits with code 1. Children in turn exit when the main process
disappears (procs.init_child).

Parallelism (distributed/bootstrap.py): `--tp N` runs one scheduler process per rank (`scheduler_tp1`, ...),
`--dp-size D` one group of them per replica (`scheduler_dp1_tp0`, ...), all watched the same way. With
`--nnodes K`, node 0 runs this and its share of the ranks; nodes k > 0 run only their ranks
(serve_follower_node) until rank 0 goes away.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

import uvicorn

# Only light modules here: the children are spawned before this process imports torch, fastapi or
# transformers (check_model and _serve import them), so their own imports start seconds earlier.
from radixserve.args import ServerArgs
from radixserve.distributed.layout import RankSpec, check_layout, describe, plan_ranks
from radixserve.saved_tokenizer import preload as preload_tokenizer_class
from radixserve.server.detokenizer import run_detokenizer
from radixserve.server.messages import Addresses
from radixserve.server.procs import setup_logging

logger = logging.getLogger("radixserve.server")
TIMEOUT_GRACEFUL_S = 2
DRAIN_POLL_S = 0.05
FLUSH_ERRORS_S = 2.0
CHILD_JOIN_S = 5.0


def _event_loop_factory():
    """uvloop's event loop where it is installed (as SGLang's server does): under 512 concurrent streams the
    API server's CPU per streamed token is mostly the event loop's and the HTTP protocol's (uvicorn picks
    httptools over h11 by itself when installed). None: asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class _Server(uvicorn.Server):
    """uvicorn would install its own signal handlers and re-raise the signal after shutting down, which
    kills the process before it can stop its children; launch handles signals itself."""

    def capture_signals(self) -> contextlib.AbstractContextManager:  # type: ignore[override]
        return contextlib.nullcontext()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def launch_server(args: ServerArgs) -> None:
    """Run the server until SIGINT/SIGTERM (exit code 0) or a child's death (exit code 1). Mistakes that
    can be seen before loading anything (a missing model, a port in use) fail at once."""
    setup_logging(args.log_level)
    if args.node_rank > 0:
        sys.exit(serve_follower_node(args))
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        logger.error(f"Cannot listen on {args.host}:{args.port}: {e.strerror}. Pick another --port.")
        sys.exit(1)
    addrs = Addresses(tempfile.mkdtemp(prefix="radixserve-"))
    ctx = mp.get_context("spawn")
    procs = {
        **scheduler_processes(args, addrs, ctx),
        "detokenizer": ctx.Process(target=run_detokenizer, args=(args.log_level, addrs, os.getpid()),
                                   name="radixserve-detokenizer"),
    }
    code = 1
    try:
        # The children start first: they spend seconds importing torch and transformers, while this
        # process checks the model. A model that fails the check stops them before they load anything.
        for p in procs.values():
            p.start()
        try:
            check_model(args)
        except (FileNotFoundError, ValueError) as e:
            logger.error(str(e))
            sys.exit(1)  # the finally below stops the children
        preload_tokenizer_class()  # while the scheduler loads
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            code = runner.run(_serve(args, addrs, procs, sock))
    finally:
        stop_children(procs)
        shutil.rmtree(addrs.run_dir, ignore_errors=True)
    sys.exit(code)


def run_scheduler(*args) -> None:
    """The scheduler child's entry point: scheduler_process (torch, the engine) is imported in the child."""
    from radixserve.server.scheduler_process import run_scheduler as run
    run(*args)


def check_model(args: ServerArgs) -> None:
    """The model exists, its architecture is supported, its tokenizer is there, --context-length fits it
    and, with TP/DP, it fits the rank layout (heads, GPUs): seconds, not after a load."""
    from radixserve.models.config import context_length
    from radixserve.weights.loader import check_tokenizer, load_config, resolve_hub_model
    src = resolve_hub_model(args)  # a hub id becomes its local snapshot here, once
    cfg = load_config(src)
    check_tokenizer(src, args.tokenizer_path)
    context_length(args, cfg)
    if args.tp_size > 1 or args.dp_size > 1:
        check_layout(args, cfg)


def process_name(args: ServerArgs, spec: RankSpec) -> str:
    """`scheduler` at tp=dp=1, else `scheduler_tp1`, `scheduler_dp1_tp0`, ... (/get_server_info's pids)."""
    return ("scheduler" + (f"_dp{spec.dp_rank}" if args.dp_size > 1 else "")
            + (f"_tp{spec.tp_rank}" if args.tp_size > 1 else ""))


def scheduler_processes(args: ServerArgs, addrs: Addresses | None, ctx: SpawnContext
                        ) -> dict[str, BaseProcess]:
    """This node's scheduler ranks, not started."""
    if args.tp_size > 1 or args.dp_size > 1:
        logger.info(describe(args))
    logger.info(f"server_args={args.loggable()}")  # SGLang's start-up line; the doctor reads it
    specs = plan_ranks(args)
    names = [process_name(args, s) for s in specs]
    return {name: ctx.Process(target=run_scheduler, args=(args, addrs, os.getpid(), s, len(specs)),
                              name="radixserve-" + name) for name, s in zip(names, specs)}


def serve_follower_node(args: ServerArgs) -> int:
    """Node k > 0 of a multi-node TP group: run this node's ranks (no HTTP server, no detokenizer) until
    SIGINT/SIGTERM or until node 0 stops (its ranks here see rank 0 go and exit 0): exit code 0; or until
    a rank fails: exit code 1."""
    try:
        check_model(args)
    except (FileNotFoundError, ValueError) as e:
        logger.error(str(e))
        return 1
    procs = scheduler_processes(args, None, mp.get_context("spawn"))
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stopping.append(s))
    code = 0
    try:
        for p in procs.values():
            p.start()
        while not stopping:
            done = wait([p.sentinel for p in procs.values()], timeout=0.5)
            gone = [(n, p) for n, p in procs.items() if p.sentinel in done]
            if gone:
                name, p = gone[0]
                p.join()
                if p.exitcode == 0:
                    logger.info("TP rank 0 on node 0 is gone; stopping this node")
                else:
                    logger.error(f"The {name} process (pid {p.pid}) died unexpectedly (exit code "
                                 f"{p.exitcode}); stopping this node")
                    code = 1
                break
        if stopping:
            logger.info(f"Received {signal.Signals(stopping[0]).name}; shutting down")
        time.sleep(0.2)  # let sibling ranks that saw rank 0 go log it and exit on their own
    finally:
        stop_children(procs)
    return code


def stop_children(procs: dict[str, BaseProcess]) -> None:
    """SIGKILL: the children hold nothing that needs flushing (the KV cache dies with the process), and a
    scheduler stuck in a long forward pass would not act on SIGTERM until it returns."""
    for p in procs.values():
        if p.pid is not None and p.exitcode is None:
            p.kill()
    for p in procs.values():
        if p.pid is not None:
            p.join(CHILD_JOIN_S)


async def _serve(args: ServerArgs, addrs: Addresses, procs: dict[str, BaseProcess],
                 sock: socket.socket) -> int:
    from radixserve.server.api import create_app
    from radixserve.server.tokenizer_manager import TokenizerManager
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    failures: list[str] = []
    tm = TokenizerManager(addrs, args.dp_size, args.load_balance_method, args.disaggregation_mode == "prefill")
    server: list[_Server] = []
    tasks: list[asyncio.Future] = []

    def shutdown() -> None:
        """Abort every request first, so open streams end with finish_reason "abort" and [DONE] instead of
        a dropped connection, then let uvicorn close."""
        if not stop.is_set() and not tm.dead:
            tm.abort()
        stop.set()
        for s in server:
            s.force_exit = s.should_exit  # a second Ctrl-C skips the graceful wait
            s.should_exit = True

    async def drain() -> None:
        """SIGTERM: refuse new work, let what runs finish within the grace period, then end the rest."""
        tm.draining = True
        deadline = loop.time() + args.shutdown_grace_period
        while tm.in_flight and loop.time() < deadline and not stop.is_set():
            await asyncio.sleep(DRAIN_POLL_S)
        if tm.in_flight and not stop.is_set():
            logger.warning(f"{tm.in_flight} requests still running after --shutdown-grace-period "
                           f"{args.shutdown_grace_period:g} s; ending them with an error")
            tm.fail_all("the server shut down before this request finished (--shutdown-grace-period "
                        f"{args.shutdown_grace_period:g} s)", 503, dead=False)
            flush_by = loop.time() + FLUSH_ERRORS_S  # let the handlers write their error events
            while tm.in_flight and loop.time() < flush_by:
                await asyncio.sleep(DRAIN_POLL_S)
        shutdown()

    def on_signal(sig: signal.Signals) -> None:
        if sig == signal.SIGTERM and not tm.draining and not stop.is_set() and server and server[0].started:
            logger.info(f"Received SIGTERM; shutting down: draining {tm.in_flight} requests for up to "
                        f"{args.shutdown_grace_period:g} s, refusing new ones")
            tasks.append(asyncio.ensure_future(drain()))
            return
        logger.info(f"Received {sig.name}; shutting down")
        shutdown()

    def on_child_exit(name: str, proc: BaseProcess) -> None:
        loop.remove_reader(proc.sentinel)
        proc.join(0.1)
        if stop.is_set():  # already shutting down: a signal to the process group reached the child too
            return
        msg = (f"The {name} process (pid {proc.pid}) died unexpectedly (exit code {proc.exitcode}); "
               f"shutting down the server")
        logger.error(msg)
        failures.append(msg)
        tm.fail_all(f"the {name} process died; the server is shutting down")
        shutdown()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    for name, p in procs.items():
        loop.add_reader(p.sentinel, on_child_exit, name, p)
    try:
        ready = asyncio.ensure_future(tm.wait_ready())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # a signal or a dead child came first
            ready.cancel()
            return 1 if failures else 0
        if ready.exception() is not None:
            logger.error(f"Start-up failed: {ready.exception()!r}")
            return 1
        recv = asyncio.ensure_future(tm.recv_loop())
        pids = {"api_server": os.getpid(), **{name: p.pid for name, p in procs.items()}}
        app = create_app(tm, args, pids)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=TIMEOUT_GRACEFUL_S)
        server.append(_Server(config))
        serving = asyncio.ensure_future(server[0].serve(sockets=[sock]))
        while not server[0].started and not serving.done():
            await asyncio.sleep(0.02)
        if server[0].started and not stop.is_set():
            logger.info(f"API server is ready to serve on {args.host}:{args.port}")
        await serving
        for t in (recv, stopped, *tasks):
            t.cancel()
        await asyncio.gather(recv, stopped, *tasks, return_exceptions=True)  # before any socket closes
        return 1 if failures else 0
    finally:
        for p in procs.values():
            if p.sentinel is not None:
                loop.remove_reader(p.sentinel)
        tm.close()
