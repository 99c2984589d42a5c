"""The HTTP contract: request and response models, and how bad input becomes a 4xx.

Requests are parsed from the raw body here, not by FastAPI, so every failure has one shape
and names its field: `{"error": CODE, "field": "texts[2]", "message": ..., "details": [...]}`
(field "body" for the body as a whole). Limits come from the server config and reach the
validators as pydantic validation context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ray_twist.lora.rows import Mode
from ray_twist.merge import MergeOrder
from ray_twist.serve.config import LimitSettings

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """A request the server refuses: HTTP status, error code, the field at fault, a message."""

    def __init__(
        self,
        status: int,
        error: str,
        field: str | None,
        message: str,
        details: Sequence[dict[str, Any]] = (),
    ) -> None:
        super().__init__(status, error, field, message, details)
        self.status, self.error, self.field, self.message = status, error, field, message
        self.details = list(details)

    def body(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "field": self.field,
            "message": self.message,
            "details": self.details,
        }


class InputError(ApiError):
    """Input that passes the schema but not the model (unknown style, too many tokens)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(422, "invalid_input", field, message)

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray process boundaries
        return (InputError, (self.field, self.message))


def _limits(info: ValidationInfo) -> LimitSettings:
    context = info.context or {}
    return context.get("limits") or LimitSettings()


