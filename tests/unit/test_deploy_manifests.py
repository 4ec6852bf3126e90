"""deploy/: the Kubernetes manifests, the compose scale-out profile, the proxy configs and the Ray
Serve config parse and reference only images, programs, flags, ports, probes and metrics that
exist in the project. (The proxies themselves run in tests/integration/test_scale_out.py.)

Deployment defaults (issue 20, items 3 and 8): every config ships per-device bearer tokens, the
image runs non-root, compose publishes on 127.0.0.1, every Kubernetes container is locked down
and limited, a NetworkPolicy lets only the router reach the edges, the proxies cap connections,
and the Ray Serve replicas apply the same token check as `edge-server`. Each checker below
returns its problems and is also run on a copy with the thing removed, so each check can fail."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import grpc
import pytest
import yaml

from edge_server import ray_serve
from edge_server.metrics import EdgeMetrics
from tests.support.compose import check_command, load_compose
from tests.support.paths import REPO
from tests.support.ray_fakes import FakeRayContext, bearer

K8S = REPO / "deploy" / "kubernetes"
IMAGE = "coinfer:0.1.0"
ROUTER_IMAGE = "nginx:1.27-alpine"
OPS_PATHS = {"/healthz", "/readyz", "/metrics"}


def _docs() -> list[dict]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert docs, "no manifests"
    return docs


def _flag(argv: list[str], name: str) -> int:
    return int(argv[argv.index(name) + 1])


def _pod_specs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _docs() if d["kind"] == "Deployment"}


def test_every_manifest_is_a_known_kind_with_a_name():
    kinds = {d["kind"] for d in _docs()}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret", "NetworkPolicy"}
    assert all(d["apiVersion"] and d["metadata"]["name"] for d in _docs())


def test_containers_run_our_image_with_real_flags_ports_and_probes():
    for dep in _pod_specs().values():
        template = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        for c in template["spec"]["containers"]:
            assert c["image"] in {IMAGE, ROUTER_IMAGE}, c["image"]
            ports = {p["containerPort"] for p in c["ports"]}
            if c["image"] == ROUTER_IMAGE:
                assert ports == {50051}
                continue
            argv = c["command"]
            check_command(argv)  # the program exists and takes these flags
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if argv[0] == "edge-server":
                grpc_port, ops_port = _flag(argv, "--grpc-port"), _flag(argv, "--ops-port")
                assert ports == {grpc_port, ops_port}
                assert c["readinessProbe"]["grpc"]["port"] == grpc_port  # grpc.health.v1, NOT_SERVING when draining
                for probe in ("livenessProbe", "startupProbe"):
                    assert c[probe]["httpGet"]["port"] == ops_port and c[probe]["httpGet"]["path"] in OPS_PATHS
                ann = template["metadata"]["annotations"]
                assert int(ann["prometheus.io/port"]) == ops_port and ann["prometheus.io/path"] == "/metrics"
            else:
                assert argv[0] == "device-agent"
                port = _flag(argv, "--port")
                assert ports == {port}
                assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
                router = env["COINFER_EDGE"].split(":")
                assert router[0] == "coinfer-edge-router" and int(router[1]) == 50051


def test_services_select_pods_and_name_their_ports():
    deps = _pod_specs()
    for svc in (d for d in _docs() if d["kind"] == "Service"):
        matches = [
            d
            for d in deps.values()
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, svc["metadata"]["name"]
        names = {p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    headless = next(d for d in _docs() if d["metadata"]["name"] == "coinfer-edge-headless")
    assert headless["spec"]["clusterIP"] == "None"


def test_autoscaler_targets_the_edge_on_a_metric_we_export():
    hpa = next(d for d in _docs() if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in _pod_specs()
    exported = {m.name for m in EdgeMetrics().registry.collect()}
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods and all(name in exported for name in pods)


def test_the_router_hashes_on_the_session_id_and_resolves_the_headless_service():
    cm = next(d for d in _docs() if d["kind"] == "ConfigMap")
    conf = cm["data"]["nginx.conf"]
    for text in (conf, (REPO / "deploy" / "nginx" / "nginx.conf").read_text()):
        assert "hash $http_x_session_id consistent;" in text and "grpc_pass grpc://coinfer_edges;" in text
        assert "client_max_body_size 0;" in text  # a session is one long request body
    assert "coinfer-edge-headless" in conf and " resolve " in conf
    haproxy = (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    assert "balance hdr(x-session-id)" in haproxy and "hash-type consistent" in haproxy and " check " in haproxy


def test_compose_scale_out_profile():
    services = load_compose()["services"]
    scale = {n: s for n, s in services.items() if "scale-out" in s.get("profiles", [])}
    assert {"edge-1", "edge-2", "edge-3", "edge-router", "device-agent-scale-out"} == set(scale)
    router = scale["edge-router"]
    assert router["image"] == ROUTER_IMAGE
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in router["volumes"]
    nginx = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    for edge in ("edge-1", "edge-2", "edge-3"):
        assert scale[edge]["command"][0] == "edge-server" and f"server {edge}:50051" in nginx
        assert router["depends_on"][edge]["condition"] == "service_healthy"
    agent = scale["device-agent-scale-out"]
    check_command(agent["command"])
    assert agent["environment"]["COINFER_EDGE"] == "edge-router:50051"


def test_ray_serve_config_points_at_our_application():
    cfg = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    module, attr = app["import_path"].split(":")
    mod = __import__(module, fromlist=[attr])
    assert callable(getattr(mod, attr))
    assert cfg["grpc_options"]["grpc_servicer_functions"] == [mod.SERVICER]
    from edge_server.config import EdgeSettings

    args = {k: v for k, v in app["args"].items() if k not in mod.APP_ARGS}
    assert set(args) <= set(EdgeSettings.flat_fields())  # every other arg is a real setting
    EdgeSettings(**args)
    assert app["args"]["auth_tokens_file"]  # tokens on in the shipped config
    assert not any(k.startswith("tls_") for k in app["args"])  # Ray's proxy cannot terminate TLS
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve not installed: schema check skipped")
    schema.ServeDeploySchema.model_validate(cfg) if hasattr(
        schema.ServeDeploySchema, "model_validate"
    ) else schema.ServeDeploySchema.parse_obj(cfg)


# -- deployment defaults: Kubernetes -------------------------------------------------------------

EDGE, AGENT, ROUTER = "coinfer-edge", "coinfer-device-agent", "coinfer-edge-router"


def _containers(docs: list[dict]):
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d["metadata"]["name"], c


def _hardening_problems(docs: list[dict]) -> list[str]:
    """Every container: non-root, no privilege escalation, no capabilities, read-only root, CPU and memory limits."""
    problems = []
    for dep, c in _containers(docs):
        where = f"{dep}/{c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot")
        if not isinstance(sc.get("runAsUser"), int) or sc["runAsUser"] == 0:
            problems.append(f"{where}: runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            problems.append(f"{where}: capabilities.drop ALL")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem")
        elif "/tmp" not in {m["mountPath"] for m in c.get("volumeMounts", [])}:
            problems.append(f"{where}: read-only root but no writable /tmp")
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if not (resources.get(kind) or {}).get(r):
                    problems.append(f"{where}: resources.{kind}.{r}")
    return problems


def test_every_container_is_non_root_locked_down_and_limited():
    docs = _docs()
    assert len(list(_containers(docs))) == 3
    assert _hardening_problems(docs) == []
    for path, value in (
        (("securityContext", "runAsNonRoot"), False),
        (("securityContext", "allowPrivilegeEscalation"), True),
        (("resources", "limits", "cpu"), None),
        (("resources", "limits", "memory"), None),
        (("securityContext", "capabilities"), None),
    ):
        for i in range(3):  # each container, each field: removing it is caught
            mutated = copy.deepcopy(docs)
            c = list(_containers(mutated))[i][1]
            target = c
            for key in path[:-1]:
                target = target[key]
            if value is None:
                del target[path[-1]]
            else:
                target[path[-1]] = value
            assert _hardening_problems(mutated), (path, i)


def test_image_user_and_writable_paths_match_the_manifests():
    uid = _dockerfile_user(_dockerfile())
    for _, c in _containers(_docs()):
        if c["image"] == IMAGE:
            assert c["securityContext"]["runAsUser"] == int(uid.split(":")[0])
            # the cost-profile cache (~/.cache of the image's user) is writable on a read-only root
            assert "/home/coinfer/.cache" in {m["mountPath"] for m in c["volumeMounts"]}
    assert "--home-dir /home/coinfer" in _dockerfile()


def _labels(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)["spec"]["template"][
        "metadata"
    ]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    return (
        bool(selector.get("matchLabels"))
        and selector["matchLabels"].items() <= labels.items()
        and not selector.get("matchExpressions")
    )


def _network_problems(docs: list[dict]) -> list[str]:
    """A NetworkPolicy selects the edge pods; its ingress reaches the gRPC port only from the router pods."""
    edge, router = _labels(docs, EDGE), _labels(docs, ROUTER)
    grpc_port = next(
        p for _, c in _containers(docs) if c["name"] == "edge-server" for p in c["ports"] if p["name"] == "grpc"
    )
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and _selects(d["spec"]["podSelector"], edge)]
    if not policies:
        return ["no NetworkPolicy selects the edge pods"]
    problems, grpc_rules = [], 0
    for pol in policies:
        if "Ingress" not in pol["spec"].get("policyTypes", []):
            problems.append(f"{pol['metadata']['name']}: no Ingress policy type")
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")  # absent: every port
            if ports is None:
                problems.append(f"{pol['metadata']['name']}: a rule opens every port: {rule}")
            elif not any(p.get("port") in (grpc_port["containerPort"], grpc_port["name"]) for p in ports):
                continue
            grpc_rules += 1
            peers = rule.get("from")  # absent: every source
            if not peers or any(
                set(peer) != {"podSelector"}
                or not _selects(peer["podSelector"], router)
                or _selects(peer["podSelector"], edge)
                or _selects(peer["podSelector"], _labels(docs, AGENT))
                for peer in peers
            ):
                problems.append(f"{pol['metadata']['name']}: the gRPC port is open to more than the router: {rule}")
    if not grpc_rules:
        problems.append("no ingress rule lets the router reach the gRPC port")
    return problems


def test_only_the_router_reaches_the_edges_grpc_port():
    docs = _docs()
    assert _network_problems(docs) == []
    pol = lambda ds: next(d for d in ds if d["kind"] == "NetworkPolicy")  # noqa: E731
    mutations = [
        lambda ds: ds.remove(pol(ds)),
        lambda ds: pol(ds)["spec"]["ingress"][0].pop("from"),
        lambda ds: pol(ds)["spec"]["ingress"][0].pop("ports"),
        lambda ds: pol(ds)["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
        lambda ds: pol(ds)["spec"]["ingress"][0]["from"][0]["podSelector"].update(
            matchLabels={"app.kubernetes.io/part-of": "coinfer"}
        ),
        lambda ds: pol(ds)["spec"]["ingress"][1]["ports"].append({"protocol": "TCP", "port": 50051}),
        lambda ds: pol(ds)["spec"].update(ingress=[{}]),
    ]
    for mutate in mutations:
        mutated = copy.deepcopy(docs)
        mutate(mutated)
        assert _network_problems(mutated), mutate


def _secret_ref(container: dict, env_name: str) -> tuple[str, str] | None:
    for e in container.get("env", []):
        if e["name"] == env_name:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            return (ref["name"], ref["key"]) if ref else None
    return None


def _secret_value(docs: list[dict], ref: tuple[str, str]) -> str | None:
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"] == ref[0]:
            import base64

            if ref[1] in (d.get("stringData") or {}):
                return d["stringData"][ref[1]]
            if ref[1] in (d.get("data") or {}):
                return base64.b64decode(d["data"][ref[1]]).decode()
    return None


def _token_problems(docs: list[dict]) -> list[str]:
    """The edges read COINFER_AUTH_TOKENS from a Secret, the agent its COINFER_EDGE_TOKEN, which the edges accept."""
    containers = dict((dep, c) for dep, c in _containers(docs))
    edge_ref, agent_ref = (
        _secret_ref(containers[EDGE], "COINFER_AUTH_TOKENS"),
        _secret_ref(containers[AGENT], "COINFER_EDGE_TOKEN"),
    )
    if edge_ref is None or agent_ref is None:
        return [f"not from a Secret: edge {edge_ref}, agent {agent_ref}"]
    accepted, own = _secret_value(docs, edge_ref), _secret_value(docs, agent_ref)
    if not accepted or not own:
        return [f"the Secret lacks {edge_ref} or {agent_ref}"]
    tokens = [t.strip() for t in accepted.split(",") if t.strip()]
    problems = [] if len(tokens) >= 2 else ["one token for every device: not per-device"]
    return problems + ([] if own in tokens else ["the agent's token is not one the edges accept"])


def test_edges_and_agent_take_their_tokens_from_a_secret():
    docs = _docs()
    assert _token_problems(docs) == []
    secret = lambda ds: next(d for d in ds if d["kind"] == "Secret")  # noqa: E731
    env = lambda ds, dep, name: next(e for d, c in _containers(ds) if d == dep for e in c["env"] if e["name"] == name)  # noqa: E731
    mutations = [
        lambda ds: ds.remove(secret(ds)),
        lambda ds: env(ds, EDGE, "COINFER_AUTH_TOKENS").update(value="t", valueFrom=None),
        lambda ds: env(ds, AGENT, "COINFER_EDGE_TOKEN").pop("valueFrom"),
        lambda ds: secret(ds)["stringData"].update({"agent-token": "not-listed"}),
    ]
    for mutate in mutations:
        mutated = copy.deepcopy(docs)
        mutate(mutated)
        assert _token_problems(mutated), mutate


# -- deployment defaults: compose ----------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def _interpolate(value, env: dict[str, str]):
    """docker compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$ over parsed YAML."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return arg if val is None else val
        if op in (":?", "?") and not val:
            raise AssertionError(f"compose needs {name}: {arg}")
        return val or ""

    return _INTERPOLATION.sub(sub, value)


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


