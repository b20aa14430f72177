"""Request bodies of the OpenAI and native APIs (pydantic), and how they become SamplingParams.

Models are strict (a string is not an int) and forbid unknown fields: a misspelt or unsupported
parameter (`max_token`, `tools`, `logit_bias`) is a 400 naming it, never silently ignored.

Every value is bounded to what the engine takes, so no input can fail later as a 500: integers to the
ranges below (msgpack carries at most 64 bits; lengths and counts fit 32), floats finite (NaN and
infinity are refused), and strings valid Unicode (a lone surrogate cannot be tokenized or encoded).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from radixserve.core import SamplingParams
from radixserve.disaggregation.types import DEFAULT_BOOTSTRAP_PORT, BootstrapInfo

MAX_N = 128
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Count = Annotated[int, Field(ge=0, le=INT32_MAX)]  # lengths, token counts
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # checked against the vocabulary by the API
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TopK = Annotated[int, Field(ge=-1, le=INT32_MAX)]
LogprobStart = Annotated[int, Field(ge=-1, le=INT32_MAX)]


def lone_surrogate(value: Any) -> bool:
    """True if a string anywhere in `value` holds a lone UTF-16 surrogate (JSON allows "\\ud800")."""
    if isinstance(value, str):
        if value.isascii():
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, (list, tuple)):
        return any(lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(lone_surrogate(k) or lone_surrogate(v) for k, v in value.items())
    return False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if lone_surrogate(value):
            raise ValueError("the text contains a lone surrogate (invalid Unicode); send valid UTF-8 text")
        return value


class StreamOptions(_Body):
    include_usage: bool = False


Port = Annotated[int, Field(ge=1, le=65535)]
Room = Annotated[int, Field(ge=0, le=INT64_MAX)]


class _Bootstrap(_Body):
    """PD disaggregation (SGLang's protocol): in --pd-disaggregation mode the gateway adds the prefill server's
    bootstrap address and a random room number to each request, and sends the same body to a prefill and a
    decode server; the room pairs the prefill's KV with the decode's request. One value per request, or a list
    with one per prompt × choice for batches. A null port means the default bootstrap port."""
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: Port | list[Port | None] | None = None
    bootstrap_room: Room | list[Room] | None = None

    def bootstraps(self, count: int) -> list[BootstrapInfo] | None:
        """One BootstrapInfo per generated sequence (prompt × choice), or None without PD fields."""
        if self.bootstrap_room is None and self.bootstrap_host is None:
            return None
        if self.bootstrap_room is None or self.bootstrap_host is None:
            raise ValueError("bootstrap_host and bootstrap_room go together (PD disaggregation): pass both")

        def spread(value: Any, name: str) -> list[Any]:
            if not isinstance(value, list):
                if count != 1:
                    raise ValueError(f"{name} must be a list of {count} (one per prompt and choice) for this "
                                     f"batch, got one value")
                return [value]
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries but the request makes {count} sequences "
                                 f"(prompts × n)")
            return value
        hosts, rooms = spread(self.bootstrap_host, "bootstrap_host"), spread(self.bootstrap_room, "bootstrap_room")
        ports = spread(self.bootstrap_port, "bootstrap_port") if isinstance(self.bootstrap_port, list) \
            else [self.bootstrap_port] * count
        return [BootstrapInfo(h, DEFAULT_BOOTSTRAP_PORT if p is None else p, r) for h, p, r in zip(hosts, ports, rooms)]


class _OpenAISampling(_Bootstrap):
    """Fields shared by /v1/chat/completions and /v1/completions, with SGLang's extras."""
    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: TopK = -1
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False  # keep the matched stop string / stop token in the text (SGLang)
    return_hidden_states: bool = False  # sent by SGLang's gateway; only false is served

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_new_tokens: int, logprobs: bool, top_logprobs: int, choice: int
                        ) -> SamplingParams:
        """Choice i of n gets seed + i, so n seeded choices differ from each other yet are reproducible."""
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=None if self.seed is None else self.seed + choice,
            stop=stop_list(self.stop), stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            logprobs=logprobs, top_logprobs=top_logprobs, skip_special_tokens=self.skip_special_tokens,
            no_stop_trim=self.no_stop_trim)


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


class TextPart(_Body):
    type: Literal["text"]
    text: str


# ---- tools and response formats (server/openai_api.py turns them into grammars and prompts) ----
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
Bias = Annotated[float, Field(ge=-100, le=100)]


