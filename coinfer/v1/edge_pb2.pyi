from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class DescribeRequest(_message.Message):
    __slots__ = ("include_profile",)
    INCLUDE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    include_profile: bool
    def __init__(self, include_profile: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_context_tokens", "max_new_tokens", "max_message_bytes", "max_frame_bytes")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_context_tokens: int
    max_new_tokens: int
    max_message_bytes: int
    max_frame_bytes: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("active_sessions", "kv_cache_bytes", "queue_seconds", "busy_fraction", "kv_budget_bytes", "kept_caches")
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEPT_CACHES_FIELD_NUMBER: _ClassVar[int]
    active_sessions: int
    kv_cache_bytes: int
    queue_seconds: float
    busy_fraction: float
    kv_budget_bytes: int
    kept_caches: int
    def __init__(self, active_sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., busy_fraction: _Optional[float] = ..., kv_budget_bytes: _Optional[int] = ..., kept_caches: _Optional[int] = ...) -> None: ...

class CostLine(_message.Message):
    __slots__ = ("fixed", "per_token")
    FIXED_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    fixed: float
    per_token: float
    def __init__(self, fixed: _Optional[float] = ..., per_token: _Optional[float] = ...) -> None: ...

class CostProfile(_message.Message):
    __slots__ = ("start", "stop", "layer_prefill_seconds", "layer_decode_seconds", "embed_seconds", "head_seconds", "precision", "threads", "host", "measured_at")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LAYER_PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EMBED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    layer_prefill_seconds: _containers.RepeatedCompositeFieldContainer[CostLine]
    layer_decode_seconds: _containers.RepeatedScalarFieldContainer[float]
    embed_seconds: float
    head_seconds: float
    precision: str
    threads: int
    host: str
    measured_at: float
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ..., layer_prefill_seconds: _Optional[_Iterable[_Union[CostLine, _Mapping]]] = ..., layer_decode_seconds: _Optional[_Iterable[float]] = ..., embed_seconds: _Optional[float] = ..., head_seconds: _Optional[float] = ..., precision: _Optional[str] = ..., threads: _Optional[int] = ..., host: _Optional[str] = ..., measured_at: _Optional[float] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model", "fingerprint", "num_layers", "hidden_size", "vocab_size", "min_split", "codecs", "limits", "load", "server_version", "weights", "profile")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    min_split: int
    codecs: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    load: Load
    server_version: str
    weights: str
    profile: CostProfile
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., min_split: _Optional[int] = ..., codecs: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., server_version: _Optional[str] = ..., weights: _Optional[str] = ..., profile: _Optional[_Union[CostProfile, _Mapping]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("payload", "edge_seconds")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EDGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    edge_seconds: float
    def __init__(self, payload: _Optional[bytes] = ..., edge_seconds: _Optional[float] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("session_id", "fingerprint", "split", "codec", "sampling", "max_new_tokens", "stop_ids", "prefix_hashes", "prefix_lengths", "resume_tokens", "resume_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HASHES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    fingerprint: str
    split: int
    codec: str
    sampling: Sampling
    max_new_tokens: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    prefix_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    prefix_lengths: _containers.RepeatedScalarFieldContainer[int]
    resume_tokens: int
    resume_token: bytes
    def __init__(self, session_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., split: _Optional[int] = ..., codec: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ..., prefix_hashes: _Optional[_Iterable[bytes]] = ..., prefix_lengths: _Optional[_Iterable[int]] = ..., resume_tokens: _Optional[int] = ..., resume_token: _Optional[bytes] = ...) -> None: ...

class Prefill(_message.Message):
    __slots__ = ("frame", "token_ids", "block_hashes", "chain_state")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    CHAIN_STATE_FIELD_NUMBER: _ClassVar[int]
    frame: bytes
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    chain_state: bytes
    def __init__(self, frame: _Optional[bytes] = ..., token_ids: _Optional[_Iterable[int]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., chain_state: _Optional[bytes] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("frame",)
    FRAME_FIELD_NUMBER: _ClassVar[int]
    frame: bytes
    def __init__(self, frame: _Optional[bytes] = ...) -> None: ...

class DeviceMessage(_message.Message):
    __slots__ = ("open", "prefill", "step")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    open: Open
    prefill: Prefill
    step: Step
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., prefill: _Optional[_Union[Prefill, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class EdgeTimings(_message.Message):
    __slots__ = ("queue_seconds", "compute_seconds", "decode_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    compute_seconds: float
    decode_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "cached_tokens", "limits", "resumed", "replica", "resume_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    cached_tokens: int
    limits: Limits
    resumed: bool
    replica: str
    resume_token: bytes
    def __init__(self, session_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., resumed: _Optional[bool] = ..., replica: _Optional[str] = ..., resume_token: _Optional[bytes] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "logprob", "position", "timings", "finish_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    id: int
    logprob: float
    position: int
    timings: EdgeTimings
    finish_reason: FinishReason
    def __init__(self, id: _Optional[int] = ..., logprob: _Optional[float] = ..., position: _Optional[int] = ..., timings: _Optional[_Union[EdgeTimings, _Mapping]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "generated_tokens", "total")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    total: EdgeTimings
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., total: _Optional[_Union[EdgeTimings, _Mapping]] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("opened", "token", "done")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    token: Token
    done: Done
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...
