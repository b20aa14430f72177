"""What a request asks beyond plain sampling, turned into what the engine takes: one grammar (from
response_format, SGLang's regex / ebnf / json_schema, vLLM's guided_*, or a forced tool call), a
logit_bias by token id, the tools and template arguments for the chat template, and how the output is
read back (reasoning_content, tool_calls), finished or streamed.

Every refusal is a 400 naming the field, decided here before anything is queued: an invalid schema,
regex or EBNF carries the grammar parser's message.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from radixserve.args import ServerArgs
from radixserve.core import SamplingParams
from radixserve.server.reasoning import REASONING_PARSERS, ReasoningParser, ReasoningStream
from radixserve.server.tokenizer_manager import RequestError
from radixserve.server.tool_parsers import ToolCall, ToolParser, ToolStream, get_parser, new_call_id

logger = logging.getLogger(__name__)
VALIDATED_CACHE = 1024
# apply_chat_template's own parameters: chat_template_kwargs reach the template as variables, not these
RESERVED_TEMPLATE_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}

# Built-in names for --chat-template (a file path or a Jinja string works too).
BUILTIN_TEMPLATES = {
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] or '') + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
               " + (m['content'] or '') + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}


def load_chat_template(spec: str | None) -> str | None:
    """--chat-template: a built-in name, a file, or the template itself."""
    if spec is None:
        return None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if os.path.isfile(spec):
        with open(spec) as f:
            return f.read()
    if "{{" in spec or "{%" in spec:
        return spec
    raise ValueError(f"--chat-template {spec!r} is neither a file, a Jinja template, nor a built-in name "
                     f"({', '.join(BUILTIN_TEMPLATES)})")


@dataclass
class ChatPlan:
    """How one chat request is prompted and how its output is read."""
    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    grammar: tuple[str, str] | None = None
    logit_bias: dict[int, float] | None = None
    tool_parser: ToolParser | None = None  # set when the output may hold tool calls
    reasoning: ReasoningParser | None = None
    keep_special: bool = False  # the tool-call marker is a special token (mistral)

    def constrain(self, sp: SamplingParams) -> SamplingParams:
        sp.grammar, sp.logit_bias = self.grammar, self.logit_bias
        if self.keep_special:
            sp.skip_special_tokens = False
        return sp

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The assistant message of a finished choice, and whether it called tools."""
        msg: dict[str, Any] = {"role": "assistant"}
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text)
            msg["reasoning_content"] = reasoning.rstrip() or None
        calls: list[ToolCall] = []
        if self.tool_parser is not None:
            text, calls = self.tool_parser.parse(text)
        msg["content"] = text if text or not calls else None
        if calls:
            msg["tool_calls"] = [c.as_openai(new_call_id()) for c in calls]
        return msg, bool(calls)


def finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


class ChoiceStream:
    """One streamed choice: text deltas in, OpenAI delta objects out (reasoning_content, content and
    tool_calls), which concatenate to what ChatPlan.message gives for the whole text."""

    def __init__(self, plan: ChatPlan) -> None:
        self.reasoning = ReasoningStream(plan.reasoning) if plan.reasoning is not None else None
        self.tools = ToolStream(plan.tool_parser) if plan.tool_parser is not None else None

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        content = text
        if self.reasoning is not None:
            r, content = self.reasoning.feed(text, final)
            if r:
                out.append({"reasoning_content": r})
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                content += self.tools.finish()
            if content:
                out.append({"content": content})
            if calls:
                out.append({"tool_calls": calls})
        elif content:
            out.append({"content": content})
        return out

    @property
    def called(self) -> bool:
        return self.tools is not None and self.tools.called

    @property
    def parsing(self) -> bool:
        return self.tools is not None or self.reasoning is not None


