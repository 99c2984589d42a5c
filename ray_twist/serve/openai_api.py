"""The OpenAI-compatible contract: /v1/completions, /v1/chat/completions, /v1/models.

An OpenAI request is translated into a `RestyleRequest` and validated by it, so the limits
and checks of /v1/restyle hold unchanged; only the names differ. `model` picks the mode
and style:

    STYLE              adapted mode with a named style (a registered adapter or pool source)
    instance           per-sentence retrieval + rank-q merge, instance-level query only
    instance:STYLE     the same with STYLE's key as the task-level query
    mixture, mixture:STYLE   per-sentence untruncated mixture

The text to restyle is the completion's `prompt` (a string, or a list: one choice per
string) or the chat's last user message. Per-request TWIST settings ride in an extra body
field, `"twist": {"rank", "lambda", "tau", "top_k", "merge_order"}` (the openai client's
`extra_body`). `temperature` 0 or left out decodes greedily (a restyle is meant to be
reproducible; OpenAI's own default is 1); above 0 it samples, with `top_p`.

Errors come as `{"error": {"message", "type", "param", "code"}}`, `param` naming the OpenAI
field (`messages[1].content`, `twist.tau`, `max_tokens`, `model`); a request the schema
refuses is a 400 (OpenAI's status, where /v1/restyle answers 422), an unknown model a 404.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ray_twist.lora.rows import Mode
from ray_twist.serve.api import (
    ApiError,
    InputError,
    RestyleRequest,
    RestyleResponse,
    parse_json,
    parse_restyle,
)
from ray_twist.serve.config import LimitSettings
from ray_twist.serve.engine import Catalog

POOL_MODES: tuple[Mode, ...] = ("instance", "mixture")
# Parameters OpenAI defines that a restyle cannot honour; each is refused (400 naming it)
# unless it holds its no-op value.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "stop": (None, [], ""),
    "seed": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
}
_STATUS_TYPES = {401: "authentication_error", 404: "invalid_request_error",
                 503: "server_error", 504: "timeout"}  # fmt: skip


class OpenAIError(ApiError):
    """An ApiError answered in OpenAI's error shape; `field` is the OpenAI `param`."""

    def body(self) -> dict[str, Any]:
        kind = _STATUS_TYPES.get(self.status, "invalid_request_error")
        if self.status >= 500 and self.status not in _STATUS_TYPES:
            kind = "server_error"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.field,
                "code": self.error,
            }
        }

    @classmethod
    def of(cls, exc: ApiError, param: Callable[[str], str] | None = None) -> OpenAIError:
        """The project's error in OpenAI's terms: 422 → 400, the field renamed by `param`."""
        if isinstance(exc, OpenAIError):
            return exc
        field = exc.field if exc.field is None or param is None else param(exc.field)
        status = 400 if exc.status == 422 else exc.status
        return cls(status, exc.error, field, exc.message, exc.details)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


