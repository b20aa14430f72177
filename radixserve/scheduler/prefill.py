"""PrefillAdder: decides which waiting requests join the next prefill batch (SGLang's budgets).

Three budgets bound a batch: the token pool (free + evictable slots, minus what running requests
are expected to still generate: `new_token_ratio × remaining max_new_tokens`), the batch's input
tokens (`--max-prefill-tokens`), and the chunk (`--chunked-prefill-size`). A prompt longer than the
chunk budget is cut; its remainder runs in the following steps before anything new.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from radixserve.core import Req

CLIP_MAX_NEW_TOKENS = 4096  # a huge max_new_tokens should not block admission forever


def reserved_tokens(req: Req, ratio: float) -> float:
    return min(req.remaining_new_tokens, CLIP_MAX_NEW_TOKENS) * ratio


@dataclass
class PrefillAdder:
    rem_total: float
    rem_input: int
    rem_chunk: int
    page_size: int
    slots_left: int  # request rows (max_running_requests) still free
    # The share of a new request's max_new_tokens counted against the pool at admission. SGLang's rule,
    # and every fixed --schedule-conservativeness: 1.0, so a request is admitted only where it could run to
    # its limit. `auto` passes the running requests' new_token_ratio (see Scheduler._admission_ratio).
    new_req_ratio: float = 1.0
    admitted: list[Req] = field(default_factory=list)
    chunked: Req | None = None

    def add(self, req: Req, prefix_len: int, locked: int = 0) -> bool:
        """Try to admit `req` whose first `prefix_len` tokens are cached; `locked` of them were evictable
        (counted in rem_total) until the request locked them. Sets req.extend_len.
        Returns False when the batch is full (stop trying further requests)."""
        if self.slots_left <= 0 or self.rem_chunk <= 0 or self.chunked is not None:
            return False
        extend = req.seqlen - prefix_len
        future = min(req.remaining_new_tokens, CLIP_MAX_NEW_TOKENS) * self.new_req_ratio
        if extend + future + locked > self.rem_total:
            return False
        if extend > self.rem_input and self.admitted:
            return False
        if extend > self.rem_chunk:  # cut at a page boundary so the next chunk starts on a fresh page
            cut = (prefix_len + self.rem_chunk) // self.page_size * self.page_size - prefix_len
            if cut <= 0:
                return False
            extend, self.chunked = cut, req
        req.extend_len = extend
        self.admitted.append(req)
        self.slots_left -= 1
        self.rem_total -= extend + future + locked
        self.rem_input -= extend
        self.rem_chunk -= extend
        return True
