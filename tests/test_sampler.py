"""Sampler behaviour: filters, seeded reproducibility, distribution, greedy, penalties, logprobs.

Expected values are computed independently here (plain float64 loops, per-request reference code);
every sampled check uses fixed seeds, so the statistical bounds are deterministic, not flaky.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from radixserve.core import Req, SamplingParams
from radixserve.engine.sampler import Sampler, apply_penalties


def make_req(seed: int = 0, step: int = 0, prompt: list[int] | None = None, **kw) -> Req:
    """A request at decode step `step` (that many output ids), with sampling params `kw`."""
    return Req(
        origin_input_ids=prompt if prompt is not None else [1, 2, 3],
        output_ids=[(7 * i) % 5 for i in range(step)],
        sampling_params=SamplingParams(**kw),
        seed=seed,
    )


def draws(sampler: Sampler, row: torch.Tensor, seeds: range, **kw) -> list[int]:
    """Sample `row` once per seed, all in one batch."""
    reqs = [make_req(seed=s, **kw) for s in seeds]
    return sampler.sample(row[None].expand(len(reqs), -1).contiguous(), reqs).next_token_ids.tolist()


def allowed_set(row: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, tol=0.0) -> set[int]:
    """Tokens the filters may keep, by a plain loop over float64 probabilities; `tol` widens the top-p cut
    for large vocabs, where float32 cumulative sums legitimately differ in the last digits at the boundary."""
    probs = torch.softmax(row.double() / temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    if top_k > 0:
        order = order[:top_k]
    total, kept_mass, keep = sum(probs[t] for t in order), 0.0, []
    for t in order:
        if keep and kept_mass >= top_p * total + tol:
            break
        keep.append(t)
        kept_mass += probs[t]
    return {t for t in keep if probs[t] >= min_p * probs[order[0]] * (1 - 1e-6)}


def chi_square(observed: Counter, probs: torch.Tensor, n: int) -> float:
    return sum((observed.get(t, 0) - n * p) ** 2 / (n * p) for t, p in enumerate(probs.tolist()) if p > 0)


@pytest.fixture(scope="module")
def small() -> tuple[Sampler, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return Sampler(32, "cpu"), torch.randn(32, generator=g) * 2


FILTERS = [
    {"top_k": 3},
    {"top_k": 10, "temperature": 0.5},
    {"top_p": 0.6},
    {"top_p": 0.3, "temperature": 1.5},
    {"top_p": 0.01},  # below the top token's mass: only the top token survives
    {"min_p": 0.2},
    {"top_k": 20, "min_p": 0.3},  # min-p on the sorted (top-k) path
    {"top_k": 8, "top_p": 0.7, "min_p": 0.1, "temperature": 0.7},
]


@pytest.mark.parametrize("kw", FILTERS)
def test_filters_never_emit_outside_allowed_set(small, kw):
    sampler, row = small
    allowed = allowed_set(row, **kw)
    got = draws(sampler, row, range(2000), **kw)
    assert set(got) <= allowed
    assert len(set(got)) == len(allowed)  # filters drop nothing they should keep (2000 draws cover all)


@pytest.mark.parametrize(
    "scale,kw",
    [
        (6.0, {"top_p": 0.9}),  # peaked: nucleus inside the top-k prefix (fast path)
        (0.5, {"top_p": 0.5}),  # flat: nucleus of ~20k tokens, falls back to a full sort
        (0.5, {"top_k": 2000, "top_p": 0.8}),
        (3.0, {"min_p": 0.3, "temperature": 0.9}),
        (3.0, {"top_k": 40}),
    ],
)
def test_filters_large_vocab(scale, kw):
    vocab = 49152
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * scale
    allowed = allowed_set(row, tol=1e-4, **kw)
    got = draws(Sampler(vocab, "cpu"), row, range(200), **kw)
    assert set(got) <= allowed
    # The draws spread over the allowed set as its mass says: the likeliest tokens holding about half of
    # it get about half the draws (sd ~0.035 at 200 draws; truncating a wide nucleus would give ~1.0).
    probs = torch.softmax(row.double() / kw.get("temperature", 1.0), dim=-1)
    ranked = sorted(allowed, key=lambda t: -probs[t].item())
    mass = probs[ranked].cumsum(0) / probs[ranked].sum()
    head = set(ranked[: int((mass < 0.5).sum()) + 1])
    expected = probs[list(head)].sum() / probs[ranked].sum()
    assert abs(sum(t in head for t in got) / len(got) - expected.item()) < 0.15


def test_mixed_filter_batch_matches_single_rows():
    """Rows on the dense path, the top-k prefix and the full-sort fallback in one batch draw exactly what
    they draw alone, and stay inside their own allowed set."""
    vocab = 5000
    g = torch.Generator().manual_seed(3)
    rows = torch.stack([torch.randn(vocab, generator=g) * s for s in (0.2, 4.0, 0.2, 4.0, 1.0, 1.0, 1.0)])
    kws = [{"top_p": 0.5}, {"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.5}, {}, {"top_k": 50, "top_p": 0.5}]
    kws.append({"temperature": 0})
    sampler = Sampler(vocab, "cpu")
    for seed in range(20):
        reqs = [make_req(seed=seed * 10 + i, step=seed, **kw) for i, kw in enumerate(kws)]
        batch = sampler.sample(rows, reqs).next_token_ids.tolist()
        alone = [sampler.sample(rows[i : i + 1], [r]).next_token_ids.item() for i, r in enumerate(reqs)]
        assert batch == alone
        for i, kw in enumerate(kws[:-1]):
            assert batch[i] in allowed_set(rows[i], tol=1e-4, **kw)
        assert batch[-1] == rows[-1].argmax().item()


def test_same_seed_same_token_whatever_the_batch(small):
    sampler, row = small
    g = torch.Generator().manual_seed(5)
    for kw in ({}, {"temperature": 0.8, "top_p": 0.9}, {"top_k": 6, "min_p": 0.05}, {"top_k": 6, "top_p": 0.6}):
        for seed, step in ((0, 0), (1234, 7), (2**63 + 5, 3), (-17, 100)):
            target = make_req(seed=seed, step=step, **kw)
            alone = sampler.sample(row[None].clone(), [target]).next_token_ids.item()
            for n_before, n_after in ((0, 3), (2, 2), (7, 0), (30, 9)):
                kinds = [{"temperature": 0}, {"top_k": 25}, {"min_p": 0.3}, {"repetition_penalty": 1.5}] * 10
                neigh = [make_req(seed=s, step=s % 4, **n) for s, n in enumerate(kinds)]
                reqs = neigh[:n_before] + [target] + neigh[n_before : n_before + n_after]
                logits = torch.randn(len(reqs), 32, generator=g)
                logits[n_before] = row
                out = sampler.sample(logits, reqs).next_token_ids
                assert out[n_before].item() == alone


def test_seed_and_step_change_the_draw():
    sampler, row = Sampler(1000, "cpu"), torch.zeros(1000)
    by_seed = draws(sampler, row, range(200))
    assert len(set(by_seed)) > 150  # ~181 expected for 200 uniform draws over 1000
    by_step = [sampler.sample(row[None], [make_req(seed=42, step=s)]).next_token_ids.item() for s in range(200)]
    assert len(set(by_step)) > 150
    assert by_seed != by_step


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.5}, {"top_k": 4}, {"top_p": 0.8}, {"min_p": 0.2}])
def test_frequencies_follow_distribution(kw):
    vocab, n = 8, 16000
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    probs = torch.softmax(row.double() / kw.get("temperature", 1.0), dim=-1)
    allowed = allowed_set(row, **kw)
    probs = torch.tensor([p if t in allowed else 0.0 for t, p in enumerate(probs.tolist())])
    probs /= probs.sum()
    got = Counter(draws(Sampler(vocab, "cpu"), row, range(n), **kw))
    # df <= 7: the 1e-6 tail of chi2(7) is ~37; a broken sampler gives hundreds or more.
    assert chi_square(got, probs, n) < 40, (got, probs * n)


def test_streams_of_different_seeds_are_independent():
    """Joint draws of two requests follow the product distribution (a weak hash could correlate rows whose
    seeds differ in a few bits or by a power of two)."""
    sampler, n = Sampler(4, "cpu"), 8000
    for offset in (1, 2**32, 2**62):
        reqs = [make_req(seed=s + d, step=3) for s in range(0, 4 * n, 4) for d in (0, offset)]
        out = sampler.sample(torch.zeros(len(reqs), 4), reqs).next_token_ids.view(-1, 2)
        pairs = Counter(x * 4 + y for x, y in out.tolist())
        assert chi_square(pairs, torch.full((16,), 1 / 16), n) < 50  # chi2(15): 1e-6 tail is ~50


def test_greedy_is_argmax_also_in_mixed_batches():
    vocab = 1000
    logits = torch.randn(12, vocab, generator=torch.Generator().manual_seed(2)) * 3
    kws = [{"temperature": 0}, {"top_k": 1}, {}, {"top_p": 0.5}, {"temperature": 0, "top_p": 0.3}] * 2
    kws += [{"temperature": 0}] * 2
    reqs = [make_req(seed=i, step=i, **kw) for i, kw in enumerate(kws)]
    out = Sampler(vocab, "cpu").sample(logits, reqs)
    for i, r in enumerate(reqs):
        if r.sampling_params.greedy:
            assert out.next_token_ids[i].item() == logits[i].argmax().item()
    assert out.next_token_ids.dtype == torch.int64 and out.next_token_ids.shape == (12,)
    all_greedy = Sampler(vocab, "cpu").sample(logits, [make_req(temperature=0) for _ in range(12)])
    assert torch.equal(all_greedy.next_token_ids, logits.argmax(-1))


def reference_penalties(logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
    out = logits.clone()
    for i, r in enumerate(reqs):
        p = r.sampling_params
        for t in set(r.origin_input_ids + r.output_ids):
            x = out[i, t].item()
            out[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t, c in Counter(r.output_ids).items():
            out[i, t] = out[i, t] - p.frequency_penalty * c - p.presence_penalty
    return out


def test_apply_penalties_matches_reference():
    vocab = 50
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, vocab, generator=g) * 3
    kws = [
        {},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7, "frequency_penalty": 0.5},
        {"frequency_penalty": -1.2, "presence_penalty": 0.8},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 2.0, "frequency_penalty": 1.0, "presence_penalty": -0.5},
        {"repetition_penalty": 1.1, "presence_penalty": 1.0},  # no output yet: only repetition applies
    ]
    reqs = []
    for i, kw in enumerate(kws):
        prompt = torch.randint(0, vocab, (3 + 5 * i,), generator=g).tolist()
        out_len = 0 if i == 6 else 4 * i + 1
        r = Req(origin_input_ids=prompt, sampling_params=SamplingParams(**kw), seed=i)
        r.output_ids = torch.randint(0, vocab // 3, (out_len,), generator=g).tolist()  # many repeats
        reqs.append(r)
    got = apply_penalties(logits, reqs)
    torch.testing.assert_close(got, reference_penalties(logits, reqs), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], logits[0]) and not torch.equal(got[5], logits[5])
    assert torch.equal(logits, logits.clone())  # input left untouched
    plain = [make_req(step=3) for _ in range(7)]
    assert apply_penalties(logits, plain) is logits


def test_penalties_steer_the_sampler():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    req = make_req(temperature=0, presence_penalty=2.0, prompt=[3])
    req.output_ids = [0]
    assert Sampler(4, "cpu").sample(logits, [req]).next_token_ids.item() == 1


def test_logprobs_and_top_logprobs():
    vocab = 300
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(6)) * 2
    sampler = Sampler(vocab, "cpu")
    assert sampler.sample(logits, [make_req(seed=i) for i in range(5)]).logprobs is None
    kws = [
        {"logprobs": True},
        {},
        {"top_logprobs": 5, "temperature": 0.5, "top_k": 3},
        {"logprobs": True, "top_logprobs": 20, "temperature": 0, "repetition_penalty": 1.5},
        {"top_logprobs": 1, "top_p": 0.5},
    ]
    reqs = [make_req(seed=i, step=2, **kw) for i, kw in enumerate(kws)]
    out = sampler.sample(logits, reqs)
    ref = torch.log_softmax(logits.double(), dim=-1)  # raw logits: no penalty, no temperature
    chosen = out.next_token_ids
    torch.testing.assert_close(out.logprobs.double(), ref.gather(1, chosen[:, None]).squeeze(1), atol=1e-5, rtol=0)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (5,)
    for i, r in enumerate(reqs):
        k = r.sampling_params.top_logprobs
        top = out.top_logprobs[i]
        assert len(top) == k
        if not k:
            continue
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        ref_vals, ref_ids = ref[i].topk(k)
        assert [t for t, _ in top] == ref_ids.tolist()
        assert vals == pytest.approx(ref_vals.tolist(), abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_draws_on_cuda():
    vocab = 49152
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(8)) * 3
    kws = [{}, {"temperature": 0.7, "top_p": 0.9}, {"top_k": 50}, {"min_p": 0.1}, {"temperature": 0}] * 13
    reqs = [make_req(seed=1000 + i, step=i, **kw) for i, kw in enumerate(kws[:64])]
    cpu = Sampler(vocab, "cpu").sample(logits, reqs).next_token_ids
    gpu = Sampler(vocab, "cuda").sample(logits.cuda(), reqs).next_token_ids.cpu()
    assert (cpu == gpu).float().mean() > 0.98  # float32 log/softmax may differ in the last ulp on a tie