ENV_EXAMPLE = REPO / "deploy" / "compose.env.example"


def _published(services: dict) -> list[tuple[str, str, int]]:
    """(service, host address, container port) of every published port."""
    out = []
    for name, svc in services.items():
        for p in svc.get("ports", []):
            if isinstance(p, dict):
                out.append((name, p.get("host_ip", ""), int(p["target"])))
            else:
                parts = str(p).split(":")
                out.append((name, parts[0] if len(parts) == 3 else "", int(parts[-1].split("/")[0])))
    return out


def test_compose_publishes_the_rest_ports_on_loopback_unless_told_otherwise():
    raw = load_compose()["services"]
    published = _published(_interpolate(raw, {}))
    assert ("device-agent", "127.0.0.1", 8000) in published
    assert published and all(host == "127.0.0.1" for _, host, _ in published), published
    assert all(host == "0.0.0.0" for _, host, _ in _published(_interpolate(raw, {"COINFER_PUBLISH_ADDR": "0.0.0.0"})))
    mutated = copy.deepcopy(raw)
    mutated["device-agent"]["ports"] = ["8000:8000"]  # the old default: every interface
    assert any(host != "127.0.0.1" for _, host, _ in _published(_interpolate(mutated, {})))


def _compose_token_problems(services: dict, env: dict[str, str]) -> list[str]:
    """Every edge requires tokens; every agent sends its own token, one the edges accept."""
    services = _interpolate(services, env)
    edges = {n: s for n, s in services.items() if s.get("command", [None])[0] == "edge-server"}
    agents = {n: s for n, s in services.items() if s.get("command", [None])[0] == "device-agent"}
    problems, accepted = [], None
    for name, svc in edges.items():
        environment = dict(svc.get("environment") or {})
        if svc.get("env_file") and env:  # tokens may come from an env file instead
            environment.update(env)
        tokens = frozenset(t.strip() for t in str(environment.get("COINFER_AUTH_TOKENS", "")).split(",") if t.strip())
        if not tokens:
            problems.append(f"{name}: no COINFER_AUTH_TOKENS")
        accepted = tokens if accepted is None else accepted & tokens
    own = {n: str((s.get("environment") or {}).get("COINFER_EDGE_TOKEN", "")) for n, s in agents.items()}
    for name, token in own.items():
        if not token or token not in (accepted or ()):
            problems.append(f"{name}: its token {token!r} is not one every edge accepts")
    if len(set(own.values())) != len(own):
        problems.append("agents share a token: one identity for several devices")
    return problems


