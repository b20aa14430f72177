"""Benchmarks: `python -m radixserve.bench.serving` (online, against any OpenAI-compatible server)."""
