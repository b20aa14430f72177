"""radixserve: a small, fast LLM serving engine."""
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: `import radixserve` stays cheap for the API server process, which never loads a model, and
    # torch-free for `python -m radixserve.doctor`, which runs wherever a log was copied to.
    if name == "LLM":
        from radixserve.llm import LLM
        return LLM
    if name == "SamplingParams":
        from radixserve.core import SamplingParams
        return SamplingParams
    raise AttributeError(name)