class Structured:
    """Per server: the grammar validator (with a cache of verdicts), the tool-call and reasoning parsers
    named by the flags, and the chat template override."""

    def __init__(self, args: ServerArgs, tokenizer: Any, vocab_size: int) -> None:
        self.enabled = args.grammar_backend != "none"
        self.tool_parser_name = args.tool_call_parser
        self.reasoning = REASONING_PARSERS.get(args.reasoning_parser) if args.reasoning_parser else None
        self.chat_template = load_chat_template(args.chat_template)
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.verdicts: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    # ---- grammars ----
    def check_grammar(self, kind: str, text: str, param: str) -> tuple[str, str]:
        if not self.enabled:
            raise RequestError("constrained decoding is off on this server (--grammar-backend none)", param=param,
                               code="unsupported_parameter")
        key = (kind, text)
        if key not in self.verdicts:
            from radixserve.grammar.llguidance_backend import grammar_source
            try:
                import llguidance
                bad, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_source(kind, text))
                self.verdicts[key] = (msgs[0] if msgs else "invalid grammar") if bad else None
            except Exception as e:  # GrammarError, or anything the parser raises on hostile input: a 400
                self.verdicts[key] = str(e) or type(e).__name__
            if len(self.verdicts) > VALIDATED_CACHE:
                self.verdicts.popitem(last=False)
        error = self.verdicts[key]
        if error is not None:
            what = {"json_schema": "JSON schema", "regex": "regex", "ebnf": "EBNF grammar", "lark": "grammar"}[kind]
            raise RequestError(f"'{param}' is not a valid {what}: {error}", param=param)
        return key

    def request_grammar(self, body: Any, forced: tuple[str, str] | None = None) -> tuple[str, str] | None:
        """The one grammar a request asks for (fields of protocol._Constrained), or None."""
        found: list[tuple[str, tuple[str, str]]] = []
        rf = getattr(body, "response_format", None)
        if rf is not None and rf.type != "text":
            if rf.type == "json_object":
                found.append(("response_format", ("json_schema", '{"type": "object"}')))
            else:
                if rf.json_schema is None or rf.json_schema.schema_ is None:
                    raise RequestError("response_format of type json_schema needs json_schema.schema",
                                       param="response_format", code="missing_required_parameter")
                found.append(("response_format", ("json_schema", json.dumps(rf.json_schema.schema_))))
        for name, kind in (("regex", "regex"), ("ebnf", "ebnf"), ("json_schema", "json_schema"),
                           ("guided_regex", "regex"), ("guided_grammar", "ebnf")):
            value = getattr(body, name, None)
            if value is not None:
                found.append((name, (kind, value)))
        if getattr(body, "guided_json", None) is not None:
            g = body.guided_json
            found.append(("guided_json", ("json_schema", g if isinstance(g, str) else json.dumps(g))))
        if getattr(body, "guided_choice", None) is not None:
            found.append(("guided_choice", ("lark", "start: " + " | ".join(json.dumps(c) for c in body.guided_choice))))
        if forced is not None:
            found.append(("tool_choice", forced))
        if len(found) > 1:
            names = ", ".join(n for n, _ in found)
            raise RequestError(f"a request takes one constraint at most; got {names}", param=found[1][0])
        if not found:
            return None
        name, (kind, text) = found[0]
        param = f"{name}.json_schema.schema" if name == "response_format" and kind == "json_schema" and \
            rf is not None and rf.type == "json_schema" else name
        return self.check_grammar(kind, text, param)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        out = {}
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit()) or int(key) >= self.vocab_size:
                raise RequestError(f"logit_bias key {key!r} is not a token id in [0, {self.vocab_size})",
                                   param="logit_bias")
            out[int(key)] = value
        return out

    # ---- chat ----
    def template_has_tools(self) -> bool:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None) or ""
        return "tools" in (template if isinstance(template, str) else json.dumps(template))

    def chat_plan(self, body: Any) -> ChatPlan:
        messages = [m.as_dict() for m in body.messages]
        kwargs: dict[str, Any] = dict(body.chat_template_kwargs or {})
        taken = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if taken:
            raise RequestError(f"chat_template_kwargs must not set {', '.join(taken)}: the server sets those",
                               param="chat_template_kwargs")
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        plan = ChatPlan(messages, kwargs, logit_bias=self.logit_bias(body.logit_bias))
        if self.reasoning is not None and body.separate_reasoning:
            plan.reasoning = self.reasoning
        forced = self.plan_tools(body, plan)
        plan.grammar = self.request_grammar(body, forced)
        return plan

    def plan_tools(self, body: Any, plan: ChatPlan) -> tuple[str, str] | None:
        """Tools into the prompt; returns the grammar of a forced call (required or named choice)."""
        choice, tools = body.tool_choice, body.tools
        if not tools:
            if choice not in (None, "none", "auto"):
                raise RequestError("tool_choice needs `tools`", param="tool_choice")
            return None
        if choice == "none":
            return None
        specs = [t.model_dump(by_alias=True, exclude_none=True) for t in tools]
        names = [t.function.name for t in tools]
        if len(set(names)) < len(names):
            raise RequestError("tools have duplicate function names", param="tools")
        for i, t in enumerate(tools):
            params = t.function.parameters
            if params is not None:
                if params.get("type", "object") != "object":
                    raise RequestError(f"tools[{i}].function.parameters must be a JSON schema of type object",
                                       param="tools")
                try:
                    self.check_grammar("json_schema", json.dumps(params), "tools")
                except RequestError as e:
                    raise RequestError(f"tools[{i}].function.parameters is not a valid JSON schema: "
                                       f"{e.message.split(': ', 1)[-1]}", param="tools") from None
        parser = get_parser(self.tool_parser_name)
        plan.tool_parser, plan.keep_special = parser, parser.name == "mistral"
        self.prompt_tools(plan, parser, specs)
        if choice in (None, "auto"):
            return None
        if choice == "required":
            chosen = specs
        else:
            chosen = [s for s in specs if s["function"]["name"] == choice.function.name]
            if not chosen:
                raise RequestError(f"tool_choice names function {choice.function.name!r}, which is not in "
                                   f"tools ({', '.join(names)})", param="tool_choice")
        parallel = body.parallel_tool_calls and choice == "required"
        return "lark", parser.grammar(chosen, parallel)

    def prompt_tools(self, plan: ChatPlan, parser: ToolParser, specs: list[dict[str, Any]]) -> None:
        """A template with a tools section gets them as `tools`; any other gets the parser's instructions
        as (the start of) the system message, and past calls written in the parser's format."""
        if self.template_has_tools():
            plan.template_kwargs["tools"] = specs
            return
        msgs = plan.messages
        for m in msgs:
            if m.get("tool_calls"):
                calls = [ToolCall(c["function"]["name"], c["function"]["arguments"]
                                  if isinstance(c["function"]["arguments"], str)
                                  else json.dumps(c["function"]["arguments"])) for c in m.pop("tool_calls")]
                m["content"] = ((m["content"] or "") + "\n" + parser.render(calls)).lstrip("\n")
            m.pop("tool_call_id", None)
        text = parser.instructions(specs)
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = msgs[0]["content"] + "\n\n" + text
        else:
            msgs.insert(0, {"role": "system", "content": text})


def log_request(kind: str, rid: str, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """--log-requests: one line per request (its parameters, prompt lengths), not the prompt text."""
    sp = params[0]
    logger.info(f"{kind} request {rid}: {len(params)} sequence(s), prompt tokens {[len(p) for p in prompts]}, "
                f"max_new_tokens={sp.max_new_tokens} temperature={sp.temperature} top_p={sp.top_p} "
                f"top_k={sp.top_k} grammar={sp.grammar[0] if sp.grammar else None} "
                f"logit_bias={len(sp.logit_bias or {})} stop={sp.stop}")