def test_compose_edges_require_per_device_tokens():
    services = load_compose()["services"]
    assert len([s for s in services.values() if s.get("command", [None])[0] == "edge-server"]) == 5
    assert _compose_token_problems(services, {}) == []  # the built-in (dev-only) defaults
    example = _env_file(ENV_EXAMPLE)
    assert _compose_token_problems(services, example) == []  # with the example env file
    resolved = _interpolate(services, example)
    for var in ("COINFER_AGENT_TOKEN", "COINFER_SCALE_OUT_AGENT_TOKEN"):  # the example's variables are the ones used
        assert example[var] in resolved["edge-1"]["environment"]["COINFER_AUTH_TOKENS"].split(",")
    assert "COINFER_PUBLISH_ADDR" in example and "compose.env.example" in (REPO / "docker-compose.yml").read_text()
    for mutate in (
        lambda s: s["edge-server"]["environment"].pop("COINFER_AUTH_TOKENS"),
        lambda s: s["device-agent"]["environment"].pop("COINFER_EDGE_TOKEN"),
        lambda s: s["device-agent-scale-out"]["environment"].update(
            COINFER_EDGE_TOKEN=s["device-agent"]["environment"]["COINFER_EDGE_TOKEN"]
        ),
    ):
        mutated = copy.deepcopy(services)
        mutate(mutated)
        assert _compose_token_problems(mutated, {}), mutate


