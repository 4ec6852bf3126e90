"""Device agent settings: defaults < `COINFER_*` environment variables < command-line flags.

Grouped by the component that reads them (coinfer.settings_groups); the names of the variables and
flags are the fields' own, whatever their group."""

from __future__ import annotations

from pydantic import ConfigDict, Field, field_validator

from coinfer.model.prepare import DEFAULT_MODEL_DIR
from coinfer.planning.settings import EnergySettings, PlannerSettings
from coinfer.profile import DEFAULT_PROFILE_DIR
from coinfer.settings_groups import GroupedSettings, SettingsGroup, group_field


class RuntimeSettings(SettingsGroup):
    """The layers this device loads and how it runs them."""

    model_config = ConfigDict(title="Model and runtime")

    model_dir: str = Field(DEFAULT_MODEL_DIR, description="prepared model dir (coinfer prepare)")
    max_device_layers: int = Field(-1, ge=-1, description="layers the device loads (-1 = all: any split possible)")
    weights: str = Field(
        "fp32",
        pattern="^(fp32|bf16|int8|int4)$",
        description="weight precision of the layers loaded here: fp32 (exact), bf16, int8, int4",
    )
    compile: bool = Field(
        False,
        description="torch.compile the one-token decode step, 5 blocks per graph, at start (needs a "
        "C++ compiler; seconds more at start, up to a minute the first time; decodes faster, see "
        "benchmarks/README.md; not bit-exact; falls back to eager)",
    )
    torch_threads: int = Field(0, ge=0, description="intra-op threads for the model (0 = torch default)")
    profile_dir: str = Field(DEFAULT_PROFILE_DIR, description="cache dir of the measured cost profile ('' = no cache)")


class ApiSettings(SettingsGroup):
    """The OpenAI-compatible REST API: where it listens, who may call it, how much it takes at once."""

    model_config = ConfigDict(title="REST API")

    host: str = Field("127.0.0.1", description="address the REST API binds to")
    port: int = Field(8000, ge=0, le=65535, description="REST API port (0 = pick a free one)")
    api_key: str = Field(
        "",
        description="REST clients must send Authorization: Bearer <api_key> ('' = open); "
        "/healthz, /readyz and /metrics stay open",
    )
    model_name: str = Field("", description="model id served at /v1/models ('' = the model dir's name)")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_request_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="largest REST request body, bytes: a larger "
        "one gets 413, whether its Content-Length says so or its chunks add up to it",
    )
    max_concurrent_requests: int = Field(
        32,
        ge=1,
        le=4096,
        description="generations in flight at once, streamed "
        "ones until their stream ends; one more gets 503 + Retry-After at once "
        "(never queued); the worker threads are sized above it so health, "
        "readiness and metrics still answer",
    )


class RoutingSettings(SettingsGroup):
    """The route of a request that names none."""

    model_config = ConfigDict(title="Routing defaults")

    split: str = Field("auto", description="default split: 0..N layers on the device, or 'auto' (planned per request)")
    codec: str = Field(
        "f16",
        description="tensor codec of a request with an explicit split: f32 (exact), f16, int8, int4, uq10, uq20, uq40",
    )

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        if v != "auto" and not (v.isdigit()):
            raise ValueError(f"split must be 'auto' or a layer count 0..N, got {v!r}")
        return v


class ConnectionSettings(SettingsGroup):
    """The edge servers this device talks to, how it proves itself to them, and how often it measures
    them for the planner."""

    model_config = ConfigDict(title="Edge connection")

    edge: str = Field(
        "127.0.0.1:50051",
        description="edge server gRPC address host:port, or several "
        "comma-separated (the nearest, least loaded serves; the others take over when it fails); "
        "'' = device only",
    )
    edge_ca_file: str = Field(
        "", description="PEM CA of the edge's certificate: talk to the edge over TLS ('' = plaintext)"
    )
    edge_cert_file: str = Field("", description="PEM client certificate for mutual TLS with the edge")
    edge_key_file: str = Field("", description="PEM private key of edge_cert_file")
    edge_token: str = Field("", description="bearer token sent to the edge with every call")
    connect_timeout_seconds: float = Field(5.0, gt=0, description="wait for the edge channel to connect, s")
    request_timeout_seconds: float = Field(300.0, gt=0, description="deadline of one generation on the edge, s")
    max_message_bytes: int = Field(16 << 20, ge=1024, description="largest gRPC message, bytes")
    describe_interval_seconds: float = Field(2.0, gt=0, description="how often the edge's load is polled, s")
    link_max_age_seconds: float = Field(
        30.0, gt=0, description="probe the link when no transfer taught it for this long, s"
    )


class ResilienceSettings(SettingsGroup):
    """What a request does when its edge session is lost or the edge is full."""

    model_config = ConfigDict(title="Resilience")

    replays: int = Field(
        3,
        ge=0,
        description="times in a row a lost edge session is reopened and replayed without a new token in between",
    )
    busy_wait_seconds: float = Field(
        10.0,
        ge=0,
        description="how long a request retries an edge that is full "
        "(RESOURCE_EXHAUSTED) before it runs locally or answers 503, s",
    )


class PrefixSettings(SettingsGroup):
    """Reuse of an earlier turn's prefix: the edge's KV for it, and the head's own, kept here."""

    model_config = ConfigDict(title="Prefix reuse")

    prefix_reuse: bool = Field(
        True,
        description="offer the edge the prefix of each request's tokens, so a chat "
        "turn sends only its new tokens when the edge still holds the earlier ones",
    )
    prefix_cache_bytes: int = Field(256 << 20, ge=0, description="head KV caches kept for prefix reuse, bytes")


class AgentSettings(GroupedSettings):
    runtime: RuntimeSettings = group_field(RuntimeSettings)
    connection: ConnectionSettings = group_field(ConnectionSettings)
    api: ApiSettings = group_field(ApiSettings)
    routing: RoutingSettings = group_field(RoutingSettings)
    planner: PlannerSettings = group_field(PlannerSettings)
    energy: EnergySettings = group_field(EnergySettings)
    resilience: ResilienceSettings = group_field(ResilienceSettings)
    prefix: PrefixSettings = group_field(PrefixSettings)