# ---------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by both routes. Sampling fields are typed loosely here: the
    `RestyleRequest` they become checks them (strictly, against the server's limits)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="STYLE, instance, instance:STYLE, mixture or mixture:STYLE")
    max_tokens: Any = Field(default=None, description="→ max_new_tokens (server's limit)")
    temperature: Any = Field(default=None, description="0 or left out: greedy; > 0: sampling")
    top_p: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted and ignored")
    twist: Any = Field(
        default=None,
        description='instance/mixture: {"rank", "lambda", "tau", "top_k", "merge_order"} '
        "for this request, within the server's limits",
    )
    # refused unless at their no-op value (`UNSUPPORTED`)
    n: Any = None
    best_of: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    stop: Any = None
    seed: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None


class CompletionRequest(_Common):
    """POST /v1/completions: `prompt` is the text to restyle (a list: one choice each)."""

    prompt: Any = Field(description="a string, or a list of strings (token ids are refused)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_call_id, ...

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = Field(default=None, description='a string or [{"type": "text", "text"}]')


class ChatRequest(_Common):
    """POST /v1/chat/completions: the last user message is the text to restyle (earlier
    messages, system prompts included, do not steer a restyle and are ignored)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Any = Field(default=None, description="max_tokens' newer name")


@dataclass(frozen=True)
class Params:
    """How the `RestyleRequest` an OpenAI request became names its fields back."""

    texts: str  # "prompt" or "messages"
    texts_at: list[str]  # the param of each text: "prompt[1]", "messages[3].content"
    max_tokens: str  # "max_tokens" or "max_completion_tokens"

    def __call__(self, field: str) -> str:
        """A `RestyleRequest` field path ("texts[1]", "merge_order") as the OpenAI param."""
        head, index, rest = _split(field)
        if head == "texts":
            if index is not None and index < len(self.texts_at):
                return self.texts_at[index] + rest
            return self.texts
        renamed = {"merge_order": "twist.merge_order", "max_new_tokens": self.max_tokens,
                   "style": "model", "mode": "model", "do_sample": "temperature"}  # fmt: skip
        return renamed.get(head, head) + ("" if index is None else f"[{index}]") + rest


@dataclass(frozen=True)
class Translated:
    """An OpenAI request and the `RestyleRequest` it means."""

    body: CompletionRequest | ChatRequest
    restyle: RestyleRequest
    params: Params


def _split(field: str) -> tuple[str, int | None, str]:
    match = re.fullmatch(r"([A-Za-z_]+)(?:\[(\d+)\])?(.*)", field)
    if match is None:
        return field, None, ""
    head, index, rest = match.groups()
    return head, None if index is None else int(index), rest


def parse_model(model: str, catalog: Catalog) -> tuple[Mode, str | None]:
    """`model` → (mode, style), or a 404 naming `model` when this server does not serve it."""
    mode, colon, style = model.partition(":")
    if mode not in POOL_MODES:
        if colon:
            raise _unknown(model, f"{mode!r} is not a mode (instance, mixture)")
        mode, style = "adapted", model
    try:
        catalog.resolve(style or None, mode)  # type: ignore[arg-type]
    except InputError as exc:
        raise _unknown(model, exc.message) from None
    return mode, style or None  # type: ignore[return-value]


def _unknown(model: str, reason: str) -> OpenAIError:
    return OpenAIError(
        404, "model_not_found", "model",
        f"the model {model!r} does not exist on this server ({reason}); see GET /v1/models",
    )  # fmt: skip


def _validated(kind: type[CompletionRequest] | type[ChatRequest], body: bytes) -> Any:
    """The body against the OpenAI-level schema (JSON and type errors: 400 naming the
    field), OpenAI parameters a restyle cannot honour refused (400 naming them)."""
    try:
        parsed = parse_json(body, kind)
    except ApiError as exc:
        raise OpenAIError.of(exc) from None
    for name, allowed in UNSUPPORTED.items():
        value = getattr(parsed, name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise OpenAIError(400, "unsupported_parameter", name,
                              f"{name}={value!r} is not supported by this server "
                              "(a restyle has one output per text)")  # fmt: skip
    return parsed


def translate(
    kind: type[CompletionRequest] | type[ChatRequest],
    body: bytes,
    limits: LimitSettings,
    catalog: Catalog,
) -> Translated:
    """Raw OpenAI body → the `RestyleRequest` it means (checked as /v1/restyle checks it),
    or an OpenAIError naming the OpenAI field."""
    parsed = _validated(kind, body)
    mode, style = parse_model(parsed.model, catalog)
    max_tokens, tokens_field = parsed.max_tokens, "max_tokens"
    if isinstance(parsed, ChatRequest):
        texts, texts_at = _last_user_text(parsed)
        if parsed.max_completion_tokens is not None:
            max_tokens, tokens_field = parsed.max_completion_tokens, "max_completion_tokens"
        params = Params("messages", texts_at, tokens_field)
    else:
        single = isinstance(parsed.prompt, str)
        if not single and not isinstance(parsed.prompt, list):
            raise OpenAIError(400, "invalid_request", "prompt",
                              "prompt must be a string or a list of strings")  # fmt: skip
        texts = [parsed.prompt] if single else parsed.prompt  # items: checked as texts
        texts_at = ["prompt"] if single else [f"prompt[{i}]" for i in range(len(texts))]
        params = Params("prompt", texts_at, tokens_field)
    request: dict[str, Any] = {"texts": texts, "style": style, "mode": mode}
    twist = parsed.twist
    if isinstance(twist, dict):
        twist = dict(twist)
        if "merge_order" in twist:
            request["merge_order"] = twist.pop("merge_order")
        twist = twist or None
    if twist is not None:
        request["twist"] = twist
    if max_tokens is not None:
        request["max_new_tokens"] = max_tokens
    if parsed.temperature is not None and parsed.temperature != 0:
        request.update(do_sample=True, temperature=parsed.temperature)
    if parsed.top_p is not None:
        request["top_p"] = parsed.top_p
    try:
        restyle = parse_restyle(json.dumps(request).encode(), limits)
    except ApiError as exc:
        raise OpenAIError.of(exc, params) from None
    return Translated(parsed, restyle, params)


def _last_user_text(chat: ChatRequest) -> tuple[list[str], list[str]]:
    """([the last user message's text], [its param name]), or a 400 naming `messages`."""
    for k in range(len(chat.messages) - 1, -1, -1):
        message = chat.messages[k]
        if message.role != "user":
            continue
        return [_text_of(message.content, f"messages[{k}].content")], [f"messages[{k}].content"]
    raise OpenAIError(400, "invalid_request", "messages",
                      "no user message: the last user message is the text to restyle")  # fmt: skip


def _text_of(content: Any, param: str) -> str:
    """A message's text: a string, or its text parts joined (other parts: 400 naming them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(400, "invalid_request", param,
                          "content must be a string or a list of text parts")  # fmt: skip
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):  # fmt: skip
            raise OpenAIError(400, "invalid_request", f"{param}[{j}]",
                              'only text parts ({"type": "text", "text": ...}) are restyled')  # fmt: skip
        texts.append(part["text"])
    return "".join(texts)


# ---------------------------------------------------------------- responses


def models(catalog: Catalog, created: int) -> list[dict[str, Any]]:
    """Every `model` a request may name here, with the mode and style it means."""
    out: list[tuple[str, Mode, str | None]] = []
    if catalog.has_pool:
        out += [(mode, mode, None) for mode in POOL_MODES]
    for entry in catalog.entries.values():
        if "adapted" in entry.modes:
            out.append((entry.name, "adapted", entry.name))
        out += [(f"{m}:{entry.name}", m, entry.name) for m in POOL_MODES if m in entry.modes]
    return [
        {"id": name, "object": "model", "created": created, "owned_by": "ray-twist",
         "twist": {"mode": mode, "style": style}}
        for name, mode, style in out
    ]  # fmt: skip


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _twist(response: RestyleResponse) -> dict[str, Any]:
    """The restyle's own answer beyond OpenAI's fields: weights, settings applied, timing."""
    return response.model_dump(by_alias=True, include={"retrieval", "retrieval_applied", "mode",
                                                       "style", "timing"})  # fmt: skip


class Reply:
    """Builds one request's OpenAI responses (whole, or as stream chunks)."""

    def __init__(self, translated: Translated) -> None:
        self.chat = isinstance(translated.body, ChatRequest)
        self.model = translated.body.model
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        options = translated.body.stream_options
        self.include_usage = options is not None and options.include_usage

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, response: RestyleResponse, reasons: list[str]) -> dict[str, Any]:
        """The non-streamed answer, each choice with its finish reason."""
        usage = _usage(response.usage.input_tokens, response.usage.output_tokens)
        if self.chat:
            [text], [reason] = response.outputs, reasons
            choices: list[dict[str, Any]] = [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": reason,
            }]  # fmt: skip
            return {**self._head("chat.completion"), "choices": choices, "usage": usage,
                    "twist": _twist(response)}  # fmt: skip
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(response.outputs, reasons, strict=True))]  # fmt: skip
        return {**self._head("text_completion"), "choices": choices, "usage": usage,
                "twist": _twist(response)}  # fmt: skip

    def chunk(self, row: int, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """One stream chunk: `text` new for choice `row` (chat: None opens the message)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            if finish_reason is not None:
                delta = {}
            choice = {"index": row, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}  # fmt: skip
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {
            "index": row,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, response: RestyleResponse) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage`: no choices, the usage (and
        the restyle's own `twist` answer)."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        usage = _usage(response.usage.input_tokens, response.usage.output_tokens)
        return {**self._head(obj), "choices": [], "usage": usage, "twist": _twist(response)}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event (`data: [DONE]` for the string "[DONE]")."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()
