"""The scheduler's prefix cache, chosen from the flags: naive, radix, or HiCache's radix tree over tiers."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from radixserve.args import ServerArgs
from radixserve.kvcache.allocator import PageAllocator
from radixserve.kvcache.hiradix_cache import HiCacheConfig, HiRadixCache
from radixserve.kvcache.naive_cache import NaiveCache
from radixserve.kvcache.radix_cache import RadixCache

logger = logging.getLogger("radixserve.scheduler")
GB = 1 << 30
PAGE_FORMAT = 1  # bump when the file tier's page layout changes: old pages then never match


def model_identity(args: ServerArgs, runner: Any) -> dict:
    """What a page's KV depends on besides its tokens: file pages written under another identity never match."""
    cfg = {f.name: getattr(runner.cfg, f.name) for f in dataclasses.fields(runner.cfg)
           if f.name not in ("hf_config", "quant")}
    quant = runner.cfg.quant  # by what it computes: the object's repr carries its address, new every process
    return {"format": PAGE_FORMAT, "model": args.model, "load_format": args.load_format,
            "quantization": f"{quant.name}: {quant.describe()}" if quant is not None else None,
            "seed": args.seed if args.load_format == "dummy" else None, "config": cfg,
            "dtype": str(runner.dtype), "kv_dtype": str(runner.kv_pool.k[0].dtype), "page_size": args.page_size,
            "tp_rank": runner.tp.rank, "tp_size": runner.tp.size}


def make_cache(args: ServerArgs, allocator: PageAllocator, runner: Any) -> NaiveCache | RadixCache:
    if args.disable_radix_cache:
        return NaiveCache(allocator, args.page_size)
    if not args.enable_hierarchical_cache:
        return RadixCache(allocator, args.page_size)
    pool = runner.kv_pool
    per_token = sum(2 * b[0].numel() * b.element_size() for b in pool.k)
    host_tokens = (int(args.hicache_size * GB // per_token) if args.hicache_size
                   else int(allocator.capacity_tokens * args.hicache_ratio))
    storage = args.hicache_storage_dir if args.hicache_storage_backend == "file" else None
    cfg = HiCacheConfig(host_tokens, args.hicache_write_policy, args.hicache_io_backend,
                        args.hicache_storage_prefetch_policy, storage, model_identity(args, runner))
    cache = HiRadixCache(allocator, args.page_size, pool.k, pool.v, runner.device, cfg, kv_pool=pool)
    logger.info(f"HiCache: host pool {cache.host.capacity_tokens} tokens ({host_tokens * per_token / GB:.2f} GB), "
                f"write policy {cfg.write_policy}, io backend {cache.transfer.io_backend}, storage "
                f"{'file ' + storage if storage else 'none'}, prefetch policy {cfg.prefetch_policy}")
    return cache
