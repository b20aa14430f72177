"""ServerArgs: every flag, in SGLang's and Mini-SGLang's spellings, in one dataclass.

Configuration flows from here into constructors; nothing deeper reads the environment. A flag
whose feature is not built yet fails at start-up with a message instead of being ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: spawned children re-import this module
    import torch


#: device nodes without which no GPU can be visible to torch (NVIDIA, WSL's GPU paravirtualisation, ROCm)
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: an address only this machine reaches (a name is taken for a remote host)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch on a machine with no GPU device node: the launcher
    parses its flags before it spawns the scheduler, and importing torch there (~2.5 s on the 2-core test
    machine) would delay every child's start by as much."""
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return False
    import torch
    return torch.cuda.is_available()


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
    max_request_body_mb: float = 32.0
    shutdown_grace_period: float = 30.0
    allow_overwrite_longer_context_len: bool = False
    log_level: str = "info"
    # memory
    mem_fraction_static: float | str | None = None  # "auto": engine/auto_memory.py picks it
    mem_fraction_auto: bool = False  # set from mem_fraction_static="auto", not a flag of its own
    max_total_tokens: int | None = None
    page_size: int = 1
    cache: str = "radix"
    kv_cache_dtype: str = "auto"
    cpu_weight_dtype: str = "auto"
    # scheduling
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float | str = 1.0  # or "auto": scheduler/conservativeness.py moves it
    decode_log_interval: int = 40
    enable_mixed_chunk: bool = False
    stream_interval: int = 1
    # kernels and graphs
    attention_backend: str | None = None
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    disable_pdl: bool = False
    disable_overlap_schedule: bool = False
    enable_overlap_schedule: bool = False
    enable_torch_compile: bool = False
    torch_compile_max_bs: int = 32
    enable_piecewise_cuda_graph: bool = False
    piecewise_cuda_graph_max_tokens: int = 4096
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
    enable_request_time_stats_logging: bool = False
    # the API: constrained decoding, tool calls, reasoning, chat templates, where models come from
    grammar_backend: str | None = None  # llguidance where it is installed, else none
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    chat_template: str | None = None
    log_requests: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    model_source: str = "huggingface"
    # HiCache: the radix tree over device -> host memory -> file storage
    enable_hierarchical_cache: bool = False
    hicache_ratio: float = 2.0
    hicache_size: float = 0  # GB of host memory per rank; 0: use --hicache-ratio
    hicache_write_policy: str = "write_through"
    hicache_io_backend: str = "kernel"
    hicache_storage_backend: str | None = None
    hicache_storage_dir: str = "/tmp/hicache"
    hicache_storage_prefetch_policy: str = "best_effort"
    # PD disaggregation (radixserve/disaggregation/)
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = 8998
    disaggregation_transfer_backend: str = "tcp"
    disaggregation_waiting_timeout: float = 300.0  # SGLang: $SGLANG_DISAGGREGATION_WAITING_TIMEOUT
    disaggregation_decode_enable_offload_kvcache: bool = False

    def __post_init__(self) -> None:
        self.check_supported()
        if self.device == "auto":
            self.device = "cuda" if cuda_available() else "cpu"
        if self.device == "cuda" and not cuda_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
        if self.attention_backend is None:
            self.attention_backend = "triton" if self.device == "cuda" else "torch"
        if self.mem_fraction_static == "auto":  # a default until the runner measures (auto_memory.py)
            self.mem_fraction_static, self.mem_fraction_auto = None, True
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.88 if self.device == "cuda" else 0.05
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
        if self.schedule_conservativeness != "auto" and not (isinstance(self.schedule_conservativeness, (int, float))
                                                             and self.schedule_conservativeness > 0):
            raise ValueError(f"--schedule-conservativeness must be > 0 or auto, got {self.schedule_conservativeness!r}")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"--schedule-policy {self.schedule_policy!r}: choose fcfs or lpm")
        if self.cache not in ("radix", "naive"):
            raise ValueError(f"--cache {self.cache!r}: choose radix or naive")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"--quantization {self.quantization!r}: choose one of {', '.join(QUANTIZATION_CHOICES)} "
                             f"(or leave it out: pre-quantized FP8 checkpoints are detected from config.json)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            raise ValueError(f"--kv-cache-dtype {self.kv_cache_dtype!r}: choose one of "
                             f"{', '.join(KV_CACHE_DTYPE_CHOICES)}")
        if self.cpu_weight_dtype not in CPU_WEIGHT_DTYPES:
            raise ValueError(f"--cpu-weight-dtype {self.cpu_weight_dtype!r}: choose one of "
                             f"{', '.join(CPU_WEIGHT_DTYPES)}")
        self.check_api()
        if self.max_request_body_mb <= 0:
            raise ValueError(f"--max-request-body-mb must be > 0, got {self.max_request_body_mb}")
        if self.shutdown_grace_period < 0:
            raise ValueError(f"--shutdown-grace-period must be >= 0, got {self.shutdown_grace_period}")
        if os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "").lower() in ("1", "true"):
            self.allow_overwrite_longer_context_len = True  # SGLang's switch for the same override
        self.check_parallel()
        self.check_hicache()
        self.check_disaggregation()

    def check_disaggregation(self) -> None:
        """PD flags. The transfer backends SGLang has for RDMA (mooncake, nixl) and an NCCL one are not built:
        they fail here, naming the one that is."""
        if self.disaggregation_mode not in ("null", "prefill", "decode"):
            raise ValueError(f"--disaggregation-mode {self.disaggregation_mode!r}: choose null, prefill or decode")
        if self.disaggregation_transfer_backend != "tcp":
            raise ValueError(f"--disaggregation-transfer-backend {self.disaggregation_transfer_backend!r} is not "
                             f"available in radixserve; use tcp (works on CPU and GPU, within and across hosts)")
        if not 1 <= self.disaggregation_bootstrap_port <= 65535:
            raise ValueError(f"--disaggregation-bootstrap-port must be in [1, 65535], got "
                             f"{self.disaggregation_bootstrap_port}")
        if not 0 < self.disaggregation_waiting_timeout < float("inf"):
            raise ValueError(f"--disaggregation-waiting-timeout must be a positive number of seconds, got "
                             f"{self.disaggregation_waiting_timeout}")
        if self.disaggregation_mode == "prefill" and self.nnodes > 1 and _is_loopback(self.host) \
                and not _is_loopback(self.dist_init_addr.rpartition(":")[0].strip("[]")):
            # node k > 0 registers its KV senders with the bootstrap server beside rank 0 on node 0, and the decode
            # side connects to every node's senders: a loopback --host on nodes of a real network hides them
            raise ValueError(f"--disaggregation-mode prefill over --nnodes {self.nnodes}: --host {self.host} is "
                             f"loopback, where neither the other nodes (bootstrap server) nor the decode server "
                             f"(KV senders) reach this node; pass --host 0.0.0.0 (or this node's address) on "
                             f"every node")
        if self.disaggregation_decode_enable_offload_kvcache and (
                self.disaggregation_mode != "decode" or self.hicache_storage_backend is None
                or self.hicache_write_policy != "write_through"):
            # the finished requests' KV enters the decode server's radix tree; HiCache's write-through copies
            # every page that enters it to host memory and on to the storage tier
            raise ValueError("--disaggregation-decode-enable-offload-kvcache writes a decode server's finished KV "
                             "to HiCache storage: it needs --disaggregation-mode decode --enable-hierarchical-cache "
                             "--hicache-storage-backend file and --hicache-write-policy write_through (the default)")

    def check_hicache(self) -> None:
        """HiCache flags (SGLang's names and defaults). Storage backends SGLang ships that radixserve does not
        (hf3fs, mooncake, nixl, ...) fail here, at start-up, instead of at the first eviction."""
        if self.hicache_storage_dir == "/tmp/hicache" and os.environ.get("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"):
            self.hicache_storage_dir = os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"]  # SGLang's switch
        choices = {"hicache_write_policy": ("write_through", "write_through_selective", "write_back"),
                   "hicache_io_backend": ("kernel", "direct"),
                   "hicache_storage_prefetch_policy": ("best_effort", "wait_complete", "timeout")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose {', '.join(allowed)}")
        backend = self.hicache_storage_backend
        if backend is not None and backend != "file":
            raise ValueError(f"--hicache-storage-backend {backend!r} is not available in radixserve (SGLang's hf3fs, "
                             f"mooncake, nixl, aibrix, eic need their own services): use `file` with "
                             f"--hicache-storage-dir DIR")
        if not self.enable_hierarchical_cache:
            if backend is not None:
                raise ValueError("--hicache-storage-backend needs --enable-hierarchical-cache")
            return
        if self.cache == "naive":
            raise ValueError("--enable-hierarchical-cache extends the radix cache: drop --disable-radix-cache")
        if backend is not None and self.tp_size > 1:  # file reads finish at different times on each rank
            raise ValueError("--hicache-storage-backend with --tp > 1 is not supported yet (TP ranks must admit "
                             "the same requests, and file prefetches finish at different times): drop one of them")
        if self.hicache_size < 0 or (not self.hicache_size and self.hicache_ratio <= 1):
            raise ValueError(f"--hicache-ratio {self.hicache_ratio}: the host pool must be larger than the device "
                             f"pool (ratio > 1), or give --hicache-size GB")

    def check_api(self) -> None:
        if self.grammar_backend is None:  # a GPU host without the wheel still serves, unconstrained
            self.grammar_backend = "llguidance" if importlib.util.find_spec("llguidance") else "none"
        elif self.grammar_backend == "llguidance" and not importlib.util.find_spec("llguidance"):
            raise ValueError("--grammar-backend llguidance: the llguidance package is not installed; "
                             "`pip install llguidance`, or pass --grammar-backend none")
        choices = {"grammar_backend": GRAMMAR_BACKENDS, "tool_call_parser": TOOL_CALL_PARSERS,
                   "reasoning_parser": REASONING_PARSERS, "model_source": MODEL_SOURCES}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}")

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
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {self.stream_interval}")
        if self.piecewise_cuda_graph_max_tokens < 1:
            raise ValueError(f"--piecewise-cuda-graph-max-tokens must be >= 1, got "
                             f"{self.piecewise_cuda_graph_max_tokens}")

    def loggable(self) -> str:
        """`ServerArgs(field=value, ...)` for SGLang's `server_args=` start-up log line, the API key masked."""
        fields = {**dataclasses.asdict(self), "api_key": "***" if self.api_key else None}
        return "ServerArgs(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    def check_supported(self) -> None:
        unsupported = {
            "--enable-dp-attention": self.enable_dp_attention,
            "--enable-torch-compile with --tp > 1": self.enable_torch_compile and self.tp_size > 1,
            # each rank would run its own clock-driven controller; ranks must schedule in lock-step
            "--schedule-conservativeness auto with --tp > 1": self.schedule_conservativeness == "auto"
            and self.tp_size > 1,
        }
        bad = [name for name, used in unsupported.items() if used]
        if bad:
            raise ValueError(f"not supported yet in radixserve: {', '.join(bad)}; remove the flag")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

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


