"""deploy/: the Kubernetes manifests, the compose scale-out profile, the proxy configs and the Ray
Serve config parse and reference only images, programs, flags, ports, probes and metrics that
exist in the project. (The proxies themselves run in tests/integration/test_scale_out.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_server.metrics import EdgeMetrics
from tests.unit.test_app_config import _check_command, _compose

REPO = Path(__file__).resolve().parents[2]
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
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    assert all(d["apiVersion"] and d["metadata"]["name"] for d in _docs())


def test_containers_run_our_image_with_real_flags_ports_and_probes():
    for name, dep in _pod_specs().items():
        template = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        for c in template["spec"]["containers"]:
            assert c["image"] in {IMAGE, ROUTER_IMAGE}, c["image"]
            ports = {p["containerPort"] for p in c["ports"]}
            if c["image"] == ROUTER_IMAGE:
                assert ports == {50051}
                continue
            argv = c["command"]
            _check_command(argv)  # the program exists and takes these flags
            env = {e["name"]: e["value"] for e in c.get("env", [])}
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
        matches = [d for d in deps.values()
                   if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
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
    services = _compose()["services"]
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
    _check_command(agent["command"])
    assert agent["environment"]["COINFER_EDGE"] == "edge-router:50051"


def test_ray_serve_config_points_at_our_application():
    cfg = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    module, attr = app["import_path"].split(":")
    mod = __import__(module, fromlist=[attr])
    assert callable(getattr(mod, attr))
    assert cfg["grpc_options"]["grpc_servicer_functions"] == [mod.SERVICER]
    from edge_server.config import EdgeSettings

    args = {k: v for k, v in app["args"].items() if k not in ("replicas", "max_replicas")}
    EdgeSettings(**args)  # every arg is a real setting
    schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve not installed: schema check skipped")
    schema.ServeDeploySchema.model_validate(cfg) if hasattr(schema.ServeDeploySchema, "model_validate") \
        else schema.ServeDeploySchema.parse_obj(cfg)
