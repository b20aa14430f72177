"""What a request carries for PD disaggregation: where its prefill server's bootstrap endpoint is, and its room."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:  # torch only for annotations: the API server and detokenizer import this, not torch
    import torch

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default


class BootstrapInfo(msgspec.Struct, frozen=True):
    """`room` pairs one request's prefill with its decode: the gateway draws it at random for each request and
    sends it to both servers; the decode server asks the prefill's bootstrap server at host:port for it."""
    host: str
    port: int
    room: int


class TransferError(RuntimeError):
    """The KV of a request did not arrive (timeout, the prefill side went away, a bad payload); the decode
    side fails the request with this message (HTTP `status`) and frees what it held."""
    status = 500


class TransferTimeout(TransferError):
    """Nothing (or not all) arrived before the deadline."""
    status = 504


class PeerGone(TransferError):
    """The other side closed the connection or answered with an error."""
    status = 502


@dataclass
class KVPayload:
    """One request's prompt KV and what the decode side needs to go on from it. `kv` is
    [layers, 2 (K, V), tokens, kv_heads, head_dim] in the pool's storage dtype, on the CPU."""
    kv: torch.Tensor
    first_token: int
    seed: int
    cached_tokens: int = 0
    logprob: float | None = None  # the first token's, when the request asked for logprobs
    top_logprobs: list[list[float]] | None = None  # [[token id, logprob], ...]
