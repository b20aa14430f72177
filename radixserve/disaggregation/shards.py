"""Which KV heads a decode TP rank takes from which prefill TP rank, when the two servers run different --tp.

A rank at --tp T of a model with H KV heads holds the heads QKVParallelLinear gives it: H / T consecutive ones
when H >= T, else the one head its queries use (rank // (T / H): KV heads are replicated). A decode rank needs
its own heads; each lives on one or more prefill ranks, and the plan takes it from the first of them counting
from the decode rank's own number, so a
TP=2 decode rank of TP=1 prefill reads half the heads of prefill rank 0, and a TP=1 decode rank of TP=2 prefill
reads all of both ranks' heads. Both sides compute the same plan from the same three numbers: the prefill
sender keeps a room's KV until every decode rank whose plan names it has fetched its part.
"""
from __future__ import annotations


def kv_heads_of(rank: int, tp: int, num_kv_heads: int) -> tuple[int, int]:
    """[start, stop) of the global KV heads TP rank `rank` of `tp` holds."""
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return rank * per, (rank + 1) * per
    head = rank // (tp // num_kv_heads)
    return head, head + 1


def fetch_plan(decode_rank: int, decode_tp: int, prefill_tp: int, num_kv_heads: int) -> list[tuple[int, int, int]]:
    """(prefill rank, first local head, end local head) for each piece of the decode rank's heads, in head order."""
    start, stop = kv_heads_of(decode_rank, decode_tp, num_kv_heads)
    pieces: list[tuple[int, int, int]] = []  # (first global head, end global head, prefill rank)
    for i in range(prefill_tp):  # from the rank with this rank's number on: at equal --tp, rank r from rank r
        q = (decode_rank + i) % prefill_tp
        a, b = kv_heads_of(q, prefill_tp, num_kv_heads)
        lo, hi = max(a, start), min(b, stop)
        if lo < hi and not any(p_lo <= lo < p_hi for p_lo, p_hi, _ in pieces):  # skip replicas already taken
            pieces.append((lo, hi, q))
    return [(q, lo - kv_heads_of(q, prefill_tp, num_kv_heads)[0], hi - kv_heads_of(q, prefill_tp, num_kv_heads)[0])
            for lo, hi, q in sorted(pieces)]


def fetchers(prefill_rank: int, prefill_tp: int, decode_tp: int, num_kv_heads: int) -> int:
    """How many decode ranks take a part of this prefill rank's KV (0: none; decode rank 0 releases it)."""
    return sum(any(q == prefill_rank for q, _, _ in fetch_plan(r, decode_tp, prefill_tp, num_kv_heads))
               for r in range(decode_tp))
