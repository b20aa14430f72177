"""The detokenizer process: token ids in, text deltas out, one IncrementalDetokenizer per request.

It runs apart from the scheduler so that decoding text for hundreds of streams never delays a forward
pass, and apart from the API server so that the event loop only moves finished strings.

Streamed and non-streamed text are the same string by construction: the API server builds both from
these deltas. Two rules make that string equal to Engine.output_text: a final stop token / EOS is not
decoded (`drop_last`), and text that could still turn out to be the start of a stop string is held
back until it cannot, so nothing past the scheduler's stop-string cut is ever sent.

Every TokenOut becomes one StrOut, even when its text is held back (an incomplete UTF-8 character, a
possible stop-string prefix, a token the tokenizer decodes to nothing): the API server sends one SSE
chunk per output, so a stream's chunks keep the scheduler's token cadence (--stream-interval sets how
many tokens an output holds). When this process falls behind, the scheduler's messages queued meanwhile
are translated together and sent as one message: fewer wake-ups of the API server's event loop, and still
one StrOut per scheduler output.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import zmq

from radixserve.detokenizer import IncrementalDetokenizer
from radixserve.saved_tokenizer import load_saved_tokenizer, preload
from radixserve.server import messages as m
from radixserve.server.procs import init_child, pull, push

logger = logging.getLogger(__name__)


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class _State:
    detok: IncrementalDetokenizer
    stops: list[str]
    sent: int = 0  # characters of detok.text already forwarded
    no_stop_trim: bool = False  # the text keeps the matched stop (string or token): nothing to hold back or cut


class Detokenizer:
    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _State] = {}

    def process(self, batch: m.BatchTokenOut) -> m.BatchStrOut:
        outs = []
        for o in batch.outs:
            st = self.states.get(o.rid)
            if st is None:
                detok = IncrementalDetokenizer(self.tokenizer, o.skip_special_tokens)
                st = self.states[o.rid] = _State(detok, o.stop, no_stop_trim=o.no_stop_trim)
            finished, trim = o.finish_reason is not None, not st.no_stop_trim
            st.detok.add(o.new_ids[:-1] if o.drop_last and trim else o.new_ids, final=finished)
            text, matched = st.detok.text, None
            if not finished:
                end = len(text) - (stop_holdback(text, st.stops) if trim else 0)
            elif o.stop_text_len is not None:
                matched = next((s for s in st.stops if text.startswith(s, o.stop_text_len)), None)
                end = o.stop_text_len if trim else len(text)
            else:
                end = len(text)
                matched = o.new_ids[-1] if o.drop_last else None
            delta = text[st.sent:end] if end > st.sent else ""
            st.sent = max(st.sent, end)
            if finished:
                del self.states[o.rid]
            hops = o.hops + [time.perf_counter()] if o.hops is not None else None
            outs.append(m.StrOut(o.rid, delta, o.new_ids, o.prompt_tokens, o.cached_tokens,
                                 o.completion_tokens, o.finish_reason, matched, o.logprobs, o.top_logprobs, hops,
                                 o.input_logprobs, o.input_top_logprobs))
        return m.BatchStrOut(outs)


def receive_all(sock: zmq.Socket) -> list[bytes]:
    """The next message (blocking), then whatever else is already queued, in order."""
    frames = [sock.recv()]
    while True:
        try:
            frames.append(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            return frames


def run_detokenizer(log_level: str, addrs: m.Addresses, parent_pid: int) -> None:
    """Process entry point: waits for DetokInit (the scheduler saves the tokenizer once it is loaded),
    then translates BatchTokenOut into BatchStrOut forever."""
    init_child(log_level, " DETOK", parent_pid)
    try:
        preload()  # the tokenizer class, while the scheduler loads
        ctx = zmq.Context()
        recv, to_api = pull(ctx, addrs.detokenizer), push(ctx, addrs.api)
        decode = m.decoder(m.DetokenizerIn).decode
        detok: Detokenizer | None = None
        while True:
            outs: list[m.StrOut] = []
            for raw in receive_all(recv):
                msg = decode(raw)
                if isinstance(msg, m.DetokInit):  # one per DP replica, each before its outputs; the same tokenizer
                    detok = detok or Detokenizer(load_saved_tokenizer(msg.tokenizer_dir, decode_only=True))
                elif detok is not None:
                    outs += detok.process(msg).outs
            if outs:
                to_api.send(m.encode(m.BatchStrOut(outs)))
    except Exception:
        logger.exception("Detokenizer hit an exception")
        raise SystemExit(1) from None
