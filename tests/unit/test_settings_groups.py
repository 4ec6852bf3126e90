"""Settings in groups under flat names: every COINFER_* variable and --flag of the apps stays what
deployments already set, values land in the group of the component that reads them, flags beat the
environment, and `coinfer plan` takes the planner's own flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coinfer.planning.settings import EnergySettings, PlannerSettings
from coinfer.settings_cli import settings_from_args
from coinfer.settings_groups import GroupedSettings, SettingsGroup, group_field
from device_agent.cli import build_parser as agent_parser
from device_agent.config import AgentSettings
from edge_server.cli import build_parser as edge_parser
from edge_server.config import EdgeSettings

# the names deployments set: the apps' variables and flags before the settings were grouped (the
# agent's benchmark-only COINFER_DEVICE_SLOWDOWN / --device-slowdown left for benchmarks/emulated_device.py)
AGENT_ENV = {
    "COINFER_API_KEY",
    "COINFER_BUSY_WAIT_SECONDS",
    "COINFER_CODEC",
    "COINFER_COMPILE",
    "COINFER_COMPUTE_WATTS",
    "COINFER_CONNECT_TIMEOUT_SECONDS",
    "COINFER_DEFAULT_MAX_TOKENS",
    "COINFER_DESCRIBE_INTERVAL_SECONDS",
    "COINFER_EDGE",
    "COINFER_EDGE_CA_FILE",
    "COINFER_EDGE_CERT_FILE",
    "COINFER_EDGE_KEY_FILE",
    "COINFER_EDGE_TOKEN",
    "COINFER_ENERGY_WEIGHT",
    "COINFER_HOST",
    "COINFER_IDLE_WATTS",
    "COINFER_LINK_MAX_AGE_SECONDS",
    "COINFER_MAX_CONCURRENT_REQUESTS",
    "COINFER_MAX_DEVICE_LAYERS",
    "COINFER_MAX_MESSAGE_BYTES",
    "COINFER_MAX_REQUEST_BYTES",
    "COINFER_MIN_AGREEMENT",
    "COINFER_MIN_DEVICE_LAYERS",
    "COINFER_MODEL_DIR",
    "COINFER_MODEL_NAME",
    "COINFER_OBJECTIVE",
    "COINFER_PLAN_CODECS",
    "COINFER_PORT",
    "COINFER_PREFIX_CACHE_BYTES",
    "COINFER_PREFIX_REUSE",
    "COINFER_PROFILE_DIR",
    "COINFER_REPLAYS",
    "COINFER_REQUEST_TIMEOUT_SECONDS",
    "COINFER_RX_JOULES_PER_BYTE",
    "COINFER_SPLIT",
    "COINFER_TORCH_THREADS",
    "COINFER_TX_JOULES_PER_BYTE",
    "COINFER_WEIGHTS",
}
AGENT_FLAGS = {
    "--api-key",
    "--busy-wait-seconds",
    "--codec",
    "--compile",
    "--compute-watts",
    "--connect-timeout-seconds",
    "--default-max-tokens",
    "--describe-interval-seconds",
    "--edge",
    "--edge-ca-file",
    "--edge-cert-file",
    "--edge-key-file",
    "--edge-token",
    "--energy-weight",
    "--help",
    "--host",
    "--idle-watts",
    "--link-max-age-seconds",
    "--log-level",
    "--max-concurrent-requests",
    "--max-device-layers",
    "--max-message-bytes",
    "--max-request-bytes",
    "--min-agreement",
    "--min-device-layers",
    "--model-dir",
    "--model-name",
    "--objective",
    "--plan-codecs",
    "--port",
    "--prefix-cache-bytes",
    "--prefix-reuse",
    "--profile-dir",
    "--replays",
    "--request-timeout-seconds",
    "--rx-joules-per-byte",
    "--split",
    "--torch-threads",
    "--tx-joules-per-byte",
    "--weights",
}
EDGE_ENV = {
    "COINFER_AUTH_TOKENS",
    "COINFER_BATCH_WAIT_MS",
    "COINFER_FIRST_MESSAGE_SECONDS",
    "COINFER_GRACE_SECONDS",
    "COINFER_GRPC_PORT",
    "COINFER_HOST",
    "COINFER_IDLE_TIMEOUT_SECONDS",
    "COINFER_KEEP_SECONDS",
    "COINFER_KV_BUDGET_BYTES",
    "COINFER_KV_CHUNK_TOKENS",
    "COINFER_MAX_BATCH",
    "COINFER_MAX_CONNECTION_IDLE_SECONDS",
    "COINFER_MAX_CONTEXT_TOKENS",
    "COINFER_MAX_FRAME_BYTES",
    "COINFER_MAX_MESSAGE_BYTES",
    "COINFER_MAX_NEW_TOKENS",
    "COINFER_MAX_PROBE_BYTES",
    "COINFER_MAX_SESSIONS",
    "COINFER_MAX_SESSIONS_PER_CLIENT",
    "COINFER_MAX_STREAMS",
    "COINFER_MAX_STREAMS_PER_CLIENT",
    "COINFER_MIN_SPLIT",
    "COINFER_MODEL_DIR",
    "COINFER_OPS_AUTH",
    "COINFER_OPS_PORT",
    "COINFER_PREFILL_CHUNK_TOKENS",
    "COINFER_PREFIX_REUSE",
    "COINFER_PROFILE",
    "COINFER_PROFILE_DIR",
    "COINFER_STREAM_IDLE_SECONDS",
    "COINFER_TLS_CERT_FILE",
    "COINFER_TLS_CLIENT_CA_FILE",
    "COINFER_TLS_KEY_FILE",
    "COINFER_TORCH_THREADS",
    "COINFER_WEIGHTS",
    "COINFER_WORKERS",
}
EDGE_FLAGS = {
    "--auth-tokens",
    "--batch-wait-ms",
    "--first-message-seconds",
    "--grace-seconds",
    "--grpc-port",
    "--help",
    "--host",
    "--idle-timeout-seconds",
    "--keep-seconds",
    "--kv-budget-bytes",
    "--kv-chunk-tokens",
    "--log-level",
    "--max-batch",
    "--max-connection-idle-seconds",
    "--max-context-tokens",
    "--max-frame-bytes",
    "--max-message-bytes",
    "--max-new-tokens",
    "--max-probe-bytes",
    "--max-sessions",
    "--max-sessions-per-client",
    "--max-streams",
    "--max-streams-per-client",
    "--min-split",
    "--model-dir",
    "--ops-auth",
    "--ops-port",
    "--prefill-chunk-tokens",
    "--prefix-reuse",
    "--profile",
    "--profile-dir",
    "--stream-idle-seconds",
    "--tls-cert-file",
    "--tls-client-ca-file",
    "--tls-key-file",
    "--torch-threads",
    "--weights",
    "--workers",
}
APPS = {
    "device-agent": (AgentSettings, agent_parser, AGENT_ENV, AGENT_FLAGS),
    "edge-server": (EdgeSettings, edge_parser, EDGE_ENV, EDGE_FLAGS),
}


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("app", APPS)
def test_variable_and_flag_names_are_unchanged(app):
    cls, parser, env, flags = APPS[app]
    assert {f"COINFER_{name.upper()}" for name in cls.flat_fields()} == env
    # added since, none taken away: --version, and the --no-<name> form of every boolean
    negations = {f"--no-{name.replace('_', '-')}" for name, f in cls.flat_fields().items() if f.annotation is bool}
    assert negations and _flags(parser()) == flags | negations | {"--version"}


@pytest.mark.parametrize("app", APPS)
def test_every_setting_is_in_exactly_one_group(app):
    cls = APPS[app][0]
    names = [name for group in cls.groups().values() for name in group.model_fields]
    assert len(names) == len(set(names)) == len(cls.group_of())
    assert not set(names) & set(cls.model_fields)  # no setting is named like a group
    assert all(g.purpose() and g.title() != g.__name__ for g in cls.groups().values())


def test_a_name_in_two_groups_is_refused_when_the_class_is_defined():
    class A(SettingsGroup):
        """a"""

        x: int = 1

    class B(SettingsGroup):
        """b"""

        x: int = 2

    with pytest.raises(TypeError, match="'x' is in groups 'a' and 'b'"):

        class Twice(GroupedSettings):
            a: A = group_field(A)
            b: B = group_field(B)

    with pytest.raises(TypeError, match="named like a group"):

        class Shadowed(GroupedSettings):
            x: A = group_field(A)


def test_flat_environment_lands_in_the_groups(monkeypatch):
    monkeypatch.setenv("COINFER_OBJECTIVE", "energy")
    monkeypatch.setenv("COINFER_IDLE_WATTS", "0.5")
    monkeypatch.setenv("coinfer_split", "7")  # any case, as before
    monkeypatch.setenv("COINFER_KV_BUDGET_BYTES", str(1 << 20))
    monkeypatch.setenv("COINFER_WORKERS", "64")
    a, e = AgentSettings(), EdgeSettings()
    assert (a.planner.objective, a.energy.idle_watts, a.routing.split) == ("energy", 0.5, "7")
    assert (e.kv.kv_budget_bytes, e.server.workers) == (1 << 20, 64)


def test_a_variable_named_after_a_group_is_not_read(monkeypatch):
    monkeypatch.setenv("COINFER_ROUTING", '{"split": "3"}')
    monkeypatch.setenv("COINFER_LIMITS", '{"max_sessions": 3}')
    assert AgentSettings().routing.split == "auto" and EdgeSettings().limits.max_sessions == 16


def test_flat_keyword_arguments_land_in_the_groups_over_the_environment(monkeypatch):
    monkeypatch.setenv("COINFER_CODEC", "int8")
    monkeypatch.setenv("COINFER_SPLIT", "3")
    a = AgentSettings(split="15", edge="", replays=5, prefix_cache_bytes=0)
    assert (a.routing.split, a.routing.codec) == ("15", "int8")
    assert (a.connection.edge, a.resilience.replays, a.prefix.prefix_cache_bytes) == ("", 5, 0)
    assert EdgeSettings(**{"max_sessions": 4}).limits.max_sessions == 4


def test_a_grouped_dump_rebuilds_and_a_flat_name_wins_over_its_group():
    a = AgentSettings(split="15", codec="f32", max_concurrent_requests=2)
    assert AgentSettings(**a.model_dump()) == a == AgentSettings(**a.flat())
    b = AgentSettings(**{**a.model_dump(), "codec": "int4"})
    assert (b.routing.split, b.routing.codec, b.api.max_concurrent_requests) == ("15", "int4", 2)
    assert set(EdgeSettings().flat()) == set(EdgeSettings.flat_fields())


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("COINFER_OBJECTIVE", "energy")
    monkeypatch.setenv("COINFER_COMPUTE_WATTS", "3")
    monkeypatch.setenv("COINFER_REPLAYS", "1")
    p = agent_parser()
    a = settings_from_args(AgentSettings, p.parse_args(["--objective", "weighted", "--replays", "0"]), p)
    assert (a.planner.objective, a.energy.compute_watts, a.resilience.replays) == ("weighted", 3.0, 0)
    monkeypatch.setenv("COINFER_BATCH_WAIT_MS", "5")
    monkeypatch.setenv("COINFER_OPS_AUTH", "false")
    p = edge_parser()
    e = settings_from_args(EdgeSettings, p.parse_args(["--batch-wait-ms", "1", "--prefix-reuse", "false"]), p)
    assert (e.batching.batch_wait_ms, e.security.ops_auth, e.kv.prefix_reuse) == (1.0, False, False)


def test_validators_still_refuse_bad_values(capsys):
    with pytest.raises(ValidationError, match="plan_codecs"):
        AgentSettings(plan_codecs="f16,zip")
    assert AgentSettings(plan_codecs=" f16 , int8 ").planner.plan_codecs == "f16,int8"
    p = agent_parser()
    with pytest.raises(SystemExit) as e:
        settings_from_args(AgentSettings, p.parse_args(["--compute-watts", "-1"]), p)
    assert e.value.code == 2 and "compute_watts: " in capsys.readouterr().err


def test_the_agent_has_no_slowdown_setting():
    assert "device_slowdown" not in AgentSettings.flat_fields()
    assert AgentSettings(device_slowdown=4).flat() == AgentSettings().flat()  # unknown names are ignored, as before


def test_coinfer_plan_takes_the_planner_and_energy_flags(capsys):
    from coinfer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in (*PlannerSettings.model_fields, *EnergySettings.model_fields):
        assert f"--{name.replace('_', '-')}" in text
    for flag in ("--bandwidth", "--rtt", "--prompt-tokens", "--device-slowdown", "--codecs"):
        assert flag in text  # the what-if's own flags stay
    assert main(["plan", "--idle-watts", "-1"]) == 2 and "idle_watts" in capsys.readouterr().err


def test_the_emulated_device_passes_the_agent_its_flags(monkeypatch):
    from benchmarks import emulated_device

    seen = {}
    monkeypatch.setattr(emulated_device, "run", lambda settings, build: seen.update(settings=settings) or 0)
    assert emulated_device.main(["--split", "3", "--slowdown", "4", "--edge", ""]) == 0
    assert (seen["settings"].routing.split, seen["settings"].connection.edge) == ("3", "")
    with pytest.raises(SystemExit):
        emulated_device.main(["--slowdown", "0.5"])
