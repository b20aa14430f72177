"""The scheduler: waiting queue → prefill batches → decode batches, one step at a time.

Each `step()` runs at most one forward pass: a prefill batch if the adder admits anything (prefill
has priority, as in SGLang), else one decode step for every running request. KV memory is
reserved for running requests' future tokens via `new_token_ratio`; when a decode step still does
not fit, requests are retracted (their KV handed to the prefix cache) and re-queued.

Prompt logprobs (a request's `logprob_start_len`): each extend step also computes the log_softmax at the
prompt positions its chunks cover (engine/prompt_logprobs.py), and a cached prefix is matched only up to
the first position still to compute, so those positions run through the model again.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from radixserve import request_timing as rt
from radixserve.args import ServerArgs
from radixserve.core import FinishReason, Req
from radixserve.detokenizer import IncrementalDetokenizer, find_stop
from radixserve.disaggregation.decode_queue import DecodeQueue
from radixserve.disaggregation.endpoint import DecodeEndpoint, PrefillEndpoint, make_endpoint
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine.prompt_logprobs import PromptLogprobPlan, plan_step
from radixserve.engine.sampler import SampleOutput, Sampler
from radixserve.grammar.backend import create_backend
from radixserve.grammar.masks import GrammarMasks
from radixserve.kvcache.allocator import PageAllocator
from radixserve.scheduler.cache_factory import make_cache
from radixserve.scheduler.conservativeness import RECOVERY_STEPS, RETRACT_RATIO_FACTOR, AutoConservativeness
from radixserve.scheduler.policy import order_waiting
from radixserve.scheduler.prefill import PrefillAdder, reserved_tokens
from radixserve.scheduler.stats import SchedulerStats
from radixserve.transfer import int64_tensor, to_device


@dataclass
class Launched:
    """A forward pass in flight: its batch, the requests that sample, and their tokens on the way
    to the CPU."""

    batch: list[Req]
    is_decode: bool
    sampled: list[Req]
    out: SampleOutput | None
    ids_cpu: torch.Tensor | None
    copied: torch.cuda.Event | None = None
    # set while sampling waits: a batch with grammar rows samples after the previous step's tokens
    # have advanced the matchers (overlap scheduling), see Scheduler.step
    logits: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    prompt: PromptLogprobPlan | None = None  # prompt logprobs this step computed (on their way to the CPU)


INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO_FACTOR = 0.14
NEW_TOKEN_RATIO_DECAY_STEPS = 600
RETRACT_DECODE_STEPS = 20
IN_BATCH_PREFIX_TOKENS = 32


class Scheduler:
    def __init__(self, args: ServerArgs, runner: ModelRunner, tokenizer: Any = None, dp_rank: int = 0) -> None:
        """`dp_rank`: this engine's replica under --dp-size (a PD prefill rank registers its KV sender under it)."""
        self.args, self.runner, self.tokenizer = args, runner, tokenizer
        self.page_size = args.page_size
        slots = runner.kv_pool.num_slots
        if args.max_total_tokens:  # a scheduler may use less of the pool than the runner allocated (tests)
            slots = min(slots, args.max_total_tokens + args.page_size)
        self.allocator = PageAllocator(slots // args.page_size, args.page_size, runner.device)
        self.cache = make_cache(args, self.allocator, runner)
        self.req_to_token = runner.req_to_token_pool
        self.sampler = Sampler(runner.cfg.vocab_size, runner.device)
        self.eos_ids = frozenset(runner.cfg.eos_token_ids) | (
            frozenset([tokenizer.eos_token_id]) if tokenizer is not None and tokenizer.eos_token_id is not None
            else frozenset())
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.early: list[Req] = []  # finished without running (max_new_tokens=0), reported next step
        # --schedule-conservativeness auto: a controller moves the value from the decode-step metrics
        self.auto_conservativeness = (AutoConservativeness(args.decode_log_interval)
                                      if args.schedule_conservativeness == "auto" else None)
        self.conservativeness = 0.0
        self.set_conservativeness(self.auto_conservativeness.value if self.auto_conservativeness
                                  else args.schedule_conservativeness)
        self.new_token_ratio = self.init_ratio
        self.stats = SchedulerStats(self.allocator.capacity_tokens, args.decode_log_interval,
                                    cache_report=args.enable_cache_report, hicache=args.enable_hierarchical_cache)
        self.rng = random.Random(args.seed)
        self.overlap = args.overlap_schedule
        self.pending: Launched | None = None
        self.max_running = min(args.max_running_requests or runner.max_running_requests,
                               runner.max_running_requests)
        # PD disaggregation (--disaggregation-mode): a prefill server hands each first token's KV to `pd_prefill`;
        # a decode server's requests wait in `pd_decode` until their KV is in the pool
        endpoint = make_endpoint(args, runner.kv_pool, runner.tp.rank, dp_rank, runner.cfg.num_kv_heads)
        self.pd_prefill = endpoint if isinstance(endpoint, PrefillEndpoint) else None
        self.pd_decode = DecodeQueue(self, endpoint) if isinstance(endpoint, DecodeEndpoint) else None
        self.grammar: GrammarMasks | None = None
        if args.grammar_backend != "none":
            # masks filled in this thread, on every device (see LLGuidanceBackend for the measurements)
            backend = create_backend(args.grammar_backend, tokenizer, runner.cfg.vocab_size, sorted(self.eos_ids))
            self.grammar = GrammarMasks(backend, runner.cfg.vocab_size, self.max_running, runner.device)
            if runner.device.type == "cuda":  # the token trie is built while the server starts, not on a request
                backend.warm_up()
        # The last decode batch's req_to_token rows on the device, built by _schedule_decode: the same
        # rows receive the step's sampled tokens in runner.last_token.
        self.decode_rows: torch.Tensor | None = None

    # ---- requests in and out ----------------------------------------------------------------
    def validate(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ValueError (→ HTTP 400) for a request that could never run."""
        ctx, cap = self.runner.context_len, self.allocator.capacity_tokens
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len + max_new_tokens > ctx:
            raise ValueError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                             f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, {max_new_tokens} "
                             f"for the completion). Please reduce the prompt or max_tokens.")
        if prompt_len + max_new_tokens > cap:
            raise ValueError(f"the request needs {prompt_len + max_new_tokens} KV tokens but the pool holds "
                             f"{cap}; raise --max-total-tokens or --mem-fraction-static")

    def add_request(self, req: Req) -> None:
        self.validate(len(req.origin_input_ids), req.sampling_params.max_new_tokens)
        start, n = req.sampling_params.logprob_start_len, len(req.origin_input_ids)
        if start >= n:
            raise ValueError(f"logprob_start_len ({start}) must be less than the prompt length ({n})")
        # a PD decode request's prompt is prefilled on another server: it has no prompt logits here
        pd_decoded = req.bootstrap is not None and self.pd_decode is not None
        req.logprob_pos = n - 1 if start < 0 or pd_decoded else start
        req.eos_token_ids = self.eos_ids
        req.seed = req.sampling_params.seed if req.sampling_params.seed is not None else self.rng.getrandbits(63)
        if req.sampling_params.stop and self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.sampling_params.skip_special_tokens)
        if req.sampling_params.grammar is not None:
            if self.grammar is None:
                raise ValueError("constrained decoding is off (--grammar-backend none)")
            req.grammar = self.grammar.backend.matcher(*req.sampling_params.grammar)  # GrammarError: a 400
        self.stats.prompt_tokens_total += len(req.origin_input_ids)
        self.stats.on_enqueue(req)
        if req.sampling_params.max_new_tokens == 0 and not req.prompt_logprobs_left:
            req.finish_reason = FinishReason.LENGTH
            self.early.append(req)  # (asking for prompt logprobs, it runs a prefill that samples nothing)
        elif pd_decoded:
            self.pd_decode.add(req)  # its prompt's KV comes from a prefill server
        else:
            self.waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        """Drop a request wherever it is and free everything it holds."""
        for queue in (self.waiting, self.running, self.early):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    self._finish(req, FinishReason.ABORT)
                    return req
        if self.chunked is not None and self.chunked.rid == rid:
            req, self.chunked = self.chunked, None
            self._finish(req, FinishReason.ABORT)
            return req
        for req in self.pending.batch if self.pending else []:  # prefilled, first token in flight
            if req.rid == rid and not req.finished:
                self._finish(req, FinishReason.ABORT)
                return req
        return self.pd_decode.abort(rid) if self.pd_decode is not None else None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.early or self.pending) or self.waiting_for_kv

    @property
    def waiting_for_kv(self) -> bool:
        """PD decode: requests wait for KV transfers (another thread's work; the loop polls them)."""
        return bool(self.pd_decode is not None and len(self.pd_decode))

    @property
    def used_tokens(self) -> int:
        return self.allocator.capacity_tokens - self.allocator.free_tokens - self.cache.evictable_size

    def set_conservativeness(self, value: float) -> None:
        """Derive the new_token_ratio schedule (start, floor, decay) from the conservativeness; a ratio
        already decayed is rescaled, so a change acts at once."""
        old, self.conservativeness = self.conservativeness, value
        self.init_ratio = min(INIT_NEW_TOKEN_RATIO * value, 1.0)
        self.min_ratio = min(self.init_ratio * MIN_NEW_TOKEN_RATIO_FACTOR, 1.0)
        self.ratio_decay = (self.init_ratio - self.min_ratio) / NEW_TOKEN_RATIO_DECAY_STEPS
        if old:
            self.new_token_ratio = min(max(self.new_token_ratio * value / old, self.min_ratio), 1.0)
        if old and self.auto_conservativeness is not None:
            # a raise right after a retraction must not put auto back on the slow schedule (at 0.018 the
            # H200 run's reset ratio of 0.15 would have taken ~8,000 steps to decay: usage 0.43 throughout)
            self.ratio_decay = max(self.ratio_decay, (self.new_token_ratio - self.min_ratio) / RECOVERY_STEPS)

    # ---- one scheduling step ------------------------------------------------------------------
    def step(self) -> list[Req]:
        """Run one forward pass. Returns the requests that produced a token or finished.

        With overlap scheduling the results of step N are processed after step N+1 is launched,
        so the CPU work of processing and scheduling hides behind the device's forward pass.
        """
        if self.early:
            early, self.early = self.early, []
            return early
        arrived = self.pd_decode.poll() if self.pd_decode is not None else []  # first tokens from prefill servers
        if arrived:
            return arrived
        launched = self._launch()
        if not self.overlap:
            return self._process(launched) if launched else []
        done = self._process(self.pending) if self.pending else []
        if launched is not None and launched.logits is not None:  # grammar rows: masks need those tokens
            self._sample(launched)
        self.pending = launched
        return done

    def _launch(self) -> Launched | None:
        # --enable-mixed-chunk: while prompts wait, running requests' decode step is scheduled first and
        # rides along with the prefill (SGLang's mixed batch), so streams are not stalled by long prompts
        decode = self._schedule_decode() if self._mix_decode() else []
        batch, is_decode = self._schedule_prefill(len(decode)), False
        mixed = len(decode) if batch else 0
        if batch:
            batch += decode
        elif decode:
            batch, is_decode = decode, True
        elif not self.running:
            return None
        else:
            batch, is_decode = self._schedule_decode(), True
        prompt = None if is_decode else plan_step(batch[:len(batch) - mixed])
        logits = self.runner.forward(batch, is_decode=is_decode, decode_tail=mixed, prompt=prompt)
        if prompt is not None:
            prompt.to_host()
        if is_decode:  # one token each, and every request samples
            for req in batch:
                req.kv_len += 1
            self.stats.on_decode(len(batch), self.used_tokens, len(self.waiting), cuda_graph=self.runner.used_graph)
            auto = self.auto_conservativeness
            if auto is not None and auto.on_decode(self.stats.token_usage(self.used_tokens), len(self.waiting),
                                                   len(batch)):
                self.set_conservativeness(auto.value)
            sampled, sampled_rows = batch, self.decode_rows
        else:
            for req in batch[:len(batch) - mixed]:
                req.kv_len += req.extend_len
                self._cache_running(req)
            for req in batch[len(batch) - mixed:]:
                req.kv_len += 1
            if mixed:
                self.stats.on_decode(mixed, self.used_tokens, len(self.waiting), cuda_graph=False)
            idx = [i for i, r in enumerate(batch) if r.kv_len >= r.seqlen]  # cut prompts sample nothing
            sampled = [batch[i] for i in idx]
            for req in sampled:
                rt.stamp(req, rt.LAUNCHED)
            if not sampled:
                return Launched(batch, is_decode, [], None, None, prompt=prompt)
            dev = self.runner.device
            if len(idx) < len(batch):
                logits = logits[to_device(int64_tensor(idx), dev)]
            sampled_rows = to_device(int64_tensor([r.req_pool_idx for r in sampled]), dev)
        launched = Launched(batch, is_decode, sampled, None, None, logits=logits, rows=sampled_rows, prompt=prompt)
        if not (self.overlap and self.grammar is not None and self.grammar.constrained(sampled)):
            self._sample(launched)
        return launched

    def _sample(self, launched: Launched) -> None:
        """Sample the launched forward's logits (the grammar's bitmask is built here, on the CPU, while
        the device still runs the forward) and start copying the tokens to the host."""
        bitmask = self.grammar.bitmask(launched.sampled) if self.grammar is not None else None
        out = self.sampler.sample(launched.logits, launched.sampled, bitmask)
        self.runner.last_token[launched.rows] = out.next_token_ids
        ids_cpu = out.next_token_ids.to("cpu", non_blocking=True)
        done = None
        if ids_cpu.device != out.next_token_ids.device:  # a non-blocking D2H copy is only valid after this
            done = torch.cuda.Event()
            done.record()
        launched.out, launched.ids_cpu, launched.copied = out, ids_cpu, done
        launched.logits = launched.rows = None

    def _mix_decode(self) -> bool:
        return self.args.enable_mixed_chunk and bool(self.running) and bool(self.waiting or self.chunked)

    def _admission_ratio(self) -> float:
        """The share of a new request's max_new_tokens that admission counts against the pool.

        A fixed --schedule-conservativeness keeps SGLang's rule: 1.0, a new request must find room for its
        whole max_new_tokens, and only running requests are discounted by new_token_ratio. That rule caps
        token usage at (pool - max_new_tokens - reserve) / pool; on the guide's early-stopping workload
        (max_new_tokens 1024, EOS after ~100) it held the H200 run at 0.72 with the ratio at its floor.
        `auto` counts a new request like a running one, at new_token_ratio, because the controller already
        owns the risk that discount takes: a pool that fills retracts, the retraction resets the ratio from
        the running requests' progress, and more than one retraction a minute raises the conservativeness."""
        return self.new_token_ratio if self.auto_conservativeness is not None else 1.0

    def _schedule_prefill(self, mixed: int = 0) -> list[Req]:
        """`mixed`: running requests whose decode step joins this batch; they take that much of the
        batch's token budgets (SGLang's rule)."""
        if self.chunked is None and not self.waiting:
            return []  # nothing to admit: skip the reservation pass over every running request
        reserve = sum(reserved_tokens(r, self.new_token_ratio) for r in self.running)
        if self.chunked is not None:
            reserve += self.chunked.seqlen - self.chunked.kv_len
        adder = PrefillAdder(
            rem_total=self.allocator.free_tokens + self.cache.evictable_size - reserve,
            rem_input=self.args.max_prefill_tokens - mixed,
            rem_chunk=max(self.args.chunked_prefill_size - mixed, self.page_size),
            page_size=self.page_size, slots_left=self.max_running - len(self.running) - (self.chunked is not None),
            new_req_ratio=self._admission_ratio())
        batch: list[Req] = []
        if self.chunked is not None:  # continue the cut prompt before admitting anything new
            req, self.chunked = self.chunked, None
            remaining = req.seqlen - req.kv_len
            req.extend_len = min(remaining, adder.rem_chunk)
            if req.extend_len < remaining:
                req.extend_len = (req.kv_len + req.extend_len) // self.page_size * self.page_size - req.kv_len
                self.chunked = req
            if not self._alloc_extend(req):
                self._retract(req)
                return []
            batch.append(req)
            adder.rem_chunk -= req.extend_len
            adder.rem_input -= req.extend_len
            if self.chunked is not None:
                return batch
        if not self.waiting:
            return batch
        cached, in_batch = 0, set()
        for req in order_waiting(self.waiting, self.args.schedule_policy, self.cache):
            # at least the last token is computed (its logits sample), and every prompt position whose
            # logprob is still wanted: a cached prefix has KV but no logits
            match = self.cache.match_for_admission(
                req.fill_ids[:req.logprob_pos if req.prompt_logprobs_left else -1], req.rid)
            if match is None:  # HiCache: its prefix is still being read from storage (prefetch policy)
                continue
            # In-batch prefix check (SGLang's, for lpm): a request that shares its opening tokens with
            # one admitted in this batch but has no tree hit waits a step; by then the other's prompt
            # is in the tree and this one reuses it instead of recomputing the shared prefix.
            head = tuple(req.origin_input_ids[:IN_BATCH_PREFIX_TOKENS])
            if self.args.schedule_policy == "lpm" and match.length < IN_BATCH_PREFIX_TOKENS and head in in_batch:
                continue
            # Locking the matched prefix takes its unlocked part out of the evictable tokens the budget
            # counted (SGLang locks before its check too); without this, requests whose prompts were
            # cached and unlocked were admitted twice over on those tokens.
            evictable = self.cache.evictable_size
            self.cache.inc_lock(match.node)
            if not adder.add(req, match.length, locked=evictable - self.cache.evictable_size):
                self.cache.dec_lock(match.node)
                break
            if len(head) == IN_BATCH_PREFIX_TOKENS:
                in_batch.add(head)
            req.last_node, req.cached_len = match.node, match.length
            req.req_pool_idx = self.req_to_token.alloc()
            req.slots = match.slots.tolist()
            if match.length:
                self.req_to_token.write(req.req_pool_idx, 0, match.slots)
            req.kv_len = match.length
            if not self._alloc_extend(req):  # the adder's estimate was optimistic: put it back
                self._release(req)
                adder.admitted.remove(req)
                adder.chunked = None
                break
            if req.retracted == 0:
                req.cached_tokens = match.length
                self.cache.record_hit(match.length, len(req.origin_input_ids))
                self.stats.record_hit(match.length, len(req.origin_input_ids), match.host_len, match.storage_len)
            cached += match.length
            self.waiting.remove(req)
            batch.append(req)
            rt.stamp(req, rt.ADMITTED)
            self.stats.on_admit(req)
        self.chunked = self.chunked or adder.chunked
        if batch:
            self.stats.log_prefill(len(batch), sum(r.extend_len for r in batch), cached, self.used_tokens,
                                   len(self.running), len(self.waiting), mixed)
        return batch

    def _alloc_extend(self, req: Req) -> bool:
        """Give `req` slots for positions [kv_len, kv_len + extend_len), evicting cache if needed."""
        need = self.allocator.pages_needed(req.kv_len, req.kv_len + req.extend_len) * self.page_size
        if need > self.allocator.free_tokens:
            self.cache.evict(need - self.allocator.free_tokens)
        if need > self.allocator.free_tokens:
            return False
        last = req.slots[req.kv_len - 1] if req.kv_len else 0
        slots = self.allocator.alloc_extend(req.kv_len, req.kv_len + req.extend_len, last)
        self.req_to_token.write(req.req_pool_idx, req.kv_len, slots)
        req.slots.extend(slots.tolist())
        return True

    def _cache_running(self, req: Req) -> None:
        """Share a prefilled prompt (or chunk) through the cache at once, not only when the request
        finishes: requests admitted meanwhile that share the prefix hit it."""
        m = self.cache.cache_running(req.fill_ids[:req.kv_len], int64_tensor(req.slots[:req.kv_len]),
                                     req.last_node, req.cached_len)
        if m.length > req.cached_len:
            self.req_to_token.write(req.req_pool_idx, 0, m.slots)
            req.slots[:m.length] = m.slots.tolist()
            req.last_node, req.cached_len = m.node, m.length

    def _schedule_decode(self) -> list[Req]:
        """Give every running request the slot of its next token and write it into req_to_token.
        Rows, positions and slots cross to the device in one copy (a fixed cost per copy)."""
        self._ensure_decode_memory()
        reqs = self.running
        kv_lens = int64_tensor([r.kv_len for r in reqs])
        slots = self.allocator.alloc_decode(kv_lens, int64_tensor([r.slots[-1] for r in reqs]))
        rows = int64_tensor([r.req_pool_idx for r in reqs])
        self.decode_rows, kv_lens_d, slots_d = to_device(torch.stack([rows, kv_lens, slots]), self.runner.device)
        self.req_to_token.req_to_token[self.decode_rows, kv_lens_d] = slots_d
        for r, slot in zip(reqs, slots.tolist()):
            r.extend_len = 1
            r.slots.append(slot)
        self.new_token_ratio = max(self.new_token_ratio - self.ratio_decay, self.min_ratio)
        return list(reqs)

    def _decode_need(self, reqs: list[Req]) -> int:
        if self.page_size == 1:  # every new token is a fresh page
            return len(reqs)
        return sum(self.page_size for r in reqs if r.kv_len % self.page_size == 0)

    def _ensure_decode_memory(self) -> None:
        need = self._decode_need(self.running)
        if need > self.allocator.free_tokens:
            self.cache.evict(need - self.allocator.free_tokens)
        if need <= self.allocator.free_tokens:
            return
        # Retract (SGLang's order): fewest generated tokens first, then longest prompt, until the rest
        # can run RETRACT_DECODE_STEPS more steps.
        victims = sorted(self.running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)), reverse=True)
        retracted: list[Req] = []
        while len(victims) > 1:
            steps = sum(min(RETRACT_DECODE_STEPS, r.remaining_new_tokens) for r in victims)
            if self.allocator.free_tokens + self.cache.evictable_size >= max(steps, self._decode_need(victims)):
                break
            req = victims.pop()
            self.running.remove(req)
            self._retract(req)
            retracted.append(req)
        need = self._decode_need(self.running)
        if need > self.allocator.free_tokens:
            self.cache.evict(need - self.allocator.free_tokens)
        if not retracted:
            return
        total_decoded = sum(len(r.output_ids) for r in self.running)
        total_max_new = sum(r.sampling_params.max_new_tokens for r in self.running)
        old = self.new_token_ratio
        if self.auto_conservativeness is None:
            self.new_token_ratio = min(1.0, (total_decoded + RETRACT_DECODE_STEPS * len(self.running))
                                       / (total_max_new + 1))
        else:
            # SGLang's reset above assumes the running requests go on to their max_new_tokens: on the H200
            # early-stopping run it put the ratio at 0.09-0.15 (a reservation of most of the pool) after each
            # retraction. Auto doubles the ratio instead and lets the controller raise its value.
            self.new_token_ratio = min(1.0, old * RETRACT_RATIO_FACTOR)
        self.stats.log_retract(len(retracted), old, self.new_token_ratio)
        if self.auto_conservativeness is not None:
            self.auto_conservativeness.on_retract()
            # A fixed value decays from here at its own schedule's rate, (init - min) / 600 per step, which at
            # the low values auto reaches (0.02: 2e-5) would hold the post-retraction ratio for the rest of
            # the run (on the H200 early-stopping run: token usage 0.55 for 1,300 steps after one
            # retraction). Auto returns to its floor within RECOVERY_STEPS decode steps instead.
            self.set_conservativeness(self.conservativeness)

    def _retract(self, req: Req) -> None:
        """Hand the request's KV to the cache and put it back in the queue; it will re-prefill
        prompt + output so far (mostly as a cache hit) and continue exactly where it was."""
        self._release(req)
        req.retracted += 1
        self.waiting.append(req)

    def _release(self, req: Req) -> None:
        if req.req_pool_idx is None:
            return
        # req.slots may run past kv_len (a step scheduled but never run): those pages are freed too
        self.cache.release(req.fill_ids[:req.kv_len], int64_tensor(req.slots), req.last_node,
                           req.cached_len)
        self.req_to_token.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.kv_len, req.cached_len, req.slots = None, None, 0, 0, []

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finish_reason = reason
        self._release(req)

    # ---- results ------------------------------------------------------------------------------
    def _process(self, launched: Launched) -> list[Req]:
        if launched.prompt is not None:  # before the tokens: a request's first output carries its prompt logprobs
            launched.prompt.deliver()
        if not launched.sampled:
            return []
        if launched.copied is not None:
            launched.copied.synchronize()  # the only wait for the device in a step
        ids = launched.ids_cpu.tolist()
        out = launched.out
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        done, finished, prefill_only = [], [], 0
        prefill = not launched.is_decode
        running = set(self.running) if prefill else set()
        for i, (req, tok) in enumerate(zip(launched.sampled, ids)):
            if req.finish_reason is not None:  # finished (or aborted) while this step was in flight: void
                continue
            rt.stamp(req, rt.READY)
            if prefill and req.sampling_params.max_new_tokens == 0:  # for prompt logprobs only: no token is kept
                req.finish_reason = FinishReason.LENGTH
                finished.append(req)
                done.append(req)
                prefill_only += 1
                continue
            req.output_ids.append(tok)
            if lps is not None and (req.sampling_params.logprobs or req.sampling_params.top_logprobs):
                req.output_logprobs.append(lps[i])
                req.output_top_logprobs.append(out.top_logprobs[i] if out.top_logprobs else [])
            if req.grammar is not None:
                GrammarMasks.advance(req, tok, req.eos_token_ids | frozenset(req.sampling_params.stop_token_ids))
            self._check_finished(req, tok)
            if self.pd_prefill is not None and req.bootstrap is not None and len(req.output_ids) == 1:
                self.pd_prefill.send(req, tok)  # the decode server goes on from here; this server is done
                req.finish_reason = req.finish_reason or FinishReason.LENGTH
            if req.finish_reason is not None:
                finished.append(req)
            elif not launched.is_decode and req not in running:  # a mixed batch's decode part runs already
                self.running.append(req)  # prefill done: decode from the next step
            done.append(req)
        self.stats.generation_tokens_total += len(done) - prefill_only
        if finished:  # one pass over each queue instead of a list.remove per request
            gone = set(finished)
            self.running[:] = [r for r in self.running if r not in gone]
            self.waiting[:] = [r for r in self.waiting if r not in gone]  # waiting: retracted while in flight
            for req in finished:
                self._release(req)
            if self.auto_conservativeness is not None:
                self.auto_conservativeness.on_finish(len(finished))
        return done

    def _check_finished(self, req: Req, tok: int) -> None:
        sp = req.sampling_params
        if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in req.eos_token_ids):
            req.finish_reason = FinishReason.STOP
        elif req.detok is not None:
            delta = req.detok.add([tok])
            cut = find_stop(req.detok.text, sp.stop, len(delta)) if delta else None
            if cut is not None:
                req.finish_reason, req.stop_text_len = FinishReason.STOP, cut
        if req.finish_reason is None and (len(req.output_ids) >= sp.max_new_tokens
                                          or req.seqlen >= self.runner.context_len):
            req.finish_reason = FinishReason.LENGTH
