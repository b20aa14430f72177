"""Batched token sampler: penalties, greedy / temperature / top-k / top-p / min-p, logprobs.

Noise comes from a counter-based hash of (seed, step, token id), not from a torch.Generator: a shared
generator hands each row whatever stream position its neighbours left, so a request's tokens would
depend on the batch it happened to land in. With E_t ~ Exp(1) i.i.d., argmax_t p_t / E_t is distributed
exactly as Categorical(p) (the exponential race), so sampling needs no normalised p, cumsum or search,
and a row's draw depends only on its own probabilities and its own (seed, step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.core import Req


def _i64(x: int) -> int:
    """The int64 with the low 64 bits of `x`: torch has no uint64 arithmetic, but int64 wraps the same."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MUL1, _MUL2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser, in place on int64.

    torch's >> is arithmetic on int64, so every shift is masked to make it logical; int64 multiply wraps
    mod 2**64 on CPU and CUDA, which is the uint64 arithmetic the finaliser is defined with.
    """
    x ^= (x >> 30) & ((1 << 34) - 1)
    x *= _MUL1
    x ^= (x >> 27) & ((1 << 37) - 1)
    x *= _MUL2
    x ^= (x >> 31) & ((1 << 33) - 1)
    return x


def _token_counts(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab] float counts, by one scatter_add over a padded id tensor (pads weigh 0)."""
    width = max(1, max(map(len, seqs)))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.int64, device=device)
    lens = torch.tensor([len(s) for s in seqs], device=device)
    valid = (torch.arange(width, device=device)[None] < lens[:, None]).float()
    return torch.zeros(len(seqs), vocab, device=device).scatter_add_(1, ids, valid)