QUANTIZATION_CHOICES = ("fp8",)  # layers/quantization QUANT_CONFIGS (args stays import-light)
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8_e4m3", "fp8_e5m2")  # kvcache/pool KV_CACHE_DTYPES
CPU_WEIGHT_DTYPES = ("auto", "float32", "float16", "int4")  # layers/quantization.cpu_weight_config
GRAMMAR_BACKENDS = ("llguidance", "none")
TOOL_CALL_PARSERS = ("llama3", "qwen25", "hermes", "mistral", "pythonic")
REASONING_PARSERS = ("qwen3", "deepseek-r1")
MODEL_SOURCES = ("huggingface", "modelscope")


def float_or_auto(value: str) -> float | str:
    """argparse type of the flags that take a number or `auto`."""
    return "auto" if value == "auto" else float(value)


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
    (["--context-length", "--max-model-len"], dict(type=int, dest="context_length", help="Max tokens per "
                                                   "request (prompt + output); default: the model's "
                                                   "max_position_embeddings. --max-model-len is vLLM's name.")),
    (["--host"], dict(help="HTTP host (default 127.0.0.1).")),
    (["--port"], dict(type=int, help="HTTP port (default 1919).")),
    (["--api-key"], dict(help="Require `Authorization: Bearer KEY` on every endpoint but /health.")),
    (["--shell"], dict(action="store_true", help="Interactive chat in the terminal instead of a server.")),
    (["--max-request-body-mb"], dict(type=float, help="Largest HTTP request body accepted, in MB (default 32); "
                                     "larger ones get 413 before they are read.")),
    (["--shutdown-grace-period"], dict(type=float, help="On SIGTERM: seconds in-flight requests get to finish "
                                       "while new ones are refused with 503 (default 30); what is left then ends "
                                       "with an error. A second signal, or SIGINT, stops at once.")),
    (["--allow-overwrite-longer-context-len"], dict(action="store_true", help="Accept a --context-length above "
                                                    "the model's max_position_embeddings (outputs past it may "
                                                    "degrade); also set by SGLang's "
                                                    "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1.")),
    (["--log-level"], dict(help="debug, info, warning.")),
    (["--mem-fraction-static"], dict(type=float_or_auto, help="Share of device memory for weights + KV cache, "
                                     "or auto: on a GPU, the share that leaves the tuning guide's 6.5 GB (or "
                                     "the model's estimated activation peak, if larger) free after weights + KV; "
                                     "on CPU, the default rule. "
                                     "(GPU default 0.88). On CPU: the most of RAM the KV cache may take "
                                     "(default 0.05); the pool holds 8 full-context requests within that.")),
    (["--max-total-tokens"], dict(type=int, help="KV pool size in tokens (overrides --mem-fraction-static).")),
    (["--page-size"], dict(type=int, help="Tokens per KV page (1 = token-granular prefix matching).")),
    (["--cache"], dict(choices=["radix", "naive"], help="Prefix cache: radix (reuse) or naive (none).")),
    (["--disable-radix-cache"], dict(action="store_const", const="naive", dest="cache",
                                     help="Same as --cache naive.")),
    (["--kv-cache-dtype"], dict(help="KV cache storage: auto (the model dtype), fp8_e4m3 or fp8_e5m2 (one byte "
                                "per value: twice the tokens of bf16 in the same memory, 4x float32 on CPU; a "
                                "per-layer scale from the checkpoint's k_scale/v_scale, else 1.0). e4m3 keeps "
                                "more precision, e5m2 more range.")),
    (["--cpu-weight-dtype"], dict(help="CPU only: how the decoder's linear layers and the LM head store their "
                                  "weights when the model runs in float32. float16: packed for FBGEMM's fp16 "
                                  "GEMM (float32 activations and sums), half the bytes a decode step reads and "
                                  "~3x faster on AVX2 CPUs, logits within 0.05 of float32. int4: as float16, and "
                                  "a GGUF's Q4_0/Q4_1 matrices also kept at 4 bits for decode batches of <= 4 "
                                  "rows (torch's int4 kernel, bfloat16 matmul inputs: logits within 1.0 of "
                                  "float32, ~1.5x faster at batch 1). float32: exact. auto (default): int4 where "
                                  "torch has FBGEMM and the int4 kernel (x86), else float32. The start-up line "
                                  "says what was chosen.")),
    (["--max-running-requests"], dict(type=int, help="Max requests decoding at once.")),
    (["--chunked-prefill-size", "--max-prefill-length"], dict(type=int, dest="chunked_prefill_size",
                                                              help="Max prompt tokens computed per step; "
                                                              "longer prompts are split. -1 disables.")),
    (["--max-prefill-tokens"], dict(type=int, help="Token budget of one prefill batch (default 16384).")),
    (["--schedule-policy"], dict(choices=["fcfs", "lpm"], help="fcfs, or lpm: longest cached prefix first.")),
    (["--schedule-conservativeness"], dict(type=float_or_auto, help="Scales the KV reserved for running "
                                           "requests' future tokens: lower admits more, higher retracts less "
                                           "(default 1.0). auto: start at 1.0, lower it while token usage < 0.93 "
                                           "with requests waiting and no retraction in the last minute (a "
                                           "request lifetime apart, once usage stopped rising), raise it x1.25 on "
                                           "each retraction, within [0.0005, 2.0]; "
                                           "new requests are admitted at the same ratio as running ones; each "
                                           "change is logged.")),
    (["--decode-log-interval"], dict(type=int, help="Print the decode log line every N steps (default 40).")),
    (["--enable-mixed-chunk"], dict(action="store_true", help="Run the decode step of running requests in the "
                                    "same forward as a prefill chunk, so streams keep producing tokens while "
                                    "long prompts are prefilled (the chunk budget shrinks by one token per "
                                    "running request).")),
    (["--stream-interval"], dict(type=int, help="Send a streamed request's tokens every N tokens (default 1: "
                                 "one SSE chunk per generated token); larger values send fewer, bigger chunks "
                                 "and cost the API server less CPU.")),
    (["--attention-backend", "--attn"], dict(dest="attention_backend", help="torch or triton (default: "
                                             "triton on CUDA, torch on CPU).")),
    (["--cuda-graph-max-bs"], dict(type=int, help="Largest decode batch captured in a CUDA graph.")),
    (["--disable-cuda-graph"], dict(action="store_true", help="Run decode eagerly.")),
    (["--disable-pdl"], dict(action="store_true", help="Do not use programmatic dependent launch (on by default "
                             "on Hopper and later: a decode GEMV becomes resident and prefetches its weights "
                             "while the small kernel before it runs; not used with torch.compile or piecewise "
                             "CUDA graphs).")),
    (["--disable-overlap-schedule"], dict(action="store_true", help="Do not overlap CPU scheduling with GPU.")),
    (["--enable-overlap-schedule"], dict(action="store_true", help="Overlap on CPU too (default: only on CUDA).")),
    (["--enable-torch-compile"], dict(action="store_true", help="torch.compile the decode forward for batches up "
                                      "to --torch-compile-max-bs (fuses the small kernels of small models; slower "
                                      "start-up: one compile per batch size).")),
    (["--torch-compile-max-bs"], dict(type=int, help="Largest decode batch that runs compiled (default 32).")),
    (["--enable-piecewise-cuda-graph"], dict(action="store_true", help="Prefill/extend batches of up to "
                                             "--piecewise-cuda-graph-max-tokens tokens replay CUDA graphs of the "
                                             "layers between attention calls (attention runs eagerly between "
                                             "them): removes the kernel-launch gaps that dominate short "
                                             "prompts. On CPU the same split runs without graphs.")),
    (["--piecewise-cuda-graph-max-tokens"], dict(type=int, help="Largest extend batch (tokens) that runs "
                                                 "piecewise graphs (default 4096); token counts are padded to "
                                                 "the next captured size.")),
    (["--quantization"], dict(help="fp8: quantize every linear layer of the decoder (and an untied LM head) to "
                              "float8_e4m3 at load, one scale per output channel (the embedding and a tied "
                              "head stay in --dtype); halves the "
                              "weight bytes a decode step reads. Needs a GPU of compute capability >= 8.9 or "
                              "CPU. Pre-quantized FP8 checkpoints (config.json quantization_config "
                              "quant_method fp8) need no flag.")),
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
    (["--enable-request-time-stats-logging"], dict(action="store_true", help="Timestamp every request at "
                                                   "each hop (HTTP receive, tokenize, scheduler queue, first "
                                                   "forward, first token, detokenizer, SSE write): a histogram "
                                                   "per hop in /metrics (with --enable-metrics) and a debug log "
                                                   "line per request.")),
    (["--enable-cache-report"], dict(action="store_true", help="Log prefix-cache hit rates; report cached "
                                     "tokens in usage.")),
    (["--model-source"], dict(help="Where a hub id given to --model is found: huggingface (the local HF cache "
                              "first, then a download unless HF_HUB_OFFLINE=1) or modelscope (needs the "
                              "modelscope package).")),
    (["--revision"], dict(help="Branch, tag or commit of a hub model id (default: main).")),
    (["--trust-remote-code"], dict(action="store_true", help="Accepted for compatibility; radixserve never runs "
                                   "code shipped with a model (every architecture it serves is built in).")),
    (["--chat-template"], dict(help="Chat template for /v1/chat/completions: a Jinja file, a Jinja string, or "
                               "a built-in name (chatml, llama3); default: the tokenizer's.")),
    (["--tool-call-parser"], dict(help="How tool calls are written in the model's output: llama3, qwen25 / "
                                  "hermes (<tool_call> JSON), mistral ([TOOL_CALLS]) or pythonic "
                                  "([f(x=1)]). Default: hermes.")),
    (["--reasoning-parser"], dict(help="Split <think>...</think> text into reasoning_content: qwen3 or "
                                  "deepseek-r1 (whose template opens the think block itself).")),
    (["--grammar-backend"], dict(help="Constrained decoding (response_format, regex, ebnf, forced tool "
                                 "calls): llguidance (default where it is installed) or none.")),
    (["--log-requests"], dict(action="store_true", help="Log one line per request: its sampling parameters, "
                              "grammar kind and prompt lengths (never the prompt text).")),
    (["--enable-hierarchical-cache"], dict(action="store_true", help="HiCache: pages the device pool evicts keep "
                                           "their KV in host memory (and optionally files), so a returning prefix "
                                           "costs a copy instead of a prefill.")),
    (["--hicache-ratio"], dict(type=float, help="Host KV pool size as a multiple of the device pool (default 2; "
                               "must be > 1).")),
    (["--hicache-size"], dict(type=float, help="Host KV pool size in GB per rank; overrides --hicache-ratio "
                              "(default 0: use the ratio).")),
    (["--hicache-write-policy"], dict(choices=["write_through", "write_through_selective", "write_back"],
                                      help="When device pages get a host copy: write_through (default) when they "
                                      "enter the cache; write_through_selective when first reused; write_back only "
                                      "when the device evicts them.")),
    (["--hicache-io-backend"], dict(choices=["kernel", "direct"], help="Host<->device copies on CUDA: kernel "
                                    "(default; one Triton kernel per layer reads/writes pinned host memory) or "
                                    "direct (gather, one copy, scatter). CPU uses plain copies.")),
    (["--hicache-storage-backend"], dict(help="Third tier under the host pool: `file` (pages as files in "
                                         "--hicache-storage-dir, reused by restarted servers). SGLang's hf3fs, "
                                         "mooncake, nixl are not available.")),
    (["--hicache-storage-dir"], dict(help="Directory of the file backend (default /tmp/hicache, or "
                                     "$SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR).")),
    (["--hicache-storage-prefetch-policy"], dict(choices=["best_effort", "wait_complete", "timeout"],
                                                 help="Whether a request whose prefix is being read from storage "
                                                 "waits: best_effort (default) never; wait_complete until read; "
                                                 "timeout at most 1 s + 0.25 s per 1k tokens.")),
    (["--disaggregation-mode"], dict(choices=["null", "prefill", "decode"], help="PD disaggregation: prefill "
                                     "servers compute prompts' KV and send it to decode servers, which generate "
                                     "from it; SGLang's gateway (--pd-disaggregation) pairs them per request. "
                                     "null (default): a plain server.")),
    (["--disaggregation-bootstrap-port"], dict(type=int, help="Prefill server: port of its bootstrap server, "
                                               "where decode servers ask where its KV comes from (default 8998; "
                                               "give it to the gateway: --prefill URL PORT).")),
    (["--disaggregation-transfer-backend"], dict(choices=["tcp"], help="How KV moves from prefill to decode: "
                                                 "tcp (default; any device, within and across hosts).")),
    (["--disaggregation-waiting-timeout"], dict(type=float, help="Seconds a decode server waits for a "
                                                "request's KV (and a prefill server keeps KV no decode server "
                                                "fetched) before failing the request (default 300).")),
    (["--disaggregation-decode-enable-offload-kvcache"], dict(action="store_true", help="Decode server: write "
                                                               "finished requests' KV to HiCache storage (needs "
                                                               "--enable-hierarchical-cache --hicache-storage-"
                                                               "backend file), where later servers find it.")),
]


def make_parser(prog: str = "python -m radixserve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="radixserve: an OpenAI-compatible LLM server.",
                                     argument_default=argparse.SUPPRESS)
    for flags, kwargs in _FLAGS:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--version", action="version", version=f"radixserve {package_version()}")
    return parser


def package_version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("radixserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = make_parser()
    ns = vars(parser.parse_args(argv))
    try:
        return ServerArgs(**ns)
    except ValueError as e:
        parser.error(str(e))


def replace(args: ServerArgs, **changes) -> ServerArgs:
    return dataclasses.replace(args, **changes)