# -- deployment defaults: the image --------------------------------------------------------------


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if pending.strip():
                word, _, rest = pending.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _dockerfile_user(text: str) -> str:
    """The user the container runs as; AssertionError unless it is non-root and set after every RUN."""
    ins = _instructions(text)
    users = [i for i, (word, _) in enumerate(ins) if word == "USER"]
    assert users, "no USER: the container runs as root"
    last = users[-1]
    user = ins[last][1]
    assert user.split(":")[0] not in ("root", "0", ""), user
    runs = [i for i, (word, _) in enumerate(ins) if word == "RUN"]
    assert runs and max(runs) < last, "a RUN after USER (or USER before the root steps)"
    return user


def test_the_container_runs_as_a_non_root_user_created_in_the_image():
    text = _dockerfile()
    user = _dockerfile_user(text)
    uid = user.split(":")[0]
    assert re.search(rf"useradd\b[^\n]*--uid {uid}\b", " ".join(a for w, a in _instructions(text) if w == "RUN"))
    with pytest.raises(AssertionError):
        _dockerfile_user(re.sub(r"(?m)^USER .*$", "", text))
    with pytest.raises(AssertionError):
        _dockerfile_user(re.sub(r"(?m)^USER .*$", "USER root", text))
    with pytest.raises(AssertionError):
        _dockerfile_user(text + "\nRUN pip install something\n")


