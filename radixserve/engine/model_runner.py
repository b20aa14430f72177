"""ModelRunner: owns the model, the KV pool and the attention backend; turns a scheduled batch
into a ForwardBatch and returns last-position logits (and, for an extend step whose requests asked for
prompt logprobs, the log_softmax at their prompt positions: engine/prompt_logprobs.py)."""
from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass
from functools import partial

import torch

from radixserve.args import ServerArgs
from radixserve.attention import make_backend
from radixserve.core import Req
from radixserve.distributed.group import TPGroup
from radixserve.engine.auto_memory import activation_peak_bytes, auto_fraction
from radixserve.engine.compile import compile_decode
from radixserve.engine.cuda_graph import CudaGraphRunner
from radixserve.engine.piecewise import PiecewiseRunner, padding_batch
from radixserve.engine.prompt_logprobs import PromptLogprobPlan, compute_prompt_logprobs
from radixserve.forward_batch import ForwardBatch
from radixserve.kernels import pdl
from radixserve.kvcache.pool import KVPool, ReqToTokenPool, is_fp8, kv_cache_dtype
from radixserve.layers.attention import FORWARD_CONTEXT
from radixserve.layers.quantization import model_weight_bytes, resolve_quant_config
from radixserve.models.config import ModelConfig, context_length
from radixserve.models.registry import build_model
from radixserve.transfer import int64_tensor, to_device
from radixserve.weights.loader import ModelSource, load_config, load_weights

logger = logging.getLogger(__name__)
GB = 1 << 30
CPU_DEFAULT_REQUESTS = 8  # requests of full context the default CPU KV pool holds


@dataclass
class MemoryPlan:
    max_total_num_tokens: int
    num_pages: int
    available_mem_gb: float  # device memory left for activations and graphs after weights + KV


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes: the GPU's, or the host's RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), total


