"""Edge server settings: defaults < `COINFER_*` environment variables < command-line flags.

Grouped by the component that reads them (coinfer.settings_groups); the names of the variables and
flags are the fields' own, whatever their group."""

from __future__ import annotations

from pydantic import ConfigDict, Field, field_validator, model_validator

from coinfer.model.prepare import DEFAULT_MODEL_DIR
from coinfer.profile import DEFAULT_PROFILE_DIR
from coinfer.settings_groups import GroupedSettings, SettingsGroup, group_field


class ServerSettings(SettingsGroup):
    """The gRPC and ops HTTP servers: where they listen, their threads, connections and shutdown."""

    model_config = ConfigDict(title="Server")

    host: str = Field("127.0.0.1", description="address the gRPC and ops servers bind to")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    ops_port: int = Field(
        8081, ge=0, le=65535, description="ops HTTP port: /healthz /readyz /metrics /v1/info /v1/sessions"
    )
    workers: int = Field(48, ge=2, description="gRPC handler threads (one per open stream, plus unary calls)")
    grace_seconds: float = Field(10.0, ge=0, description="SIGTERM: time in-flight sessions get to finish, s")
    max_message_bytes: int = Field(16 << 20, ge=1024, description="largest gRPC message, bytes")
    max_connection_idle_seconds: float = Field(
        300.0, gt=0, description="a connection with no stream for this long is closed, s"
    )


class SecuritySettings(SettingsGroup):
    """Who may call: TLS, mutual TLS and bearer tokens, for gRPC and the ops endpoints."""

    model_config = ConfigDict(title="Security")

    tls_cert_file: str = Field("", description="PEM certificate: serve gRPC over TLS ('' = plaintext)")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_client_ca_file: str = Field("", description="PEM CA: require client certificates signed by it (mutual TLS)")
    auth_tokens: str = Field(
        "",
        description="bearer tokens accepted, comma-separated ('' = no token needed); each is its own client identity",
    )
    ops_auth: bool = Field(
        True,
        description="with auth_tokens set, the ops endpoints other than /healthz and "
        "/readyz need the same bearer token as gRPC",
    )

    @field_validator("auth_tokens")
    @classmethod
    def _no_placeholder_tokens(cls, v: str) -> str:
        # the shipped Kubernetes Secret and compose example hold public placeholders: an edge that
        # accepted them would accept anyone who read this repository
        if "replace-me" in v.lower():
            raise ValueError(
                "auth_tokens still holds a REPLACE-ME placeholder: generate real tokens "
                "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return v


class LimitsSettings(SettingsGroup):
    """What one edge, and one client of it, may hold at once, and how long a silent stream is kept."""

    model_config = ConfigDict(title="Limits")

    max_sessions: int = Field(16, ge=1, description="concurrent sessions; more get RESOURCE_EXHAUSTED")
    max_sessions_per_client: int = Field(
        0,
        ge=0,
        description="concurrent sessions of one client identity (certificate, token or address; 0 = only max_sessions)",
    )
    max_streams: int = Field(
        32,
        ge=1,
        description="Generate streams open at once; more are refused with "
        "RESOURCE_EXHAUSTED (must be below workers: the rest serve health, Describe, Probe)",
    )
    max_streams_per_client: int = Field(
        0,
        ge=0,
        description="Generate streams one client identity may hold "
        "(0 = only max_streams); useful with per-device tokens",
    )
    max_context_tokens: int = Field(0, ge=0, description="prompt + new tokens per session (0 = the model's context)")
    max_new_tokens: int = Field(2048, ge=1, description="generated tokens per session")
    max_frame_bytes: int = Field(64 << 20, ge=1024, description="largest decoded tensor frame, bytes")
    max_probe_bytes: int = Field(1 << 20, ge=0, description="largest Probe reply (link measurement), bytes")
    first_message_seconds: float = Field(
        10.0, gt=0, description="a stream whose device sends no Open within this long is ended, s"
    )
    stream_idle_seconds: float = Field(
        60.0,
        gt=0,
        description="a stream whose device then sends nothing (no "
        "Step, no half-close, no reply taken) for this long is ended and its slot freed; it also bounds the "
        "device's head prefill at split > 0 (raise it for slow devices with long prompts), s",
    )


class KVSettings(SettingsGroup):
    """The sessions' KV caches: their memory budget, growth, idle expiry and reuse across chat turns."""

    model_config = ConfigDict(title="KV cache")

    kv_budget_bytes: int = Field(
        1 << 30,
        ge=1 << 16,
        description="KV cache bytes of all sessions together, live "
        "and kept for prefix reuse; beyond it idle caches are evicted (LRU), bytes",
    )
    kv_chunk_tokens: int = Field(64, ge=1, description="positions a session's KV cache grows by at a time")
    idle_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="a session whose device sends nothing this long loses its KV cache (its device replays), s",
    )
    prefix_reuse: bool = Field(
        True, description="keep finished sessions' KV caches (within the budget) for the next chat turn's prefix"
    )
    keep_seconds: float = Field(600.0, gt=0, description="how long a finished session's cache is kept, s")


class BatchingSettings(SettingsGroup):
    """How the scheduler shares the model among sessions: decode batches and chunked prefills."""

    model_config = ConfigDict(title="Batching")

    max_batch: int = Field(32, ge=1, description="decode steps of different sessions run in one forward")
    batch_wait_ms: float = Field(
        10.0,
        ge=0,
        description="longest wait for steps of decoding sessions to fill a "
        "batch (it ends early once 2 ms pass with no new step), ms",
    )
    prefill_chunk_tokens: int = Field(
        256, ge=1, description="prefills run in chunks this long, interleaved with decode batches"
    )


class RuntimeSettings(SettingsGroup):
    """The layers this edge loads and how it runs them."""

    model_config = ConfigDict(title="Model and runtime")

    model_dir: str = Field(DEFAULT_MODEL_DIR, description="prepared model dir (coinfer prepare)")
    min_split: int = Field(0, ge=0, description="lowest split served; the edge loads layers [min_split, N)")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for the model (0 = torch default)")
    weights: str = Field(
        "fp32",
        pattern="^(fp32|bf16|int8|int4)$",
        description="weight precision of the layers loaded here: fp32 (exact), bf16, int8, int4",
    )
    profile: bool = Field(
        True,
        description="measure per-layer costs at start-up (a few s, cached) and serve "
        "them in Describe for the devices' partitioners",
    )
    profile_dir: str = Field(DEFAULT_PROFILE_DIR, description="cache dir of measured cost profiles ('' = no cache)")


class EdgeSettings(GroupedSettings):
    runtime: RuntimeSettings = group_field(RuntimeSettings)
    server: ServerSettings = group_field(ServerSettings)
    security: SecuritySettings = group_field(SecuritySettings)
    limits: LimitsSettings = group_field(LimitsSettings)
    kv: KVSettings = group_field(KVSettings)
    batching: BatchingSettings = group_field(BatchingSettings)

    @model_validator(mode="after")
    def _threads_left(self) -> EdgeSettings:
        if self.limits.max_streams >= self.server.workers:
            raise ValueError(
                f"max_streams ({self.limits.max_streams}) must be below workers ({self.server.workers}): "
                "streams beyond it would take the threads health checks and Describe need"
            )
        return self
