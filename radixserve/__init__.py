"""radixserve: a small, fast LLM serving engine."""
from radixserve.core import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: `import radixserve` stays cheap for the API server process, which never loads a model.
    if name == "LLM":
        from radixserve.llm import LLM
        return LLM
    raise AttributeError(name)
