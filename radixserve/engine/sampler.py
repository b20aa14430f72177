"""Batched token sampler: penalties, greedy / temperature / top-k / top-p / min-p, logprobs.

Noise comes from a counter-based hash of (seed, step, token id), not from a torch.Generator: a shared
generator hands each row whatever stream position its neighbours left, so a request's tokens would
depend on the batch it happened to land in. With E_t ~ Exp(1) i.i.d., argmax_t p_t / E_t is distributed
exactly as Categorical(p) (the exponential race), so sampling needs no normalised p, cumsum or search,
and a row's draw depends only on its own probabilities and its own (seed, step). The noise for a token
id is the same whichever path (full vocab or sorted prefix) a row takes, so filtering cannot reshuffle it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.core import Req
from radixserve.kernels.argmax import argmax_rows
from radixserve.transfer import to_device


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


def _padded(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L] ids and validity mask for non-empty `seqs`. Pads repeat the row's last id, so a scatter of a
    value computed from the gathered logit writes the same value at that position as the real entry."""
    width = max(map(len, seqs))
    ids = to_device([s + s[-1:] * (width - len(s)) for s in seqs], device)
    lens = to_device([len(s) for s in seqs], device)
    return ids, torch.arange(width, device=device)[None] < lens[:, None]


def apply_penalties(logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
    """Return `logits` with repetition, then frequency and presence penalties applied (vLLM order).

    Repetition (HF) looks at prompt + output, because its purpose is to stop copying the context;
    frequency/presence (OpenAI) look at output only. Only the (row, token) entries in a history are
    gathered, changed and scattered back, so cost scales with history length, not B * V; rows with no
    penalty or no history are skipped, and the input is returned as is (not copied) when none is left.
    """
    ps, dev, vocab = [r.sampling_params for r in reqs], logits.device, logits.shape[1]
    rep_rows = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0 and reqs[i].seqlen]
    fp_rows = [i for i, p in enumerate(ps) if (p.frequency_penalty or p.presence_penalty) and reqs[i].output_ids]
    if not rep_rows and not fp_rows:
        return logits
    out = logits.clone()

    def col(vals: list[float]) -> torch.Tensor:
        return to_device(vals, dev, out.dtype)[:, None]

    if rep_rows:
        ids, _ = _padded([reqs[i].fill_ids for i in rep_rows], dev)
        rows = to_device(rep_rows, dev)[:, None]
        pen, v = col([ps[i].repetition_penalty for i in rep_rows]), out[rows, ids]
        out[rows, ids] = torch.where(v > 0, v / pen, v * pen)
    if fp_rows:
        ids, valid = _padded([reqs[i].output_ids for i in fp_rows], dev)
        rows = to_device(fp_rows, dev)[:, None]
        counts = torch.zeros(len(fp_rows), vocab, dtype=out.dtype, device=dev)
        counts = counts.scatter_add_(1, ids, valid.to(out.dtype)).gather(1, ids)
        freq = col([ps[i].frequency_penalty for i in fp_rows])
        pres = col([ps[i].presence_penalty for i in fp_rows])
        out[rows, ids] = out[rows, ids] - freq * counts - pres * (counts > 0).to(out.dtype)
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` with -inf wherever bit t % 32 of word t // 32 of the row's int32 bitmask is clear.
    Out of place: the logits may be a CUDA graph's output buffer."""
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> bits) & 1).reshape(bitmask.shape[0], -1)[:, :logits.shape[1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
    """OpenAI's logit_bias: a value added to a token's logit before sampling (-100 bans it in practice)."""
    rows, cols, vals = [], [], []
    for i, r in enumerate(reqs):
        for tok, bias in (r.sampling_params.logit_bias or {}).items():
            if tok < logits.shape[1]:
                rows.append(i)
                cols.append(tok)
                vals.append(bias)
    out = logits.float().clone()
    dev = logits.device
    out.index_put_((to_device(rows, dev), to_device(cols, dev)), to_device(vals, dev, out.dtype), accumulate=True)
    return out


_NUCLEUS_PREFIX = 1024  # top-p first looks for its nucleus among this many tokens (topk is ~10x cheaper than sort)


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
        # Per-token half of the noise hash, built once. mix64 is a bijection and t * golden is injective,
        # so no two token ids share a hash (which would tie their noise in every row and step).
        self._tok_hash = _mix64((torch.arange(vocab_size, dtype=torch.int64, device=self.device) + 1) * _GOLDEN)
        self._last_batch: list[Req] = []
        self._last_batch_argmax = False
        self._last_batch_bias = False

    def _is_argmax_batch(self, reqs: list[Req]) -> bool:
        """Whether every request is greedy with no penalty and no logprobs, so the batch's tokens are just
        the argmax of its logits. Remembered for the last batch: a decode batch holds the same requests
        for many steps and a request's SamplingParams do not change while it runs, so most steps pay one
        list comparison (Reqs compare by identity, in C) instead of several checks per request."""
        if reqs != self._last_batch:
            self._last_batch = list(reqs)
            self._last_batch_bias = any(r.sampling_params.logit_bias for r in reqs)
            self._last_batch_argmax = all(
                p.greedy and p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
                and not p.logprobs and not p.top_logprobs for p in (r.sampling_params for r in reqs))
        return self._last_batch_argmax

    def sample(self, logits: torch.Tensor, reqs: list[Req], bitmask: torch.Tensor | None = None) -> SampleOutput:
        """`bitmask`: the grammar's allowed tokens per row (GrammarMasks.bitmask), applied before anything
        else, so greedy, sampling and logprobs all see the constrained distribution."""
        assert logits.shape == (len(reqs), self.vocab_size), (logits.shape, len(reqs), self.vocab_size)
        argmax = self._is_argmax_batch(reqs)
        if bitmask is not None:
            logits = apply_token_bitmask(logits, bitmask)
        if self._last_batch_bias:
            logits = apply_logit_bias(logits, reqs)
        if argmax:  # what the general path below computes for such a batch
            return SampleOutput(argmax_rows(logits), None, None)
        ps, dev, logits = [r.sampling_params for r in reqs], logits.device, logits.float()
        penalised = apply_penalties(logits, reqs)
        # Greedy is an argmax for every row (cheap); only sampled rows go through softmax, filters and
        # noise, and their draws overwrite the argmax: the torch.where of a mixed batch, without
        # computing the sampled branch for greedy rows.
        rows = [i for i, p in enumerate(ps) if not p.greedy]
        if len(rows) == len(reqs):
            next_ids = self._sample_rows(penalised, reqs)
        else:
            next_ids = penalised.argmax(dim=-1)
            if rows:
                idx = to_device(rows, dev)
                next_ids.index_copy_(0, idx, self._sample_rows(penalised[idx], [reqs[i] for i in rows]))

        if not any(p.logprobs or p.top_logprobs > 0 for p in ps):
            return SampleOutput(next_ids, None, None)
        # Logprobs describe the raw model distribution (OpenAI/vLLM convention), not the filtered one.
        lse = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(1, next_ids[:, None]).squeeze(1) - lse
        top: list[list[tuple[int, float]]] = [[] for _ in reqs]
        top_rows = [i for i, p in enumerate(ps) if p.top_logprobs > 0]
        if top_rows:
            idx = to_device(top_rows, dev)
            vals, ids = logits[idx].topk(max(ps[i].top_logprobs for i in top_rows), dim=-1)
            vals, ids = (vals - lse[idx, None]).tolist(), ids.tolist()
            for j, i in enumerate(top_rows):
                top[i] = list(zip(ids[j][: ps[i].top_logprobs], vals[j][: ps[i].top_logprobs]))
        return SampleOutput(next_ids, logprobs, top)

    def _log_u(self, keys: torch.Tensor, tok_hash: torch.Tensor) -> torch.Tensor:
        """log u for u ~ U(0, 1) per (row key, token): the hot [rows, tokens] part of the noise.

        The full finaliser is paid once per row (keys) and once per token (tok_hash); each pair only
        gets a multiply-xorshift-multiply of their xor. The 24 bits kept come from the top of the last
        multiply, so splitmix's trailing xorshift could not change them and is skipped.
        """
        h = keys[:, None] ^ tok_hash
        h *= _MUL1
        h ^= (h >> 32) & 0xFFFFFFFF
        h *= _MUL2
        # Arithmetic >> 40 leaves a signed 24-bit value; shifted by 2**23 + 0.5 it gives u strictly in (0, 1).
        return (h >> 40).to(torch.float32).add_(2.0**23 + 0.5).mul_(2.0**-24).log_()

    def _sample_rows(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """Draw one token per row (all temperature > 0): argmax log(u) / p, i.e. argmin E / p."""
        ps, dev, vocab = [r.sampling_params for r in reqs], logits.device, self.vocab_size

        def col(vals: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return to_device(vals, dev, dtype)[:, None]

        probs = torch.softmax(logits / col([p.temperature for p in ps]), dim=-1)
        seeds = to_device([_i64(r.seed) for r in reqs], dev)
        steps = to_device([r.decode_step for r in reqs], dev)
        keys = _mix64(_mix64(seeds) + steps * _GOLDEN)  # per-row half of the noise hash: (seed, step)
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
        srows = [j for j, p in enumerate(ps) if ks[j] < vocab or p.top_p < 1.0]
        drows = [j for j, p in enumerate(ps) if ks[j] == vocab and p.top_p >= 1.0]
        out = torch.empty(len(reqs), dtype=torch.int64, device=dev)
        if drows:  # no top-k/top-p: every token is a candidate, noise over the whole vocab
            d = to_device(drows, dev)
            pd = probs if len(drows) == len(reqs) else probs[d]
            if any(ps[j].min_p > 0 for j in drows):
                thr = col([ps[j].min_p for j in drows]) * pd.amax(dim=-1, keepdim=True)
                pd = pd.masked_fill(pd < thr, 0.0)
            out[d] = (self._log_u(keys[d], self._tok_hash) / pd).argmax(dim=-1)
        if srows:  # top-k/top-p: only a sorted prefix can survive, so noise only for that prefix
            s = to_device(srows, dev)
            sub = probs if len(srows) == len(reqs) else probs[s]
            k = col([ks[j] for j in srows], torch.int64)
            top_p, min_p = col([ps[j].top_p for j in srows]), col([ps[j].min_p for j in srows])
            width = min(vocab, max(ks[j] if ks[j] < vocab else _NUCLEUS_PREFIX for j in srows))
            picks, fits = self._pick_sorted(sub, width, k, top_p, min_p, keys[s])
            if not fits.all():  # nucleus wider than the prefix: redo those rows with a full sort
                b = (~fits).nonzero().squeeze(1)
                picks[b] = self._pick_sorted(sub[b], vocab, k[b], top_p[b], min_p[b], keys[s][b])[0]
            out[s] = picks
        return out

    def _pick_sorted(
        self, probs: torch.Tensor, width: int, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
        keys: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """top-k, then top-p on the top-k-renormalised mass (as HF warpers chain), then min-p, on the
        `width` most likely tokens. Returns the picks and whether each row's nucleus ended inside them."""
        vocab = probs.shape[1]
        vals, ids = probs.sort(dim=-1, descending=True) if width == vocab else probs.topk(width, dim=-1)
        rank = torch.arange(width, device=probs.device)[None]
        vals = vals.masked_fill(rank >= k, 0.0)
        # The mass top-p is relative to: the top-k tokens', or the whole row's when top-k is off.
        mass = torch.where(k < vocab, vals.sum(dim=-1, keepdim=True), probs.sum(dim=-1, keepdim=True))
        cum = vals.cumsum(dim=-1)
        # cum - vals is the mass ranked above a token; it is 0 < top_p for the top token, which always stays.
        keep = (cum - vals < top_p * mass) | (top_p >= 1)
        keep &= (rank < k) & (vals >= min_p * vals[:, :1])
        fits = (top_p >= 1) | (k < vocab) | (width == vocab) | (cum[:, -1:] >= top_p * mass)
        score = self._log_u(keys, self._tok_hash[ids]) / vals.masked_fill(~keep, 0.0)
        return ids.gather(1, score.argmax(dim=-1, keepdim=True)).squeeze(1), fits.squeeze(1)
