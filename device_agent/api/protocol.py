"""OpenAI-compatible request / response bodies (pydantic), plus coinfer's extra fields.

Extra request fields: `split` (0..N or "auto") and `codec`; `top_k` and `ignore_eos` as in vLLM.
Every response carries a `coinfer` object (CoinferStats): split, codec, bytes up/down, timings.

No request field is ignored silently: a client that asks for penalties, tools or logprobs and gets
plain text back would take it for what it asked. A field we implement is used; an OpenAI field we
do not implement is taken only with the value that asks for what we do anyway (`n` 1, penalties 0,
`logprobs` false, ...: `only`) and is otherwise a 400 naming it; any other field is a 400 too
(extra="forbid"). docs/openai.md has the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

METADATA_MAX = 128  # characters of an affinity key (user, X-Session-Id): it travels in every gRPC call's metadata


def metadata_value(value: str, name: str) -> str:
    """`value` if it can travel as a gRPC metadata value, else ValueError naming `name`.

    gRPC accepts only printable ASCII in text metadata and raises (a 500 for the client) on anything else;
    a bound keeps a client from sending kilobytes of metadata with every edge call."""
    if not 1 <= len(value) <= METADATA_MAX or not all(" " <= ch <= "~" for ch in value):
        raise ValueError(
            f"{name} must be 1 to {METADATA_MAX} printable ASCII characters (no control or non-ASCII characters)"
        )
    return value


def _zero(v: Any) -> bool:
    return v == 0


def _falsy(v: Any) -> bool:
    return not v


def _never(v: Any) -> bool:
    return False


# OpenAI request fields we do not implement -> (the values that ask for what we do anyway, the 400's
# message otherwise); null always passes. One table, so that docs/openai.md and the code agree.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v == 1, "only n = 1 is supported"),
    "presence_penalty": (_zero, "only 0 is supported: repetition penalties are not implemented"),
    "frequency_penalty": (_zero, "only 0 is supported: repetition penalties are not implemented"),
    "logit_bias": (_falsy, "logit_bias is not supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "service tiers are not supported (only 'auto' or 'default')"),
    # chat
    "logprobs": (_falsy, "logprobs are not supported"),  # completions: null only (CompletionRequest)
    "top_logprobs": (_zero, "logprobs are not supported"),
    "response_format": (lambda v: v == {"type": "text"}, 'only {"type": "text"} is supported (no JSON mode or schema)'),
    "tools": (_falsy, "tools are not supported"),
    "functions": (_falsy, "functions are not supported"),
    "tool_choice": (lambda v: v == "none", "tools are not supported (only 'none')"),
    "function_call": (lambda v: v == "none", "functions are not supported (only 'none')"),
    "parallel_tool_calls": (_never, "tools are not supported"),
    "audio": (_never, "audio is not supported"),
    "prediction": (_never, "predicted outputs are not supported"),
    "modalities": (lambda v: v == ["text"], 'only ["text"] is supported'),
    # completions
    "echo": (_falsy, "echo is not supported"),
    "best_of": (lambda v: v == 1, "only best_of = 1 is supported"),
    "suffix": (_falsy, "suffix is not supported"),
    # a message's: only role and content reach the chat template; these would be lost
    "tool_calls": (_falsy, "tool calls in messages are not supported"),
    "refusal": (_falsy, "refusal in messages is not supported"),
    "annotations": (_falsy, "annotations in messages are not supported"),
}
NOT_USED = "accepted and not used"


def _check_unsupported(value: Any, info: ValidationInfo) -> Any:
    """`value` of field `info.field_name` if null or one that UNSUPPORTED takes, else a 400 naming it."""
    accepted, rule = UNSUPPORTED[str(info.field_name)]
    if value is not None and not accepted(value):
        raise PydanticCustomError("unsupported_value", "{rule}", {"rule": rule})
    return value


def _unsupported(description: str) -> Any:
    return Field(None, description=f"not implemented: {description}; any other value is a 400")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description=f"{NOT_USED} (no obfuscation padding)")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 naming it

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = _unsupported("1 only")
    presence_penalty: float | None = _unsupported("0 only")
    frequency_penalty: float | None = _unsupported("0 only")
    logit_bias: dict[str, float] | None = _unsupported("empty only")
    service_tier: str | None = _unsupported("'auto' or 'default' only")
    store: bool | None = Field(None, description=f"{NOT_USED}: nothing is stored")
    metadata: dict[str, str] | None = Field(None, description=NOT_USED)
    prompt_cache_key: str | None = Field(None, description=f"{NOT_USED}: prefix reuse is automatic")
    safety_identifier: str | None = Field(None, description=NOT_USED)
    split: int | Literal["auto"] | None = None
    codec: str | None = None
    min_agreement: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="accuracy budget of split 'auto': "
        "lossy codecs only where calibrated greedy agreement is at least this",
    )
    ignore_eos: bool = False  # as vLLM: generate max_tokens even past end-of-sequence (benchmarks)
    user: str | None = Field(
        None,
        description="end-user id (OpenAI); also the affinity key that keeps a "
        "conversation on one edge replica behind a proxy (header X-Session-Id wins): "
        f"{METADATA_MAX} printable ASCII characters at most",
    )

    @field_validator("user")
    @classmethod
    def _user_is_metadata_safe(cls, v: str | None) -> str | None:
        return None if v is None else metadata_value(v, "user")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator(*(name for name in UNSUPPORTED), check_fields=False)
    @classmethod
    def _unsupported_values(cls, v: Any, info: ValidationInfo) -> Any:
        return _check_unsupported(v, info)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message: only its role and content reach the chat template."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description=NOT_USED)
    tool_call_id: str | None = Field(None, description=NOT_USED)
    tool_calls: list[Any] | None = _unsupported("empty only")
    function_call: Any = _unsupported("null only")
    audio: Any = _unsupported("null only")
    refusal: str | None = _unsupported("empty only")
    annotations: list[Any] | None = _unsupported("empty only")

    _unsupported_values = field_validator("tool_calls", "function_call", "audio", "refusal", "annotations")(
        _check_unsupported
    )

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = _unsupported("false only")
    top_logprobs: int | None = _unsupported("0 only")
    response_format: dict[str, Any] | None = _unsupported('{"type": "text"} only')
    tools: list[Any] | None = _unsupported("empty only")
    tool_choice: str | dict[str, Any] | None = _unsupported("'none' only")
    functions: list[Any] | None = _unsupported("empty only")
    function_call: str | dict[str, Any] | None = _unsupported("'none' only")
    parallel_tool_calls: bool | None = _unsupported("null only")
    audio: dict[str, Any] | None = _unsupported("null only")
    prediction: dict[str, Any] | None = _unsupported("null only")
    modalities: list[str] | None = _unsupported('["text"] only')

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    logprobs: int | None = _unsupported("null only")
    echo: bool | None = _unsupported("false only")
    best_of: int | None = _unsupported("1 only")
    suffix: str | None = _unsupported("empty only")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        """Here a number of top logprobs: even 0 asks for the chosen tokens' logprobs."""
        if v is not None:
            raise PydanticCustomError("unsupported_value", "logprobs are not supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class CoinferTimings(BaseModel):
    ttft_seconds: float = Field(description="time to the first token, from the start of generation")
    total_seconds: float = Field(description="the whole generation on the device agent")
    device_compute_seconds: float = Field(description="the head's forwards on the device")
    edge_compute_seconds: float = Field(description="the edge's forwards for this request (its own timings)")
    edge_queue_seconds: float = Field(description="time the request's work waited in the edge's queue")
    edge_decode_seconds: float = Field(description="the edge's decoding of hidden-state frames")
    network_seconds: float = Field(
        description="time waiting on the edge that its own timings do not account for: the link's share"
    )


class CoinferPrediction(BaseModel):
    ttft_seconds: float = Field(description="predicted time to the first token")
    per_token_seconds: float = Field(description="predicted time per further token")
    total_seconds: float = Field(description="predicted time of the whole generation")


class CoinferStats(BaseModel):
    """coinfer's extension of a response: how the request was split and what crossed the link."""

    split: int = Field(description="layers run on the device (0: the edge alone, N: the device alone)")
    codec: str = Field(description="codec of the hidden-state frames; 'token_ids' at split 0, 'none' at split N")
    split_reason: str = Field(description="why this split: 'requested', or the partitioner's one-line reason")
    device_weights: str = Field(description="precision of the device's weights (fp32, bf16, int8, int4)")
    bytes_up: int = Field(description="bytes of every device -> edge message (Open, Prefill, Steps, replays)")
    bytes_down: int = Field(description="bytes of every edge -> device message")
    prefill_bytes_up: int = Field(description="bytes of the Prefill messages")
    step_bytes_up: int = Field(description="bytes of the Step messages (one per token after the first)")
    messages_up: int = Field(description="device -> edge messages")
    messages_down: int = Field(description="edge -> device messages")
    cached_tokens: int = Field(description="prompt positions the edge still held from an earlier turn (not sent)")
    replays: int = Field(description="edge sessions lost or evicted and replayed from the start")
    resumes: int = Field(description="broken streams the edge went on from without a replay")
    edge_replica: str = Field(description="the edge process (host:pid) that served the last stream; '' for none")
    busy_retries: int = Field(description="attempts retried because the edge was full")
    local_fallback: bool = Field(description="the edge failed and the device finished the generation alone")
    timings: CoinferTimings = Field(description="where the time went, in seconds")
    predicted: CoinferPrediction | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="split 'auto': what the partitioner predicted for the chosen split (absent otherwise)",
    )


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt positions the edge still held from an earlier turn


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    coinfer: CoinferStats


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    coinfer: CoinferStats | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    coinfer: CoinferStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coinfer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
