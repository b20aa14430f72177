"""The serving layer: API server, tokenizer manager, scheduler and detokenizer processes."""
