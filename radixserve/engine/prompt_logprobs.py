"""Prompt (input) logprobs: the log_softmax of the model at prompt positions, for the requests that ask.

A prefill step computes logits only at each request's last position (what sampling needs). A request with
`logprob_start_len = s >= 0` also wants, at every prompt position p in [s, L - 1), the logprob of token p + 1
(and its top-k): SGLang's input_token_logprobs, OpenAI's echo with logprobs. Those positions may span several
prefill chunks, so each step takes the part of [logprob_pos, L - 1) that its chunk computes and the scheduler
appends the values to the request in order. Only those rows go through the LM head, in slices of
ROWS_PER_SLICE, so a batch where nobody asks pays nothing and a long prompt never materialises [L, vocab].

The values describe the raw model distribution, as the sampler's output logprobs do (no penalties, bias or
grammar): the log_softmax of the logits.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from radixserve.core import Req
from radixserve.transfer import int64_tensor, to_device

ROWS_PER_SLICE = 512  # [512, vocab] float32 logits at a time: 256 MB for a 128k vocabulary


@dataclass
class PromptLogprobPlan:
    """What one extend step computes: `rows` index the step's flattened tokens (ForwardBatch.input_ids),
    `targets` are the next prompt tokens whose logprobs are read there; `counts[i]` of them belong to reqs[i].
    The runner fills the three result tensors (on the device; `to_host` starts their copy)."""

    reqs: list[Req]
    counts: list[int]
    rows: torch.Tensor
    targets: torch.Tensor
    top_k: int
    logprobs: torch.Tensor | None = None  # [P] float32
    top_values: torch.Tensor | None = None  # [P, top_k] float32
    top_ids: torch.Tensor | None = None  # [P, top_k] int64
    copied: torch.cuda.Event | None = None

    def to_host(self) -> None:
        """Start copying the results to the CPU without waiting for the device (overlap scheduling)."""
        if self.logprobs is None or self.logprobs.device.type == "cpu":
            return
        self.logprobs, self.top_values, self.top_ids = (
            t.to("cpu", non_blocking=True) if t is not None else None
            for t in (self.logprobs, self.top_values, self.top_ids))
        self.copied = torch.cuda.Event()
        self.copied.record()

    def deliver(self) -> None:
        """Append each request's values (in position order: steps are processed in launch order)."""
        if self.copied is not None:
            self.copied.synchronize()
        lps = self.logprobs.tolist()
        vals = self.top_values.tolist() if self.top_values is not None else None
        ids = self.top_ids.tolist() if self.top_ids is not None else None
        at = 0
        for req, n in zip(self.reqs, self.counts):
            if not req.finished:
                req.input_logprobs += lps[at:at + n]
                k = req.sampling_params.top_logprobs
                if k > 0 and vals is not None:
                    req.input_top_logprobs += [list(zip(ids[j][:k], vals[j][:k])) for j in range(at, at + n)]
            at += n


def plan_step(reqs: list[Req]) -> PromptLogprobPlan | None:
    """The prompt positions this extend step computes for requests that want them, or None (the common case:
    nobody asks, nothing is built). `reqs` are the step's extend requests, in batch order, each computing
    `extend_len` tokens from `kv_len`; their `logprob_pos` moves past the planned positions."""
    if not any(r.prompt_logprobs_left for r in reqs):
        return None
    owners, counts, rows, targets, offset, top_k = [], [], [], [], 0, 0
    for r in reqs:
        lo = r.logprob_pos
        hi = min(len(r.origin_input_ids) - 1, r.kv_len + r.extend_len)
        if r.prompt_logprobs_left and hi > lo:
            assert lo >= r.kv_len, f"{r.rid}: prompt position {lo} would be skipped (the chunk starts at {r.kv_len})"
            owners.append(r)
            counts.append(hi - lo)
            rows.extend(range(offset + lo - r.kv_len, offset + hi - r.kv_len))
            targets.extend(r.origin_input_ids[lo + 1:hi + 1])
            top_k = max(top_k, r.sampling_params.top_logprobs)
            r.logprob_pos = hi
        offset += r.extend_len
    if not owners:
        return None
    return PromptLogprobPlan(owners, counts, int64_tensor(rows), int64_tensor(targets), top_k)


def compute_prompt_logprobs(plan: PromptLogprobPlan, hidden: torch.Tensor,
                            logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Fill `plan`'s results from the step's final hidden states [T, hidden]; `logits` is the model's LM head
    (float32 over the full vocabulary; under TP every rank runs it on the same rows, so its all-gathers pair)."""
    dev = hidden.device
    rows, targets = to_device(torch.stack([plan.rows, plan.targets]), dev)
    n = rows.numel()
    plan.logprobs = torch.empty(n, dtype=torch.float32, device=dev)
    if plan.top_k:
        plan.top_values = torch.empty(n, plan.top_k, dtype=torch.float32, device=dev)
        plan.top_ids = torch.empty(n, plan.top_k, dtype=torch.int64, device=dev)
    for a in range(0, n, ROWS_PER_SLICE):
        b = min(a + ROWS_PER_SLICE, n)
        x = logits(hidden[rows[a:b]]).float()
        lse = torch.logsumexp(x, dim=-1)
        plan.logprobs[a:b] = x.gather(1, targets[a:b, None]).squeeze(1) - lse
        if plan.top_k:
            vals, ids = x.topk(plan.top_k, dim=-1)
            plan.top_values[a:b] = vals - lse[:, None]
            plan.top_ids[a:b] = ids
