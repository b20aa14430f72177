"""`python -m radixserve --shell` driven through a pseudo-terminal, as a person would use it."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

from conftest import ROOT

PROMPT = b">>> "
TIMEOUT_S = 240.0


class Terminal:
    def __init__(self, *flags: str) -> None:
        master, slave = pty.openpty()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([sys.executable, "-m", "radixserve", "--shell", *flags], stdin=slave,
                                     stdout=slave, stderr=self.log, cwd=ROOT, close_fds=True)
        os.close(slave)
        self.fd, self.buf = master, b""

    def read_until(self, token: bytes, timeout: float = TIMEOUT_S) -> str:
        """Everything up to and including `token`, consumed from the terminal."""
        deadline = time.monotonic() + timeout
        while token not in self.buf:
            if time.monotonic() > deadline or self.proc.poll() is not None and not self._pending():
                self.log.seek(0)
                err = self.log.read()[-3000:]
                raise AssertionError(f"no {token!r} in {self.buf[-2000:]!r}\nstderr: {err!r}")
            if self._pending(0.2):
                try:
                    self.buf += os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    pass
        i = self.buf.index(token) + len(token)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out.decode(errors="replace")

    def _pending(self, wait: float = 0.0) -> bool:
        return bool(select.select([self.fd], [], [], wait)[0])

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def ask(self, line: str) -> tuple[str, int]:
        """Send a message; return the answer text and the prompt length the shell reports."""
        self.send(line)
        out = self.read_until(PROMPT)
        m = re.search(r"\[(\d+) tokens, [\d.]+ tok/s; prompt (\d+) tokens, context \d+/\d+\]", out)
        assert m, out
        answer = out[out.index(line) + len(line):m.start()].strip()
        return answer, int(m.group(2))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)
        self.log.close()


def test_shell_chat_reset_exit() -> None:
    term = Terminal("--context-length", "256", "--max-total-tokens", "4096")
    try:
        banner = term.read_until(PROMPT)
        assert "radixserve shell" in banner and "/reset" in banner
        answer, first_prompt = term.ask("What is the capital of France?")
        assert "Paris" in answer
        _, second_prompt = term.ask("And of Italy?")
        assert second_prompt > first_prompt + 5  # the first exchange is part of the second prompt
        term.send("/reset")
        assert "[history cleared]" in term.read_until(PROMPT)
        _, after_reset = term.ask("What is the capital of France?")
        assert after_reset == first_prompt
        term.send("Write a long story about a dragon.")
        term.read_until(b"dragon.\r\n")  # the terminal's echo of the line
        term.read_until(b" ")  # the answer has started streaming
        term.proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert "[stopped]" in term.read_until(PROMPT)
        term.send("/exit")
        assert term.proc.wait(30) == 0
    finally:
        term.close()
