"""The detokenizer process: token ids in, text deltas out, one IncrementalDetokenizer per request.

It runs apart from the scheduler so that decoding text for hundreds of streams never delays a forward
pass, and apart from the API server so that the event loop only moves finished strings.

Streamed and non-streamed text are the same string by construction: the API server builds both from
these deltas. Two rules make that string equal to Engine.output_text: a final stop token / EOS is not
decoded (`drop_last`), and text that could still turn out to be the start of a stop string is held
back until it cannot, so nothing past the scheduler's stop-string cut is ever sent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq

from radixserve.detokenizer import IncrementalDetokenizer
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
                st = self.states[o.rid] = _State(detok, o.stop)
            finished = o.finish_reason is not None
            st.detok.add(o.new_ids[:-1] if o.drop_last else o.new_ids, final=finished)
            text, matched = st.detok.text, None
            if not finished:
                end = len(text) - stop_holdback(text, st.stops)
            elif o.stop_text_len is not None:
                end = o.stop_text_len
                matched = next((s for s in st.stops if text.startswith(s, end)), None)
            else:
                end = len(text)
                matched = o.new_ids[-1] if o.drop_last else None
            delta = text[st.sent:end] if end > st.sent else ""
            st.sent = max(st.sent, end)
            if finished:
                del self.states[o.rid]
            outs.append(m.StrOut(o.rid, delta, o.new_ids, o.prompt_tokens, o.cached_tokens,
                                 o.completion_tokens, o.finish_reason, matched, o.logprobs, o.top_logprobs))
        return m.BatchStrOut(outs)


def run_detokenizer(log_level: str, addrs: m.Addresses, parent_pid: int) -> None:
    """Process entry point: waits for DetokInit (the scheduler saves the tokenizer once it is loaded),
    then translates BatchTokenOut into BatchStrOut forever."""
    init_child(log_level, " DETOK", parent_pid)
    try:
        from transformers import AutoTokenizer
        ctx = zmq.Context()
        recv, to_api = pull(ctx, addrs.detokenizer), push(ctx, addrs.api)
        decode = m.decoder(m.DetokenizerIn).decode
        detok: Detokenizer | None = None
        while True:
            msg = decode(recv.recv())
            if isinstance(msg, m.DetokInit):  # one per DP replica, each before its outputs; the same tokenizer
                detok = detok or Detokenizer(AutoTokenizer.from_pretrained(msg.tokenizer_dir))
            elif detok is not None:
                to_api.send(m.encode(detok.process(msg)))
    except Exception:
        logger.exception("Detokenizer hit an exception")
        raise SystemExit(1) from None
