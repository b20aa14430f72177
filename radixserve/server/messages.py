"""Typed messages between the server's processes: msgspec structs, msgpack-encoded on ZMQ PUSH/PULL.

```
API server ──GenerateReq / AbortReq / FlushCacheReq / GetInfoReq──▶ scheduler (TP rank 0 of a DP replica)
scheduler  ──DetokInit, BatchTokenOut──▶ detokenizer ──BatchStrOut──▶ API server
scheduler  ──Ready, ReqError, FlushCacheOut, InfoOut──▶ API server
```
Every receiver binds one PULL socket and decodes a tagged union, so a message can never be read as the
wrong type. Per-token messages are batched per scheduler step and carry only what is new.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import msgspec

from radixserve.core import SamplingParams
from radixserve.disaggregation.types import BootstrapInfo


# ---- API server → scheduler -------------------------------------------------------------------------
class GenerateReq(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    bootstrap: BootstrapInfo | None = None  # PD disaggregation: where this request's KV comes from / goes to


class AbortReq(msgspec.Struct, tag=True):
    rid: str


class FlushCacheReq(msgspec.Struct, tag=True):
    req_id: int


class GetInfoReq(msgspec.Struct, tag=True):
    req_id: int


# ---- scheduler → API server -------------------------------------------------------------------------
class Ready(msgspec.Struct, tag=True):
    """Sent once the model is loaded. The tokenizer is saved to `tokenizer_dir` so the other processes
    read a tokenizer.json in a fraction of a second instead of each rebuilding it from the GGUF file."""
    tokenizer_dir: str
    model_name: str
    info: dict[str, Any]  # memory plan: max_total_num_tokens, context_len, vocab_size, ...
    dp_rank: int = 0  # with --dp-size N, the API server waits for one Ready from each replica


class ReqError(msgspec.Struct, tag=True):
    """The scheduler refused a request (Scheduler.validate; status 400), or failed it later (a PD transfer that
    never completed: 5xx); nothing it held stays allocated."""
    rid: str
    message: str
    status: int = 400


class FlushCacheOut(msgspec.Struct, tag=True):
    req_id: int
    success: bool
    message: str


class InfoOut(msgspec.Struct, tag=True):
    req_id: int
    info: dict[str, Any]


# ---- scheduler → detokenizer → API server -----------------------------------------------------------
class DetokInit(msgspec.Struct, tag=True):
    tokenizer_dir: str


class TokenOut(msgspec.Struct):
    """What one scheduler step produced for one request: the new token ids and, at the end, why it
    finished. `drop_last`: the last id is a stop token / EOS and is not part of the text (the rule of
    Engine.output_text); `stop_text_len`: a stop string starts at this character of the text."""
    rid: str
    new_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    drop_last: bool = False
    stop_text_len: int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # prompt logprobs (Req.input_logprobs, logprob_start_len >= 0), with the request's first output only
    input_logprobs: list[float] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    stop: list[str] = []  # sent with a request's first output only: the detokenizer holds back
    skip_special_tokens: bool = True  # text that could be the start of a stop string
    # --enable-request-time-stats-logging: perf_counter stamps (request_timing.py); each hop appends its own
    hops: list[float] | None = None
    no_stop_trim: bool = False  # (first output only) nothing is cut or held back


class BatchTokenOut(msgspec.Struct, tag=True):
    outs: list[TokenOut]


class StrOut(msgspec.Struct):
    rid: str
    text: str  # new text since the previous StrOut of this request
    new_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    matched: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    hops: list[float] | None = None  # TokenOut.hops + the detokenizer's send time
    input_logprobs: list[float] | None = None  # TokenOut's, passed through
    input_top_logprobs: list[list[tuple[int, float]]] | None = None


class BatchStrOut(msgspec.Struct, tag=True):
    outs: list[StrOut]


SchedulerIn = GenerateReq | AbortReq | FlushCacheReq | GetInfoReq
DetokenizerIn = DetokInit | BatchTokenOut
ApiIn = Ready | ReqError | FlushCacheOut | InfoOut | BatchStrOut

encode = msgspec.msgpack.Encoder().encode


def decoder(union: Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(union)


@dataclass(frozen=True)
class Addresses:
    """IPC endpoints of one server instance, inside its private run directory."""
    run_dir: str

    def _ipc(self, name: str) -> str:
        return "ipc://" + os.path.join(self.run_dir, name)

    @property
    def scheduler(self) -> str:
        return self.scheduler_of(0)

    def scheduler_of(self, dp_rank: int) -> str:
        """Rank 0 of DP replica `dp_rank` (only TP rank 0 of a replica has a socket; it broadcasts the rest)."""
        return self._ipc("scheduler" if dp_rank == 0 else f"scheduler_dp{dp_rank}")

    @property
    def detokenizer(self) -> str:
        return self._ipc("detokenizer")

    @property
    def api(self) -> str:
        return self._ipc("api")
