"""Interactive chat in the terminal: `python -m radixserve --shell`.

It drives an in-process Engine step by step (no server, no ZMQ): one user at a keyboard gains nothing
from the process split, and stepping the scheduler directly lets each token print as soon as it is
sampled. The history is re-sent whole each turn; the radix cache makes that cheap, since every turn's
prompt extends the previous one. Older turns are dropped when the history outgrows the context.
Decoding is greedy: answers are reproducible, and small models answer best without sampling noise
(Ctrl-C stops an answer that runs on).
"""
from __future__ import annotations

import signal
import sys
import time
from typing import TextIO

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.detokenizer import IncrementalDetokenizer
from radixserve.engine_unit import Engine
from radixserve.server.procs import setup_logging

PROMPT = ">>> "
MAX_NEW_TOKENS = 1024
MIN_ROOM = 16  # tokens an answer needs at least; below this, older turns are dropped
HELP = "/reset clears the history, /exit quits (or Ctrl-D); Ctrl-C stops an answer."


class Shell:
    def __init__(self, engine: Engine, out: TextIO = sys.stdout) -> None:
        self.engine, self.out = engine, out
        self.history: list[dict[str, str]] = []
        self.limit = min(engine.runner.context_len, engine.scheduler.allocator.capacity_tokens)

    def say(self, text: str, end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def handle(self, line: str) -> bool:
        """Process one input line; False means quit."""
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/reset":
            self.history.clear()
            self.say("[history cleared]")
        elif cmd.startswith("/"):
            self.say(f"[unknown command {cmd}; {HELP}]")
        elif cmd:
            self.answer(line)
        return True

    def _prompt_ids(self) -> list[int] | None:
        ids = self.engine.apply_chat_template(self.history)
        while len(ids) + MIN_ROOM > self.limit and len(self.history) > 2:
            del self.history[:2]  # the oldest user/assistant pair
            ids = self.engine.apply_chat_template(self.history)
            self.say("[older turns dropped to fit the context]")
        return ids if len(ids) + MIN_ROOM <= self.limit else None

    def answer(self, text: str) -> str:
        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        if ids is None:
            self.history.pop()
            self.say(f"[message too long: the context holds {self.limit} tokens]")
            return ""
        sp = SamplingParams(max_new_tokens=min(MAX_NEW_TOKENS, self.limit - len(ids)), temperature=0.0)
        req, sched = Req(ids, sp), self.engine.scheduler
        sched.add_request(req)
        detok, done, start = IncrementalDetokenizer(self.engine.tokenizer), 0, time.perf_counter()
        # Ctrl-C only raises a flag: a KeyboardInterrupt inside a forward pass would leave the scheduler's
        # bookkeeping half-updated, so the answer stops between two steps instead.
        stop = []
        previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
        try:
            while not req.finished and not stop:
                if req in sched.step():
                    new = req.output_ids[done:]
                    done = len(req.output_ids)
                    if req.ends_with_stop_token:
                        new = new[:-1]
                    self.say(detok.add(new, final=req.finished), end="")
        finally:
            signal.signal(signal.SIGINT, previous)
        if not req.finished:
            sched.abort(req.rid)
            self.say(" [stopped]", end="")
        reply = self.engine.output_text(req) if req.finish_reason and req.finish_reason.value != "abort" \
            else detok.text
        self.history.append({"role": "assistant", "content": reply})
        secs = time.perf_counter() - start
        n = len(req.output_ids)
        self.say(f"\n[{n} tokens, {n / max(secs, 1e-9):.1f} tok/s; prompt {len(ids)} tokens, "
                 f"context {len(ids) + n}/{self.limit}]")
        return reply

    def loop(self, stdin: TextIO = sys.stdin) -> None:
        interactive = stdin.isatty()
        if interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        self.say(f"radixserve shell · {self.engine.model_name} · {HELP}")
        while True:
            try:
                line = input(PROMPT) if interactive else self._read(stdin)
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("")
                continue
            if not self.handle(line):
                return

    def _read(self, stdin: TextIO) -> str:
        self.say(PROMPT, end="")
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")


def run_shell(args: ServerArgs) -> None:
    setup_logging(args.log_level)
    Shell(Engine(args)).loop()
