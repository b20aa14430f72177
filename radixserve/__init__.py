"""radixserve: a small, fast LLM serving engine."""
