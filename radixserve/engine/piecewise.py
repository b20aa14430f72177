"""--enable-piecewise-cuda-graph: CUDA graphs for prefill/extend batches, cut at attention.

A short prompt's prefill is launch-bound like a decode step (a 128-token prefill of an 8B model is ~4 ms
of matmuls but hundreds of kernel launches), yet one graph per batch cannot hold attention: its work
depends on every request's prefix and extend lengths. Everything else in a layer (norms, projections,
MLP, residual adds) depends only on the token count. So the model is traced once by torch.compile with
a dynamic token count; a custom backend cuts the FX graph at every `radixserve::attention` op (the opaque
op of --enable-torch-compile, layers/attention.py) and wraps each piece in between in a `Piece`, which is
captured as a CUDA graph per token-count bucket. Attention runs eagerly between the pieces, with the
real batch's metadata.

A batch of T tokens runs the smallest bucket n >= T: token ids and positions are padded with zeros, the
attention op attends over the first T rows only and pads its output back to n (rows past T are garbage
that no one reads: every op outside attention is row-wise). Batches over --piecewise-cuda-graph-max-tokens
run the eager model.

Graph memory: every bucket keeps its pieces' outputs (one shared pool), about (hidden + q/k/v) x tokens
per layer: ~0.7 MB per token for the 8B preset, summed over the buckets. On CPU the same split pieces
run eagerly (no capture): that is the path CPU tests check against the eager model.
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from radixserve.forward_batch import ForwardBatch
from radixserve.kernels.fused import opaque_trace
from radixserve.layers.attention import FORWARD_CONTEXT

logger = logging.getLogger(__name__)
MIN_TOKENS = 16


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Token-count buckets: powers of two from MIN_TOKENS and the midpoints above 512 (padding stays
    under 50 %, under 33 % past 512), capped by and including max_tokens."""
    sizes, n = set(), MIN_TOKENS
    while n < max_tokens:
        sizes.add(n)
        if n >= 512:
            sizes.add(n * 3 // 2)
        n *= 2
    return sorted({s for s in sizes if s < max_tokens} | {max(max_tokens, 1)})


def is_attention(node: fx.Node) -> bool:
    """Dynamo records the op as its overload packet; an aten-level graph would hold `.default`."""
    op = torch.ops.radixserve.attention
    return node.op == "call_function" and node.target in (op, op.default)


def split_at_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """Split `gm` so that each attention op is a submodule of its own; returns the split module and the
    names of the other submodules (the pieces), in execution order."""
    from torch.fx.passes.split_module import split_module

    part, parts = 0, {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_attention(node):
            parts[node] = part + 1
            part += 2
        else:
            parts[node] = part
    split = split_module(gm, None, lambda n: parts[n], keep_original_order=True)
    attention = {f"submod_{p}" for n, p in parts.items() if is_attention(n)}
    names = [n.target for n in split.graph.nodes if n.op == "call_module" and n.target not in attention]
    return split, names


class Piece(torch.nn.Module):
    """One stretch of the model between two attention ops: eager, or a CUDA graph per token bucket.

    A graph reads its inputs from the addresses it was captured with: inputs that arrive elsewhere (the
    attention output before it) are copied there; the weights and the previous piece's outputs already
    live there."""

    def __init__(self, gm: fx.GraphModule, state: PiecewiseState) -> None:
        super().__init__()
        self.gm, self.state = gm, state
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[Any], Any]] = {}

    def forward(self, *args: Any) -> Any:
        st = self.state
        if st.mode == "eager":
            return self.gm(*args)
        if st.mode == "capture":
            return self._capture(args)
        graph, static, out = self.graphs[st.bucket]
        for s, a in zip(static, args):
            if isinstance(a, torch.Tensor) and a.data_ptr() != s.data_ptr():
                s.copy_(a)
        graph.replay()
        return out

    def _capture(self, args: Sequence[Any]) -> Any:
        st = self.state
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph() would gc.collect() and empty the cache for each of hundreds of pieces
        st.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st.stream):
            graph.capture_begin(pool=st.pool)
            try:
                out = self.gm(*args)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(st.stream)
        self.graphs[st.bucket] = (graph, list(args), out)
        return out