def _text(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise ValueError("text is empty or whitespace only")
    limit = _limits(info).max_text_chars
    if len(value) > limit:
        raise ValueError(f"text has {len(value)} characters; the limit is {limit}")
    return value


Text = Annotated[str, AfterValidator(_text)]


class TwistSettings(BaseModel):
    """A request's own retrieval settings for instance/mixture modes, in place of the
    server's `retrieval:` (each one left out keeps the server's), within the server's limits."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    rank: int | None = Field(
        default=None, ge=1, description="instance mode: merge rank q (≤ limits.max_rank)"
    )
    lam: float | None = Field(
        default=None, alias="lambda", ge=0.0, le=1.0, description="task- vs instance-level λ"
    )
    tau: float | None = Field(default=None, description="softmax temperature (≥ limits.min_tau)")
    top_k: int | None = Field(
        default=None, ge=1, description="keep the k best sources (≤ the pool's size)"
    )

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_rank
        if value is not None and value > limit:
            raise ValueError(f"must be <= {limit} on this server")
        return value

    @field_validator("tau")
    @classmethod
    def _tau(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = _limits(info).min_tau
        if value is not None and not value >= limit:
            raise ValueError(f"must be >= {limit} on this server")
        return value

    def overrides(self) -> dict[str, Any]:
        """The settings given, keyed as `InstanceRetrievalSettings` fields."""
        return self.model_dump(exclude_none=True)


class RestyleRequest(BaseModel):
    """POST /v1/restyle. Types are strict: "5" is not a number, 1 is not a boolean."""

    model_config = ConfigDict(extra="forbid", strict=True)

    texts: list[Text] = Field(min_length=1, description="sentences to restyle")
    style: str | None = Field(
        default=None,
        description="adapted: the target adapter (a registered style or pool source); "
        "instance/mixture: whose style key is the task-level query (null: no task-level "
        "query, each sentence is retrieved at the instance level alone, λ applied as 0; "
        "the response's retrieval_applied says so)",
    )
    mode: Mode = Field(
        default="adapted",
        description="adapted: the named adapter; instance: per-sentence retrieval + rank-q "
        "SVD merge; mixture: per-sentence untruncated mixture of the pool's adapters",
    )
    merge_order: MergeOrder | None = Field(
        default=None,
        description="instance mode only: sum_then_truncate (top-q SVD of Σ R_s ΔW_s) or "
        "truncate_then_sum (Σ R_s top-q SVD(ΔW_s)); one of the server's "
        "limits.merge_orders [the server's retrieval.merge_order]",
    )
    twist: TwistSettings | None = Field(
        default=None,
        description="instance/mixture: this request's rank, λ, τ, top-k [the server's "
        "retrieval settings]; the response's retrieval_applied echoes them",
    )
    max_new_tokens: int | None = Field(default=None, ge=1, description="default: server's")
    num_beams: int = Field(default=1, ge=1)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    timeout_s: float | None = Field(
        default=None, gt=0.0, description="give up (504) after this long; ≤ the server's limit"
    )

    @field_validator("texts")
    @classmethod
    def _count(cls, texts: list[str], info: ValidationInfo) -> list[str]:
        limit = _limits(info).max_texts
        if len(texts) > limit:
            raise ValueError(f"{len(texts)} texts; the limit is {limit} per request")
        return texts

    @field_validator("merge_order")
    @classmethod
    def _order(cls, value: MergeOrder | None, info: ValidationInfo) -> MergeOrder | None:
        if value is None:
            return value
        if info.data.get("mode") != "instance":
            raise ValueError(
                "merge_order applies to instance mode only (mixture does not truncate; "
                "adapted runs its named adapter)"
            )
        allowed = _limits(info).merge_orders
        if value not in allowed:
            raise ValueError(f"{value} is not enabled on this server (merge orders: {allowed})")
        return value

    @field_validator("twist")
    @classmethod
    def _twist(cls, value: TwistSettings | None, info: ValidationInfo) -> TwistSettings | None:
        mode = info.data.get("mode")
        if value is not None and mode == "adapted":
            raise ValueError("twist settings apply to instance and mixture modes only")
        if value is not None and value.rank is not None and mode == "mixture":
            raise ValueError("twist.rank applies to instance mode only (mixture does not truncate)")
        return value

    @field_validator("max_new_tokens", "num_beams", "temperature", "timeout_s")
    @classmethod
    def _within_limit(cls, value: float | None, info: ValidationInfo) -> float | None:
        limits = _limits(info)
        limit = {
            "max_new_tokens": limits.max_new_tokens,
            "num_beams": limits.max_num_beams,
            "temperature": limits.max_temperature,
            "timeout_s": limits.request_timeout_s,
        }[str(info.field_name)]
        if value is not None and value > limit:
            raise ValueError(f"must be <= {limit} on this server")
        return value


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int = Field(description="tokens of the decoded outputs, re-tokenized")


class Timing(BaseModel):
    """Where the batch this request rode in spent its time (shared by its requests)."""

    retrieval_ms: float = Field(description="featurizing inputs + retrieval scores")
    merge_ms: float = Field(description="per-row factors: SVD merges, mixtures, stacking")
    generate_ms: float
    batch_requests: int
    batch_rows: int
    batch_styles: int = Field(description="distinct adapters/mixtures among the batch's rows")


class RetrievalApplied(BaseModel):
    """How a pool-mode request's weights (and instance-mode merges) were computed."""

    model_config = ConfigDict(populate_by_name=True)

    lam: float = Field(
        alias="lambda",
        description="λ applied: the server's with a style; 0 (instance level only) without",
    )
    levels: list[Literal["task", "instance"]] = Field(description="the levels λ uses")
    tau: float
    top_k: int | None
    rank: int | None = Field(description="instance mode: rank q of each row's merge")
    merge_order: MergeOrder | None = Field(description="instance mode: the order applied")


class RestyleResponse(BaseModel):
    outputs: list[str]
    retrieval: list[dict[str, float]] = Field(
        description="per text: source (or adapter) → weight used; nonzero weights only"
    )
    retrieval_applied: RetrievalApplied | None = Field(
        description="instance/mixture: λ, levels, τ, top-k (and rank, merge order) applied"
    )
    mode: Mode
    style: str | None
    usage: Usage
    timing: Timing


class ErrorBody(BaseModel):
    error: str
    field: str | None
    message: str
    details: list[dict[str, Any]] = []


def field_path(loc: Sequence[str | int]) -> str:
    """Pydantic's ('texts', 2) → 'texts[2]'; the body itself → 'body'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _validation_error(exc: ValidationError) -> ApiError:
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        field = field_path(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        details.append({"field": field, "message": message, "type": err["type"]})
    first = details[0]
    if first["type"] == "json_invalid":
        return ApiError(400, "invalid_json", "body", f"body is not valid JSON: {first['message']}")
    return ApiError(422, "invalid_request", first["field"], first["message"], details)


def parse_json(body: bytes, model: type[M], limits: LimitSettings | None = None) -> M:
    """Raw body → a validated `model` (`limits` reach its validators), or an ApiError
    naming the field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "invalid_encoding", "body", f"body is not UTF-8 (byte {exc.start})"
        ) from None
    try:
        return model.model_validate_json(text, context={"limits": limits})
    except ValidationError as exc:
        raise _validation_error(exc) from None


def parse_restyle(body: bytes, limits: LimitSettings) -> RestyleRequest:
    """Raw body → validated request, or an ApiError naming the field."""
    return parse_json(body, RestyleRequest, limits)