# -- deployment defaults: proxy connection limits -------------------------------------------------


def _nginx_limit_problems(text: str) -> list[str]:
    problems = []
    zone = re.search(r"limit_conn_zone\s+\$binary_remote_addr\s+zone=(\w+):\w+;", text)
    if not zone:
        return ["no limit_conn_zone keyed on the client address"]
    limit = re.search(rf"(?m)^\s*limit_conn\s+{zone.group(1)}\s+(\d+);", text)
    if not limit or int(limit.group(1)) < 1:
        problems.append("no limit_conn on the zone")
    workers = re.search(r"worker_connections\s+(\d+);", text)
    if not workers or not 256 <= int(workers.group(1)) <= 65536:
        problems.append("worker_connections missing or unreasonable")
    streams = re.search(r"http2_max_concurrent_streams\s+(\d+);", text)
    if not streams or int(streams.group(1)) > 1024:
        problems.append("http2_max_concurrent_streams missing or over 1024")
    return problems


def test_nginx_configs_limit_connections_per_client_address():
    router = next(d for d in _docs() if d["kind"] == "ConfigMap")["data"]["nginx.conf"]
    for text in ((REPO / "deploy" / "nginx" / "nginx.conf").read_text(), router):
        assert _nginx_limit_problems(text) == []
        assert "user " not in re.sub(r"#.*", "", text).split("events")[0]  # runs as whoever starts it (tests: root)
        for drop in (
            r"(?m)^\s*limit_conn \w+ \d+;\n",
            r"(?m)^\s*limit_conn_zone [^\n]*\n",
            r"(?m)^\s*http2_max_concurrent_streams [^\n]*\n",
        ):
            assert _nginx_limit_problems(re.sub(drop, "", text)), drop


def _haproxy_limit_problems(text: str) -> list[str]:
    sections, current = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line.strip())
    problems = []
    if not any(re.match(r"maxconn \d+$", ln) for ln in sections.get("global", [])):
        problems.append("no global maxconn")
    servers = [
        ln for name, lines in sections.items() if name.startswith("backend") for ln in lines if ln.startswith("server ")
    ]
    defaults = [
        ln
        for name, lines in sections.items()
        if name.startswith("backend")
        for ln in lines
        if ln.startswith("default-server ")
    ]
    if (
        not servers
        or not all(re.search(r"\bmaxconn \d+", ln) for ln in servers)
        and not any(re.search(r"\bmaxconn \d+", ln) for ln in defaults)
    ):
        problems.append("no maxconn per server")
    return problems