class PiecewiseState:
    """What every piece of one model reads: the mode of the current call and its bucket."""

    def __init__(self, device: torch.device) -> None:
        self.mode, self.bucket = "eager", 0
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None


class PiecewiseRunner:
    """Runs extend batches of up to `max_tokens` tokens through the split model (ModelRunner.run_model)."""

    def __init__(self, model: torch.nn.Module, attn_layers: Sequence[Any], device: torch.device, max_tokens: int,
                 capture_batch: Callable[[int], ForwardBatch] | None = None) -> None:
        """`capture_batch(n)`: a ForwardBatch of n tokens whose KV writes go to the padding slot, bound while
        graphs are captured (None: no graphs, the pieces run eagerly; CPU)."""
        self.model, self.layers, self.device = model, attn_layers, device
        self.sizes = piecewise_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.state = PiecewiseState(device)
        self.pieces: list[Piece] = []
        self.captured: set[int] = set()
        self.replays = 0  # batches that ran the captured graphs (tests, logs)

        def hidden(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return model.model(input_ids, positions, None)

        import torch._dynamo  # only with --enable-piecewise-cuda-graph: 2 s of import for everyone else

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.sizes) + 8)
        self.compiled = torch.compile(hidden, backend=self._backend, fullgraph=True, dynamic=True)
        if capture_batch is not None:
            self._capture_all(capture_batch)

    def _backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        split, names = split_at_attention(gm)
        for name in names:
            piece = Piece(getattr(split, name), self.state)
            setattr(split, name, piece)
            self.pieces.append(piece)
        logger.info("Piecewise graph: %d pieces around %d attention ops", len(names),
                    sum(1 for n in gm.graph.nodes if is_attention(n)))
        return split

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def bucket(self, num_tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, H] of the batch's tokens (bind FORWARD_CONTEXT and the backend's metadata
        first: the attention ops run eagerly in between)."""
        t = fb.input_ids.numel()
        n = self.bucket(t)
        ids, pos = fb.input_ids, fb.positions
        if n > t:
            ids = torch.nn.functional.pad(ids, (0, n - t))
            pos = torch.nn.functional.pad(pos, (0, n - t))
        st = self.state
        st.mode, st.bucket = ("replay" if n in self.captured else "eager"), n
        self.replays += st.mode == "replay"
        try:
            with opaque_trace():  # a retrace (a new shape guard) must see the same ops
                return self.compiled(ids, pos)[:t]
        finally:
            st.mode = "eager"

    @torch.inference_mode()
    def _capture_all(self, capture_batch: Callable[[int], ForwardBatch]) -> None:
        st = self.state
        for n in reversed(self.sizes):  # largest first, as the decode graphs
            fb = capture_batch(n)
            ids, pos = fb.input_ids, fb.positions
            fb.attn.init_forward_metadata(fb)
            with FORWARD_CONTEXT.bind(fb, self.layers):
                st.bucket = n
                for mode in ("eager", "capture"):  # eager first: cuBLAS/Triton pick their kernels outside
                    st.mode = mode
                    with opaque_trace():
                        self.compiled(ids, pos)
            st.mode = "eager"
            self.captured.add(n)
        torch.cuda.synchronize()
        logger.info("Captured piecewise CUDA graphs (%d pieces) for extend token counts %s", len(self.pieces),
                    self.sizes)


def padding_batch(runner: Any, n: int) -> ForwardBatch:
    """n tokens of one request in row 0 at positions 0..n-1, every KV write to slot 0 (the padding page):
    what the graphs are captured with."""
    dev = runner.device
    i64 = dict(dtype=torch.int64, device=dev)
    zeros = torch.zeros(n, **i64)
    one = torch.ones(1, **i64)
    return ForwardBatch(
        is_decode=False, input_ids=zeros, positions=torch.arange(n, **i64), out_slots=zeros,
        req_rows=torch.zeros(1, **i64), seq_lens=one * n, prefix_lens=one * 0, extend_lens=one * n,
        logits_idx=one * (n - 1), max_seq_len=n, max_extend_len=n, kv_pool=runner.kv_pool,
        req_to_token=runner.req_to_token_pool.req_to_token, attn=runner.attn)