class FunctionDef(_Body):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; checked by the grammar backend (400 if not)
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionRef(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionRef


class FunctionCallIn(_Body):
    name: str
    arguments: str


class ToolCallIn(_Body):
    """An assistant message's tool call, as a client sends the history back."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn
    index: int | None = Field(None, ge=0, le=INT32_MAX)


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Constrained(_Body):
    """SGLang's constrained-decoding fields (one grammar per request, at most), OpenAI's logit_bias,
    and vLLM's guided_* spellings of the same."""
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    logit_bias: dict[str, Bias] | None = None  # token id (as a string, OpenAI's shape) -> bias


class _Unserved(_Body):
    """Fields the official client, vLLM or SGLang document that radixserve does not serve: declared so that
    they are known (never a misspelling) and refused with the reason in UNSERVED, or ignored (IGNORED)."""
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    min_tokens: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    prompt_logprobs: Any = None
    lora_path: Any = None
    suffix: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    priority: Any = None


UNSERVED = {
    "functions": "the deprecated functions API; send `tools`",
    "function_call": "the deprecated functions API; send `tool_choice`",
    "audio": "audio output is not served", "modalities": "only text output is served",
    "prediction": "predicted outputs are not served", "web_search_options": "no web search is built in",
    "reasoning_effort": "reasoning length is not adjustable; use max_tokens (and chat_template_kwargs)",
    "verbosity": "not adjustable", "min_tokens": "not served", "use_beam_search": "beam search is not built",
    "length_penalty": "beam search is not built",
    "prompt_logprobs": "vLLM's field is not served; ask /v1/completions for echo with logprobs, or /generate for "
                       "return_logprob with logprob_start_len",
    "lora_path": "LoRA adapters are not served", "suffix": "fill-in-the-middle is not served",
}
IGNORED = ("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "priority")


def unserved_field(body: BaseModel) -> tuple[str, str] | None:
    """(field, reason) of the first field sent that radixserve refuses (a null or false value is fine)."""
    for name, reason in UNSERVED.items():
        if getattr(body, name, None) not in (None, False):
            return name, reason
    return None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None  # the openai client echoes it back on assistant messages in a history
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates read it: tool-call arguments as objects (HF templates `tojson`
        them), a tool result with its call id."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


def _json_or_text(arguments: str) -> Any:
    import json
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class ChatCompletionRequest(_OpenAISampling, _Constrained, _Unserved):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=256)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}, passed to the template
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    continue_final_message: bool = False  # extend the last (assistant) message instead of starting a new one
    separate_reasoning: bool = True  # SGLang's gateway sends these two; they only act with a reasoning parser
    stream_reasoning: bool = True


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_OpenAISampling, _Constrained, _Unserved):
    prompt: Prompt
    max_tokens: int = Field(16, ge=1, le=INT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class NativeSamplingParams(_Body):
    """SGLang's /generate `sampling_params` (its names: max_new_tokens, not max_tokens)."""
    max_new_tokens: int = Field(128, ge=0, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: TopK = -1
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    regex: str | None = None  # constrained decoding, one of the three at most (SGLang's names)
    ebnf: str | None = None
    json_schema: str | None = None
    logit_bias: dict[str, Bias] | None = None


class GenerateRequest(_Bootstrap):
    text: str | list[str] | None = None
    input_ids: list[TokenId] | list[list[TokenId]] | None = None
    sampling_params: NativeSamplingParams = NativeSamplingParams()
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=20)
    # prompt logprobs from this position (one per prompt for a batch); -1: only the output's (SGLang's default)
    logprob_start_len: LogprobStart | list[LogprobStart] = -1
    rid: str | None = None
    model: str | None = None  # checked like the OpenAI endpoints' (SGLang's gateway always sends it)
    return_text_in_logprobs: bool = False  # token text as the third element of each logprob entry
    # sent by SGLang's gateway on every /generate: no per-request logs or metrics exist to switch off, and the
    # features behind the others are not built, so only their default (false) is served
    log_metrics: bool = True
    no_logs: bool = False
    return_hidden_states: bool = False
    background: bool = False
    return_bytes: bool = False
    return_entropy: bool = False


class AbortRequest(_Body):
    rid: str | None = None
    abort_all: bool = False


UNSERVED_FLAGS = ("return_hidden_states", "background", "return_bytes", "return_entropy")


def unserved_flag(body: BaseModel) -> str | None:
    """The first SGLang flag set to true that radixserve accepts only as false (the gateway always sends them)."""
    return next((name for name in UNSERVED_FLAGS if getattr(body, name, False)), None)
