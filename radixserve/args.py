"""ServerArgs: every flag, in SGLang's and Mini-SGLang's spellings, in one dataclass.

Configuration flows from here into constructors; nothing deeper reads the environment. A flag
whose feature is not built yet fails at start-up with a message instead of being ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

import torch


@dataclass
class ServerArgs:
    model: str | None = None
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    load_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    context_length: int | None = None
    host: str = "127.0.0.1"
    port: int = 1919
    api_key: str | None = None
    shell: bool = False
    log_level: str = "info"
    # memory
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    page_size: int = 1
    cache: str = "radix"
    kv_cache_dtype: str = "auto"
    # scheduling
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0
    decode_log_interval: int = 40
    # kernels and graphs
    attention_backend: str | None = None
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False
    enable_overlap_schedule: bool = False
    enable_torch_compile: bool = False
    torch_compile_max_bs: int = 32
    quantization: str | None = None
    # parallelism
    tp_size: int = 1
    ep_size: int = 1
    dp_size: int = 1
    load_balance_method: str = "shortest_queue"
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    dist_timeout: int | None = None  # seconds; default $NCCL_TIMEOUT or 1800
    cpu_threads: int | None = None  # torch threads per rank process on CPU; default cores / local ranks
    enable_dp_attention: bool = False
    # observability
    enable_metrics: bool = False
    enable_cache_report: bool = False
    # features of the tuning guide that radixserve does not have yet
    model_source: str = "huggingface"
    enable_hierarchical_cache: bool = False
    hicache_ratio: float = 2.0
    hicache_storage_backend: str | None = None
    disaggregation_mode: str = "null"
    disaggregation_decode_enable_offload_kvcache: bool = False

    def __post_init__(self) -> None:
        self.check_supported()
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
        if self.attention_backend is None:
            self.attention_backend = "triton" if self.device == "cuda" else "torch"
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.88 if self.device == "cuda" else 0.3
        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = 8192 if self.device == "cuda" else 2048
        if self.chunked_prefill_size <= 0:  # SGLang: -1 disables chunking
            self.chunked_prefill_size = 1 << 30
        if self.page_size < 1:
            raise ValueError(f"--page-size must be >= 1, got {self.page_size}")
        if self.chunked_prefill_size < self.page_size:
            raise ValueError(f"--chunked-prefill-size ({self.chunked_prefill_size}) must be >= --page-size "
                             f"({self.page_size}): a chunk ends on a page boundary")
        if not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"--schedule-policy {self.schedule_policy!r}: choose fcfs or lpm")
        if self.cache not in ("radix", "naive"):
            raise ValueError(f"--cache {self.cache!r}: choose radix or naive")
        self.check_parallel()

    def check_parallel(self) -> None:
        """The shape of the rank layout; what needs the model (heads) or the GPUs is checked by the launcher
        (distributed.bootstrap.check_layout) before any rank starts."""
        tp = self.tp_size
        if tp < 1 or tp & (tp - 1):
            raise ValueError(f"--tp {tp}: the TP size must be a power of two (1, 2, 4, 8, ...)")
        if self.dp_size < 1:
            raise ValueError(f"--dp-size must be >= 1, got {self.dp_size}")
        if self.ep_size != 1 and self.ep_size != tp:
            raise ValueError(f"--ep-size {self.ep_size} must equal --tp {tp} (as in SGLang: the experts are "
                             f"spread over the TP ranks while attention stays tensor-parallel); use --ep-size {tp} "
                             f"or leave it at 1")
        if self.load_balance_method not in ("round_robin", "shortest_queue", "prefix"):
            raise ValueError(f"--load-balance-method {self.load_balance_method!r}: choose round_robin, "
                             f"shortest_queue or prefix")
        if self.nnodes < 1 or tp % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must divide --tp {tp}: every node runs tp/nnodes ranks "
                             f"of each TP group")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be in [0, {self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, the same on "
                             "every node)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--dist-init-addr {self.dist_init_addr!r}: expected HOST:PORT")
        if self.dist_timeout is None:
            self.dist_timeout = int(os.environ.get("NCCL_TIMEOUT", "1800"))
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be >= 1, got {self.cpu_threads}")
        if self.torch_compile_max_bs < 1:
            raise ValueError(f"--torch-compile-max-bs must be >= 1, got {self.torch_compile_max_bs}")

    def check_supported(self) -> None:
        unsupported = {
            "--enable-dp-attention": self.enable_dp_attention,
            "--quantization": self.quantization is not None,
            "--kv-cache-dtype other than auto": self.kv_cache_dtype != "auto",
            "--model-source other than huggingface (local paths only)": self.model_source != "huggingface",
            "--enable-hierarchical-cache / --hicache-storage-backend": self.enable_hierarchical_cache
            or self.hicache_storage_backend is not None,
            "--disaggregation-mode": self.disaggregation_mode != "null"
            or self.disaggregation_decode_enable_offload_kvcache,
            "--enable-torch-compile with --tp > 1": self.enable_torch_compile and self.tp_size > 1,
        }
        bad = [name for name, used in unsupported.items() if used]
        if bad:
            raise ValueError(f"not supported yet in radixserve: {', '.join(bad)}; remove the flag")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        names = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "half": torch.float16}
        if self.dtype not in names:
            raise ValueError(f"--dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")
        return names[self.dtype]

    @property
    def overlap_schedule(self) -> bool:
        """Overlap is on by default on CUDA; on CPU there is nothing to overlap with, so it is opt-in
        (tests exercise the same code path by forcing it)."""
        return not self.disable_overlap_schedule and (self.device == "cuda" or self.enable_overlap_schedule)

    @property
    def disable_radix_cache(self) -> bool:
        return self.cache == "naive"


# (flags, dest, kwargs) — the first flag is SGLang's spelling, the rest aliases (Mini-SGLang's).
_FLAGS: list[tuple[list[str], dict]] = [
    (["--model-path", "--model"], dict(dest="model", help="HF model directory, a .gguf file, or a preset "
                                       "name with --load-format dummy. Default: the bundled SmolLM2-135M.")),
    (["--tokenizer-path"], dict(help="Tokenizer directory if it differs from --model.")),
    (["--served-model-name"], dict(help="Model name reported by /v1/models and accepted in requests.")),
    (["--load-format"], dict(choices=["auto", "dummy"], help="auto: read weights; dummy: random weights "
                             "with the real shapes (benchmarks).")),
    (["--device"], dict(choices=["auto", "cpu", "cuda"], help="Where to run; auto picks cuda if visible.")),
    (["--dtype"], dict(help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16.")),
    (["--seed"], dict(type=int, help="Seed for requests that do not set their own.")),
    (["--context-length"], dict(type=int, help="Max tokens per request (prompt + output); default: the "
                                "model's max_position_embeddings.")),
    (["--host"], dict(help="HTTP host (default 127.0.0.1).")),
    (["--port"], dict(type=int, help="HTTP port (default 1919).")),
    (["--api-key"], dict(help="Require `Authorization: Bearer KEY` on every endpoint but /health.")),
    (["--shell"], dict(action="store_true", help="Interactive chat in the terminal instead of a server.")),
    (["--log-level"], dict(help="debug, info, warning.")),
    (["--mem-fraction-static"], dict(type=float, help="Share of device memory for weights + KV cache "
                                     "(GPU default 0.88; CPU: share of RAM, default 0.3).")),
    (["--max-total-tokens"], dict(type=int, help="KV pool size in tokens (overrides --mem-fraction-static).")),
    (["--page-size"], dict(type=int, help="Tokens per KV page (1 = token-granular prefix matching).")),
    (["--cache"], dict(choices=["radix", "naive"], help="Prefix cache: radix (reuse) or naive (none).")),
    (["--disable-radix-cache"], dict(action="store_const", const="naive", dest="cache",
                                     help="Same as --cache naive.")),
    (["--kv-cache-dtype"], dict(help="KV cache dtype (only auto is supported).")),
    (["--max-running-requests"], dict(type=int, help="Max requests decoding at once.")),
    (["--chunked-prefill-size", "--max-prefill-length"], dict(type=int, dest="chunked_prefill_size",
                                                              help="Max prompt tokens computed per step; "
                                                              "longer prompts are split. -1 disables.")),
    (["--max-prefill-tokens"], dict(type=int, help="Token budget of one prefill batch (default 16384).")),
    (["--schedule-policy"], dict(choices=["fcfs", "lpm"], help="fcfs, or lpm: longest cached prefix first.")),
    (["--schedule-conservativeness"], dict(type=float, help="Scales the KV reserved for running requests' "
                                           "future tokens: lower admits more, higher retracts less.")),
    (["--decode-log-interval"], dict(type=int, help="Print the decode log line every N steps (default 40).")),
    (["--attention-backend", "--attn"], dict(dest="attention_backend", help="torch or triton (default: "
                                             "triton on CUDA, torch on CPU).")),
    (["--cuda-graph-max-bs"], dict(type=int, help="Largest decode batch captured in a CUDA graph.")),
    (["--disable-cuda-graph"], dict(action="store_true", help="Run decode eagerly.")),
    (["--disable-overlap-schedule"], dict(action="store_true", help="Do not overlap CPU scheduling with GPU.")),
    (["--enable-overlap-schedule"], dict(action="store_true", help="Overlap on CPU too (default: only on CUDA).")),
    (["--enable-torch-compile"], dict(action="store_true", help="torch.compile the decode forward for batches up "
                                      "to --torch-compile-max-bs (fuses the small kernels of small models; slower "
                                      "start-up: one compile per batch size).")),
    (["--torch-compile-max-bs"], dict(type=int, help="Largest decode batch that runs compiled (default 32).")),
    (["--quantization"], dict(help="Weight quantization (not supported yet).")),
    (["--tp-size", "--tp"], dict(type=int, dest="tp_size", help="Tensor-parallel ranks (GPUs) per replica; "
                                 "a power of two that divides the attention heads.")),
    (["--ep-size", "--ep"], dict(type=int, dest="ep_size", help="Expert parallelism for MoE models: equal to "
                                 "--tp, each rank then holds E/tp whole experts instead of a 1/tp slice of every "
                                 "expert (attention stays tensor-parallel). Default 1.")),
    (["--dp-size"], dict(type=int, help="Data-parallel replicas, each with its own TP group, behind one API "
                         "server.")),
    (["--load-balance-method"], dict(choices=["round_robin", "shortest_queue", "prefix"],
                                     help="How --dp-size replicas share requests: shortest_queue (default: "
                                     "fewest requests in flight), round_robin, or prefix (the replica that "
                                     "served the longest common prefix, for radix-cache hits).")),
    (["--nnodes"], dict(type=int, help="Number of nodes a TP group spans.")),
    (["--node-rank"], dict(type=int, help="This node's rank (0 runs the HTTP server).")),
    (["--dist-init-addr"], dict(help="HOST:PORT of node 0's torch.distributed store (needed with --nnodes > "
                                "1; replica d uses PORT+d).")),
    (["--dist-timeout"], dict(type=int, help="Seconds a rank waits in a collective (model loading included) "
                              "before failing; default $NCCL_TIMEOUT or 1800.")),
    (["--cpu-threads"], dict(type=int, help="torch threads per rank process on CPU (default: cores / ranks "
                             "on this node).")),
    (["--enable-dp-attention"], dict(action="store_true", help="DP attention (DeepSeek; not supported).")),
    (["--enable-metrics"], dict(action="store_true", help="Expose Prometheus metrics on /metrics.")),
    (["--enable-cache-report"], dict(action="store_true", help="Log prefix-cache hit rates; report cached "
                                     "tokens in usage.")),
    (["--model-source"], dict(help="huggingface (local paths; no downloads at run time).")),
    (["--enable-hierarchical-cache"], dict(action="store_true", help="HiCache (not supported yet).")),
    (["--hicache-ratio"], dict(type=float, help="HiCache host/device ratio (not supported yet).")),
    (["--hicache-storage-backend"], dict(help="HiCache storage backend (not supported yet).")),
    (["--disaggregation-mode"], dict(help="PD disaggregation (not supported yet).")),
    (["--disaggregation-decode-enable-offload-kvcache"], dict(action="store_true",
                                                               help="PD offload (not supported yet).")),
]


def make_parser(prog: str = "python -m radixserve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="radixserve: an OpenAI-compatible LLM server.",
                                     argument_default=argparse.SUPPRESS)
    for flags, kwargs in _FLAGS:
        parser.add_argument(*flags, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = make_parser()
    ns = vars(parser.parse_args(argv))
    try:
        return ServerArgs(**ns)
    except ValueError as e:
        parser.error(str(e))


def replace(args: ServerArgs, **changes) -> ServerArgs:
    return dataclasses.replace(args, **changes)
