"""Engine: tokenizer + model runner + scheduler in one process, the unit that the offline API,
the shell and each scheduler process of the server wrap."""
from __future__ import annotations

import logging
from typing import Any

from radixserve.args import ServerArgs
from radixserve.core import Req
from radixserve.distributed.group import TPGroup
from radixserve.engine.model_runner import ModelRunner
from radixserve.scheduler.scheduler import Scheduler
from radixserve.weights.loader import load_tokenizer, resolve_model

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, args: ServerArgs, tp: TPGroup = TPGroup(), dp_rank: int = 0) -> None:
        if tp.size != args.tp_size:
            raise ValueError(f"--tp {args.tp_size} needs one process per rank: serve it with `python -m "
                             f"radixserve --tp {args.tp_size}` or benchmark it with radixserve.bench.offline / "
                             f"one_batch; the offline LLM API and --shell run a single process (tp 1)")
        self.args = args
        self.src = resolve_model(args.model)
        self.tokenizer = load_tokenizer(self.src, args.tokenizer_path)
        self.runner = ModelRunner(args, self.src, tp)
        self.scheduler = Scheduler(args, self.runner, self.tokenizer, dp_rank)
        m = self.runner.memory
        logger.info(f"max_total_num_tokens={m.max_total_num_tokens}, chunked_prefill_size={args.chunked_prefill_size}, "
                    f"max_prefill_tokens={args.max_prefill_tokens}, "
                    f"max_running_requests={self.runner.max_running_requests}, "
                    f"context_len={self.runner.context_len}, available_gpu_mem={m.available_mem_gb:.2f} GB")

    @property
    def model_name(self) -> str:
        return self.args.served_model_name or self.src.name

    def run_to_completion(self, reqs: list[Req]) -> list[Req]:
        for r in reqs:
            self.scheduler.add_request(r)
        while any(not r.finished for r in reqs):
            self.scheduler.step()
        return reqs

    def output_text(self, req: Req) -> str:
        """Final text: stop token ids are not part of it, and a stop string cuts it where it starts (with
        no_stop_trim both stay: the text of every output id)."""
        if req.sampling_params.no_stop_trim:
            return self.tokenizer.decode(req.output_ids, skip_special_tokens=req.sampling_params.skip_special_tokens)
        if req.detok is not None and req.stop_text_len is not None:
            return req.detok.text[:req.stop_text_len]
        ids = req.output_ids[:-1] if req.ends_with_stop_token else req.output_ids
        return self.tokenizer.decode(ids, skip_special_tokens=req.sampling_params.skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
