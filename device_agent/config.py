"""Device agent settings: defaults < `COINFER_*` environment variables < command-line flags."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coinfer.model.prepare import DEFAULT_MODEL_DIR


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COINFER_", extra="ignore")

    model_dir: str = Field(DEFAULT_MODEL_DIR, description="prepared model dir (coinfer prepare)")
    edge: str = Field("127.0.0.1:50051", description="edge server gRPC address host:port ('' = device only)")
    host: str = Field("127.0.0.1", description="address the REST API binds to")
    port: int = Field(8000, ge=0, le=65535, description="REST API port (0 = pick a free one)")
    split: str = Field("auto", description="default split: 0..N layers on the device, or 'auto'")
    auto_split: int = Field(15, ge=0, description="split 'auto' resolves to (until the partitioner lands)")
    codec: str = Field("f16", description="default tensor codec: f32 (exact), f16, int8, int4")
    max_device_layers: int = Field(-1, ge=-1, description="layers the device loads (-1 = all: any split possible)")
    model_name: str = Field("", description="model id served at /v1/models ('' = the model dir's name)")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    connect_timeout_seconds: float = Field(5.0, gt=0, description="wait for the edge channel to connect, s")
    request_timeout_seconds: float = Field(300.0, gt=0, description="deadline of one generation on the edge, s")
    max_message_bytes: int = Field(16 << 20, ge=1024, description="largest gRPC message, bytes")
    replays: int = Field(2, ge=0, description="times a lost edge session is reopened and replayed per request")
    torch_threads: int = Field(0, ge=0, description="intra-op threads for the model (0 = torch default)")
    weights: str = Field("fp32", pattern="^(fp32|bf16|int8)$",
                         description="weight precision of the layers loaded here: fp32 (exact), bf16, int8")

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        if v != "auto" and not (v.isdigit()):
            raise ValueError(f"split must be 'auto' or a layer count 0..N, got {v!r}")
        return v