def release_freed_heap() -> None:
    """Give the heap freed while loading back to the OS (glibc's malloc_trim). On the CPU a GGUF load
    dequantizes each tensor to float32 before packing it, and glibc keeps those freed pages: the bundled
    model's process is at 860 MB resident after loading with this, 1,091 MB without it (measured). Elsewhere
    (musl, macOS) nothing happens."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ModelRunner:
    def __init__(self, args: ServerArgs, src: ModelSource, tp: TPGroup = TPGroup(),
                 model_config: ModelConfig | None = None) -> None:
        self.args, self.tp = args, tp
        self.device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
        self.dtype = args.torch_dtype
        # traced forwards (torch.compile, piecewise graphs) launch the kernels through inductor, which
        # does not pass the programmatic-launch option on
        pdl.configure(not (args.disable_pdl or args.enable_torch_compile or args.enable_piecewise_cuda_graph),
                      self.device)
        self.cfg = model_config or load_config(src)
        self.cfg.quant = resolve_quant_config(args.quantization, self.cfg.hf_config, self.device,
                                              use_checkpoint=args.load_format != "dummy",
                                              cpu_weight_dtype=args.cpu_weight_dtype, dtype=self.dtype)
        self.kv_dtype = kv_cache_dtype(args.kv_cache_dtype, self.dtype)
        self.context_len = context_length(args, self.cfg)
        t0 = time.perf_counter()
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(self.cfg, tp, args.ep_size)
        finally:
            torch.set_default_dtype(default_dtype)
        kv_scales = load_weights(self.model, src, args.load_format, args.seed)
        self.model.eval()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # weights quantized at load leave their 16-bit copies in the cache
        else:
            release_freed_heap()
        self.weight_bytes = model_weight_bytes(self.model)
        logger.info("Loaded %s (%s, %.2f GB; linear layers: %s) in %.1f s", src.name, self.cfg.architecture,
                    self.weight_bytes / GB, self.cfg.quant.describe() if self.cfg.quant else "unquantized",
                    time.perf_counter() - t0)
        self.memory = self._plan_memory()
        kv_heads = self.model.model.layers[0].self_attn.attn.num_kv_heads
        self.kv_pool = KVPool(self.cfg.num_layers, self.memory.num_pages * args.page_size, kv_heads,
                              self.cfg.head_dim, self.kv_dtype, self.device, kv_scales)
        per_token = KVPool.bytes_per_token(self.cfg.num_layers, kv_heads, self.cfg.head_dim, self.kv_dtype)
        logger.info("KV cache: %d tokens x %d B = %.2f GB in %s%s", self.memory.max_total_num_tokens, per_token,
                    self.memory.max_total_num_tokens * per_token / GB, str(self.kv_dtype).removeprefix("torch."),
                    f", checkpoint k/v scales for {len(kv_scales)} layers" if kv_scales and is_fp8(self.kv_dtype)
                    else "")
        self.max_running_requests = args.max_running_requests or min(
            4096 if self.device.type == "cuda" else 256, max(self.memory.max_total_num_tokens // 8, 1))
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests, self.context_len + 1, self.device)
        self.attn = make_backend(args.attention_backend)
        # Last sampled token of each request row, kept on the device: decode reads its inputs from
        # here, so step N+1 can launch before step N's tokens reach the CPU (overlap scheduling).
        self.last_token = torch.zeros(self.max_running_requests + 1, dtype=torch.int64, device=self.device)
        self.attn_layers = [layer.self_attn.attn for layer in self.model.model.layers]
        use_graphs = self.device.type == "cuda" and not args.disable_cuda_graph
        self.compiled_decode = (compile_decode(self.model, self.device, args.torch_compile_max_bs, use_graphs)
                                if args.enable_torch_compile else None)
        self.graphs = None
        self.piecewise = None  # --enable-piecewise-cuda-graph: extend batches in graphs cut at attention
        self.used_graph = False  # whether the last forward replayed a CUDA graph (for the decode log line)
        if use_graphs:
            if args.attention_backend != "triton":
                raise ValueError("CUDA graphs need --attention-backend triton; or pass --disable-cuda-graph")
            max_bs = min(args.cuda_graph_max_bs or 256, self.max_running_requests)
            self.graphs = CudaGraphRunner(self, max_bs)
        if args.enable_piecewise_cuda_graph:  # after the decode graphs, whose capture reads it
            self.piecewise = PiecewiseRunner(self.model, self.attn_layers, self.device,
                                             min(args.piecewise_cuda_graph_max_tokens, self.context_len),
                                             partial(padding_batch, self) if use_graphs else None)

    def _plan_memory(self) -> MemoryPlan:
        a, ps = self.args, self.args.page_size
        per_token = KVPool.bytes_per_token(self.cfg.num_layers, self.model.model.layers[0].self_attn.attn.num_kv_heads,
                                           self.cfg.head_dim, self.kv_dtype)
        free, total = device_memory(self.device)
        if a.max_total_tokens:
            tokens = a.max_total_tokens
        elif self.device.type == "cpu":
            tokens = self._cpu_pool_tokens(per_token, total)
        else:
            used = (total - free) if self.device.type == "cuda" else self.weight_bytes
            fraction = a.mem_fraction_static
            if a.mem_fraction_auto and self.device.type == "cuda":  # engine/auto_memory.py says how
                peak = activation_peak_bytes(self.cfg, a.chunked_prefill_size, a.max_running_requests or
                                             a.cuda_graph_max_bs or 256, self.dtype.itemsize, self.tp.size)
                fraction = auto_fraction(total, peak)
            budget = total * fraction - used
            if budget <= 0:
                raise ValueError(
                    f"--mem-fraction-static {a.mem_fraction_static} too low: weights and other use take "
                    f"{used / GB:.1f} GB of {total / GB:.1f} GB, nothing left for the KV cache; try "
                    f"{min(0.95, (used / total) + 0.1):.2f} or set --max-total-tokens")
            tokens = int(budget // per_token)
            left = free - tokens * per_token
            if self.device.type == "cuda" and left < 1 * GB:
                raise ValueError(
                    f"--mem-fraction-static {a.mem_fraction_static} too high: {left / GB:.1f} GB left for "
                    f"activations and CUDA graphs; try {max(0.1, a.mem_fraction_static - 0.05):.2f}")
        # Every rank must plan the same pool (free GPU memory differs a little between ranks), or their
        # schedulers, which must stay in lock-step, would admit different batches.
        tokens = self.tp.min_int(tokens, self.device)
        num_pages = max(tokens // ps, 2) + 1  # +1: page 0 is the padding page
        left = free - num_pages * ps * per_token if self.device.type == "cuda" else free
        return MemoryPlan((num_pages - 1) * ps, num_pages, left / GB)

    def _cpu_pool_tokens(self, per_token: int, ram: int) -> int:
        """On CPU the pool is sized from the model, not from a share of RAM: enough for
        CPU_DEFAULT_REQUESTS requests of the whole context, capped at --mem-fraction-static of RAM (default
        5 %). A CPU decodes a handful of requests at a useful speed, and a pool sized from RAM alone (7 GB
        for a 135M model) made two test servers exhaust a laptop."""
        a = self.args
        want = (a.max_running_requests or CPU_DEFAULT_REQUESTS) * self.context_len
        cap = int(ram * a.mem_fraction_static // per_token)
        tokens = max(min(want, cap), a.page_size * 2)
        why = (f"{a.max_running_requests or CPU_DEFAULT_REQUESTS} requests x context {self.context_len}"
               if want <= cap else f"--mem-fraction-static {a.mem_fraction_static} of {ram / GB:.1f} GB RAM")
        logger.info(f"KV cache on CPU: {tokens} tokens ({tokens * per_token / GB:.2f} GB), sized by {why}; "
                    f"set --max-total-tokens to change it")
        return tokens

    @torch.inference_mode()
    def forward(self, reqs: list[Req], is_decode: bool, decode_tail: int = 0,
                prompt: PromptLogprobPlan | None = None) -> torch.Tensor:
        """Run one step for `reqs`: each computes `req.extend_len` tokens starting at `req.kv_len`,
        whose slots the scheduler already wrote into req_to_token. Returns logits [B, vocab].
        `decode_tail`: the last that many requests of an extend batch are decode steps (a mixed batch),
        whose input token is still on the device (last_token) under overlap scheduling.
        `prompt` (extend steps only): the prompt positions whose logprobs to compute; filled in place."""
        assert prompt is None or not is_decode, "prompt logprobs come from extend steps"
        fb = self.prepare(reqs, is_decode, decode_tail)
        self.used_graph = bool(is_decode and self.graphs is not None and self.graphs.can_run(len(reqs)))
        loaded, self.kv_pool.pending_load = self.kv_pool.pending_load, None
        if loaded is not None:  # a HiCache load since the last forward: eager extends wait layer by layer
            if is_decode:
                torch.cuda.current_stream(self.device).wait_event(loaded[-1])
            else:
                fb.kv_ready = loaded
        if self.used_graph:
            return self.graphs.replay(fb)
        return self.run_model(fb, prompt)

    def run_model(self, fb: ForwardBatch, prompt: PromptLogprobPlan | None = None) -> torch.Tensor:
        """One eager forward (or the one a CUDA graph captures): compiled for small decode batches under
        --enable-torch-compile. Decode logits_idx is arange(B), so the compiled path skips the gather.
        An extend step with a `prompt` plan keeps the hidden states of every token for the LM head at the
        planned rows; without one the model gathers the last positions itself, as before."""
        self.attn.init_forward_metadata(fb)
        if self.compiled_decode is not None and fb.is_decode and fb.batch_size <= self.args.torch_compile_max_bs:
            with FORWARD_CONTEXT.bind(fb, self.attn_layers):
                return self.compiled_decode(fb.input_ids, fb.positions)
        if self.piecewise is not None and not fb.is_decode and self.piecewise.can_run(fb.input_ids.numel()):
            with FORWARD_CONTEXT.bind(fb, self.attn_layers):
                hidden = self.piecewise.run(fb)
        elif prompt is None:
            return self.model(fb)
        else:
            hidden = self.model.model(fb.input_ids, fb.positions, fb)
        if prompt is not None:
            compute_prompt_logprobs(prompt, hidden, self.model.logits)
        return self.model.logits(hidden[fb.logits_idx])

    def prepare(self, reqs: list[Req], is_decode: bool, decode_tail: int = 0) -> ForwardBatch:
        """The batch's index tensors, packed into one CPU buffer and sent to the device in one copy: each
        to_device costs a pinned staging buffer and a launch, which at a ~3 ms decode step add up per
        tensor. Every part starts 16-byte aligned (an even int64 offset), as a tensor of its own would:
        Triton specialises kernels on pointer alignment and Inductor copies misaligned inputs."""
        n, dev = len(reqs), self.device
        kv_lens, rows = [r.kv_len for r in reqs], [r.req_pool_idx for r in reqs]
        if is_decode:  # one token per request, at position kv_len: send kv_lens and rows, derive the rest
            packed = to_device(int64_tensor(kv_lens + [0] * (n % 2) + rows), dev)
            positions_d, rows_d = packed[:n], packed[n + n % 2:]
            return ForwardBatch(
                is_decode=True, input_ids=self.last_token[rows_d], positions=positions_d,
                out_slots=self.req_to_token_pool.req_to_token[rows_d, positions_d], req_rows=rows_d,
                seq_lens=positions_d + 1, prefix_lens=positions_d, extend_lens=torch.ones_like(positions_d),
                logits_idx=torch.arange(n, device=dev), max_seq_len=max(kv_lens) + 1, max_extend_len=1,
                kv_pool=self.kv_pool, req_to_token=self.req_to_token_pool.req_to_token, attn=self.attn)
        prefix, extend = int64_tensor(kv_lens), int64_tensor([r.extend_len for r in reqs])
        head = reqs[:n - decode_tail]
        ids = int64_tensor([t for r in head for t in r.fill_ids[r.kv_len:r.kv_len + r.extend_len]] + [0] * decode_tail)
        req_idx = torch.repeat_interleave(torch.arange(n), extend)
        positions = torch.arange(int(extend.sum())) - (torch.cumsum(extend, 0) - extend)[req_idx] + prefix[req_idx]
        rows_t = int64_tensor(rows)
        seq = prefix + extend
        parts = [positions, rows_t[req_idx], ids, rows_t, seq, prefix, extend, torch.cumsum(extend, 0) - 1]
        pad = torch.zeros(1, dtype=torch.int64)
        packed = to_device(torch.cat([t for p in parts for t in (p, pad[:p.numel() % 2])]), dev)
        positions_d, token_rows_d, ids_d, rows_d, seq_d, prefix_d, extend_d, logits_idx_d = (
            chunk[:p.numel()] for chunk, p in zip(packed.split([p.numel() + p.numel() % 2 for p in parts]), parts))
        if decode_tail:  # one token each, at the end of the batch: the previous step's samples
            ids_d[-decode_tail:] = self.last_token[rows_d[-decode_tail:]]
        return ForwardBatch(
            is_decode=False, input_ids=ids_d, positions=positions_d,
            out_slots=self.req_to_token_pool.req_to_token[token_rows_d, positions_d], req_rows=rows_d,
            seq_lens=seq_d, prefix_lens=prefix_d, extend_lens=extend_d, logits_idx=logits_idx_d,
            max_seq_len=int(seq.max()), max_extend_len=int(extend.max()),
            kv_pool=self.kv_pool, req_to_token=self.req_to_token_pool.req_to_token, attn=self.attn,
            decode_tail=decode_tail)