def apply_penalties(logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
    """Return `logits` with repetition, then frequency and presence penalties applied (vLLM order).

    Repetition (HF) looks at prompt + output, because its purpose is to stop copying the context;
    frequency/presence (OpenAI) look at output only. Only rows that use a penalty pay for the counts;
    the input is returned untouched (not copied) when no row does.
    """
    ps = [r.sampling_params for r in reqs]
    rep_rows = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0]
    fp_rows = [i for i, p in enumerate(ps) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if not rep_rows and not fp_rows:
        return logits
    out, dev, vocab = logits.clone(), logits.device, logits.shape[1]
    if rep_rows:
        idx = torch.tensor(rep_rows, device=dev)
        seen = _token_counts([reqs[i].origin_input_ids + reqs[i].output_ids for i in rep_rows], vocab, dev) > 0
        pen = torch.tensor([ps[i].repetition_penalty for i in rep_rows], dtype=out.dtype, device=dev)[:, None]
        sub = out[idx]
        out[idx] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    if fp_rows:
        idx = torch.tensor(fp_rows, device=dev)
        counts = _token_counts([reqs[i].output_ids for i in fp_rows], vocab, dev)
        freq = torch.tensor([ps[i].frequency_penalty for i in fp_rows], dtype=out.dtype, device=dev)[:, None]
        pres = torch.tensor([ps[i].presence_penalty for i in fp_rows], dtype=out.dtype, device=dev)[:, None]
        out[idx] = out[idx] - freq * counts - pres * (counts > 0).to(out.dtype)
    return out


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, log_softmax(raw logits)[chosen]; None if no req asked
    top_logprobs: list[list[tuple[int, float]]] | None  # per req; [] for reqs that did not ask


class Sampler:
    """Turns a [B, V] logits batch into one token per request; see the module docstring for why."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # splitmix64 counter offsets per token id, built once: the per-step noise is then a row key
        # broadcast-added to this and one _mix64 pass.
        self._tok_offsets = torch.arange(vocab_size, dtype=torch.int64, device=self.device) * _GOLDEN

    def sample(self, logits: torch.Tensor, reqs: list[Req]) -> SampleOutput:
        assert logits.shape == (len(reqs), self.vocab_size), (logits.shape, len(reqs), self.vocab_size)
        ps = [r.sampling_params for r in reqs]
        penalised = apply_penalties(logits, reqs)
        # Greedy is an argmax for every row (cheap); only sampled rows go through softmax, filters and
        # noise, and their draws are written over the argmax. That index_copy_ is the torch.where of a
        # mixed batch without computing the sampled branch for greedy rows.
        next_ids = penalised.argmax(dim=-1)
        rows = [i for i, p in enumerate(ps) if not p.greedy]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            sub = penalised if len(rows) == len(reqs) else penalised[idx]
            next_ids.index_copy_(0, idx, self._sample_rows(sub, [reqs[i] for i in rows]))

        if not any(p.logprobs or p.top_logprobs > 0 for p in ps):
            return SampleOutput(next_ids, None, None)
        # Logprobs are of the raw model distribution (OpenAI/vLLM convention), not of what was sampled.
        raw = logits.float()
        lse = torch.logsumexp(raw, dim=-1)
        logprobs = raw.gather(1, next_ids[:, None]).squeeze(1) - lse
        top: list[list[tuple[int, float]]] = [[] for _ in reqs]
        top_rows = [i for i, p in enumerate(ps) if p.top_logprobs > 0]
        if top_rows:
            idx = torch.tensor(top_rows, device=logits.device)
            vals, ids = raw[idx].topk(max(ps[i].top_logprobs for i in top_rows), dim=-1)
            vals, ids = (vals - lse[idx, None]).tolist(), ids.tolist()
            for j, i in enumerate(top_rows):
                k = ps[i].top_logprobs
                top[i] = list(zip(ids[j][:k], vals[j][:k]))
        return SampleOutput(next_ids, logprobs, top)

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """Sample one token per row of temperature > 0 rows."""
        ps = [r.sampling_params for r in reqs]
        dev, vocab = logits.device, self.vocab_size
        temp = torch.tensor([p.temperature for p in ps], dtype=logits.dtype, device=dev)[:, None]
        probs = torch.softmax(logits / temp, dim=-1)

        # top-k then top-p (on the top-k-renormalised mass, as HF warpers chain) need a sort; do it only
        # for rows that ask, and only a topk(max k) when no row asks for top-p.
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
        srows = [j for j, p in enumerate(ps) if ks[j] < vocab or p.top_p < 1.0]
        if srows:
            sidx = torch.tensor(srows, device=dev)
            sub = probs[sidx]
            k = torch.tensor([ks[j] for j in srows], device=dev)[:, None]
            top_p = torch.tensor([ps[j].top_p for j in srows], dtype=probs.dtype, device=dev)[:, None]
            if (top_p < 1).any():
                vals, ids = sub.sort(dim=-1, descending=True)
            else:
                vals, ids = sub.topk(max(ks[j] for j in srows), dim=-1)
            rank = torch.arange(vals.shape[1], device=dev)[None]
            vals = vals.masked_fill(rank >= k, 0.0)
            before = vals.cumsum(dim=-1) - vals  # mass strictly above each rank
            keep = (before < top_p * vals.sum(dim=-1, keepdim=True)) | (top_p >= 1) | (rank == 0)
            keep &= rank < k
            full = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, ids, keep)
            probs[sidx] = sub.masked_fill(~full, 0.0)

        min_p = [p.min_p for p in ps]
        if any(m > 0 for m in min_p):
            thr = torch.tensor(min_p, dtype=probs.dtype, device=dev)[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < thr, 0.0)

        # No renormalisation: argmax(p / E) is scale invariant per row, so it would change nothing.
        seeds = torch.tensor([_i64(r.seed) for r in reqs], dtype=torch.int64, device=dev)
        steps = torch.tensor([len(r.output_ids) for r in reqs], dtype=torch.int64, device=dev)
        key = _mix64(_mix64(seeds) + steps * _GOLDEN)
        h = _mix64(key[:, None] + self._tok_offsets.to(dev)[None])
        # Top 24 bits -> u in (0, 1) exactly representable in float32; E = -log(u) ~ Exp(1).
        u = ((h >> 40) & 0xFFFFFF).to(torch.float32).add_(0.5).mul_(2.0**-24)
        return (probs / u.log_().neg_()).argmax(dim=-1)
