"""Request, sampling parameters and batch: the state that flows through the scheduler.

A `Req` owns everything about one generation: its tokens, its row in `req_to_token`, how much of
its KV is cached or computed, and when it finished. Managers read and update it; nothing else
holds per-request state.
"""
from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for annotations: the API server and detokenizer import this, not torch
    import torch


@dataclass
class SamplingParams:
    """Per-request generation settings (SGLang/OpenAI semantics).

    temperature 0 means greedy. `seed` makes sampling reproducible whatever the batch: the noise
    for step i of a request depends only on (seed, i).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Prompt logprobs (SGLang's logprob_start_len): the logprob of every prompt token from this position on,
    # and its top_logprobs alternatives. -1: none (only the output's). The first entry has no logprob: it is
    # the token at this position, whose prediction would need the position before (see Req.input_logprobs).
    logprob_start_len: int = -1
    skip_special_tokens: bool = True
    no_stop_trim: bool = False  # keep a matched stop string / stop token in the text
    # (kind, text), kind json_schema | regex | ebnf | lark: constrained decoding (grammar/)
    grammar: tuple[str, str] | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field; the API turns it into HTTP 400."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.logprob_start_len < -1:
            raise ValueError(f"logprob_start_len must be -1 (output logprobs only) or >= 0, "
                             f"got {self.logprob_start_len}")
        if self.grammar is not None and self.grammar[0] not in ("json_schema", "regex", "ebnf", "lark"):
            raise ValueError(f"grammar kind must be json_schema, regex, ebnf or lark, got {self.grammar[0]!r}")
        for tok, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100 or tok < 0:  # NaN fails the comparison too
                raise ValueError(f"logit_bias must map token ids to values in [-100, 100], got {tok}: {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_rid_counter = itertools.count()


@dataclass(eq=False)
class Req:
    """One request inside the scheduler.

    Token layout: `fill_ids = origin_input_ids + output_ids`. The first `cached_len` positions are
    covered by a prefix-cache hit (`prefix_indices`), the first `kv_len` positions have KV in the
    pool. A retracted request keeps its tokens and re-prefills them, so its output is unchanged.
    """

    origin_input_ids: list[int]
    sampling_params: SamplingParams
    rid: str = ""
    eos_token_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    seed: int = 0
    arrival: int = field(default_factory=lambda: next(_rid_counter))
    # KV bookkeeping
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor | None = None  # slots of the cached prefix (radix hit)
    last_node: object = None  # radix node locked while the request runs
    cached_len: int = 0  # positions covered by this admission's prefix match (locked under last_node)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission (reported)
    kv_len: int = 0  # positions whose KV is in the pool (or being computed by a launched step)
    slots: list[int] = field(default_factory=list)  # CPU copy of this request's req_to_token row
    extend_len: int = 0  # tokens computed in the current prefill step
    # output
    finish_reason: FinishReason | None = None
    detok: object = None  # IncrementalDetokenizer, only for requests with stop strings
    stop_text_len: int | None = None  # where a matched stop string starts in the decoded text
    grammar: object = None  # grammar Matcher of a constrained request (grammar/backend.py)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Prompt logprobs (sampling_params.logprob_start_len = s >= 0): input_logprobs[j] is the logprob of prompt
    # token s + 1 + j given the tokens before it, computed at position s + j, gathered over the prefill chunks.
    # logprob_pos: the next prompt position to compute, advanced when a step is launched (its results arrive
    # later under overlap scheduling); the prefix cache match is capped there so those positions are computed.
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    logprob_pos: int = 0
    retracted: int = 0
    bootstrap: object = None  # PD disaggregation: BootstrapInfo (room, prefill's bootstrap address)
    hops: list[float] | None = None  # --enable-request-time-stats-logging: scheduler stamps (request_timing)

    def __post_init__(self) -> None:
        if not self.rid:
            self.rid = f"req-{self.arrival}"

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ends_with_stop_token(self) -> bool:
        """Stopped by a stop token id or EOS: that token is counted but not part of the text."""
        ids, sp = self.output_ids, self.sampling_params
        return (self.finish_reason == FinishReason.STOP and self.stop_text_len is None and bool(ids)
                and (ids[-1] in sp.stop_token_ids or ids[-1] in self.eos_token_ids))

    @property
    def decode_step(self) -> int:
        """Index of the output token being sampled now. Derived from the KV length, which the
        scheduler advances when it launches a step, so it is right even while the previous token
        is still in flight (overlap scheduling); falls back to the output count outside a step."""
        return max(self.kv_len - len(self.origin_input_ids), len(self.output_ids))

    @property
    def prompt_logprobs_left(self) -> int:
        """Prompt positions whose logprobs are still to compute (0 for a request that asked for none)."""
        if self.sampling_params.logprob_start_len < 0:
            return 0
        return max(len(self.origin_input_ids) - 1 - self.logprob_pos, 0)

    @property
    def input_logprobs_done(self) -> bool:
        """Every prompt logprob the request asked for is computed and gathered."""
        s = self.sampling_params.logprob_start_len
        return s >= 0 and len(self.input_logprobs) == max(len(self.origin_input_ids) - 1 - s, 0)

    @property
    def remaining_new_tokens(self) -> int:
        return max(self.sampling_params.max_new_tokens - len(self.output_ids), 0)