def test_haproxy_limits_connections_globally_and_per_server():
    text = (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    assert _haproxy_limit_problems(text) == []
    assert "sc0_conn_cur" in text and "tune.h2.max-concurrent-streams" in text  # per client address / connection
    assert _haproxy_limit_problems(re.sub(r"(?m)^(global\n)    maxconn \d+\n", r"\1", text))
    assert _haproxy_limit_problems(re.sub(r" maxconn \d+", "", re.sub(r"(?m)^    maxconn \d+\n", "", text)))


# -- the Ray Serve path: same token auth, no TLS pretence (its bridge runs in tests/component) ------


def test_ray_token_check_is_the_plain_servers_rule():
    check = ray_serve.TokenCheck(["tok-a", "tok-b"])
    assert check.enabled and check.allows(FakeRayContext(bearer("tok-b")))
    for md in ((), bearer("tok-c"), bearer("tok-a "), [("authorization", "tok-a")], [("authorization", "Basic tok-a")]):
        assert not check.allows(FakeRayContext(md)), md
    assert not check.allows(None)  # a call without any context (a local handle) has no token either
    assert ray_serve.TokenCheck([]).allows(FakeRayContext())  # no tokens configured: open, as edge-server
    ctx = FakeRayContext(bearer("tok-c"))
    with pytest.raises(ray_serve.StreamAborted):
        check.require(ctx)
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in ctx.details


def test_ray_path_refuses_tls_settings_instead_of_serving_plaintext(tmp_path):
    for key in ray_serve.TLS_SETTINGS:
        with pytest.raises(ValueError, match="cannot terminate TLS"):
            ray_serve.check_no_tls({key: "/x.pem"})
    ray_serve.check_no_tls({"auth_tokens": "a"})
    empty = tmp_path / "tokens"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="lists no token"):
        ray_serve.EdgeReplica({"model_dir": str(tmp_path)}, auth_tokens_file=str(empty))
    assert ray_serve.parse_tokens("a,b\n c\n\n") == ["a", "b", "c"]


def test_ray_context_cancel_ends_the_requests_and_runs_the_callbacks_once():
    inbox = ray_serve.Inbox()
    ctx = ray_serve.RayContext(FakeRayContext(), inbox)
    ran: list[int] = []
    assert ctx.add_callback(lambda: ran.append(1))
    ctx.cancel()  # what the servicer calls to end a stream (resume elsewhere, deadline)
    ctx.ended()
    assert ran == [1] and list(inbox) == [] and not ctx.add_callback(lambda: ran.append(2))


# -- deployment defaults: per-client caps and the scrape path ------------------------------------

PER_CLIENT = ("COINFER_MAX_SESSIONS_PER_CLIENT", "COINFER_MAX_STREAMS_PER_CLIENT")


def _edge_env_k8s(docs: list[dict]) -> dict[str, str]:
    edge = next(c for d, c in _containers(docs) if d == EDGE)
    return {e["name"]: e.get("value") for e in edge["env"]}


def _cap_problems(k8s_env: dict, compose_env: dict, ray_args: dict) -> list[str]:
    """One device (token) must not be able to take every session and stream slot of an edge, and the
    Kubernetes scraper (Prometheus annotations, the HPA's metric) must reach /metrics without a token."""
    problems = []
    for where, env in (("kubernetes", k8s_env), ("compose", compose_env)):
        problems += [f"{where}: {v} missing or 0" for v in PER_CLIENT if not int(env.get(v) or 0)]
    problems += [
        f"ray: {k} missing" for k in ("max_sessions_per_client", "max_streams_per_client") if not ray_args.get(k)
    ]
    if str(k8s_env.get("COINFER_OPS_AUTH", "true")).lower() != "false":
        problems.append("kubernetes: /metrics would need a device token (the scrape and the HPA break)")
    return problems


def test_per_client_caps_in_every_config_and_kubernetes_scrapes_without_a_token():
    k8s = _edge_env_k8s(_docs())
    compose = load_compose()["services"]["edge-server"]["environment"]
    ray = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())["applications"][0]["args"]
    assert _cap_problems(k8s, compose, ray) == []
    for drop in (
        lambda k, c, r: k.pop("COINFER_OPS_AUTH"),
        lambda k, c, r: c.pop(PER_CLIENT[0]),
        lambda k, c, r: k.pop(PER_CLIENT[1]),
        lambda k, c, r: r.pop("max_streams_per_client"),
    ):
        k2, c2, r2 = dict(k8s), dict(compose), dict(ray)
        drop(k2, c2, r2)
        assert _cap_problems(k2, c2, r2), drop
