"""TLS, mutual TLS, bearer tokens on the edge, the API key on the device agent, and per-client state:
certificates are made here with `cryptography`; real sockets on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coinfer import wire
from coinfer.model.sampling import SamplingParams
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from device_agent.cli import build_app
from device_agent.config import AgentSettings
from device_agent.generate import GenerationRequest, Result
from tests.support.edge import address, edge_server, open_msg
from tests.support.reference import greedy_reference

PROMPT = list(range(5, 45))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer_key, issuer: str, key, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, name: str, cert: x509.Certificate, key) -> tuple[str, str]:
    c, k = d / f"{name}.pem", d / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(c), str(k)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for ca_name in ("ca", "rogue-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        out[ca_name], _ = _write(d, ca_name, _cert(ca_name, ca_key, ca_name, ca_key, ca=True), ca_key)
        for who, server in (("edge", True), ("device", False)):
            key = ec.generate_private_key(ec.SECP256R1())
            prefix = "" if ca_name == "ca" else "rogue-"
            out[f"{prefix}{who}"], out[f"{prefix}{who}-key"] = _write(
                d, f"{prefix}{who}", _cert(f"{prefix}{who}", ca_key, ca_name, key, server=server), key
            )
    return out


def _engine(model_dir, edge, **kw):
    base = dict(connect_timeout_seconds=2, busy_wait_seconds=0, replays=0, max_device_layers=3)
    settings = AgentSettings(model_dir=str(model_dir), edge=address(edge), split="3", codec="f32", **{**base, **kw})
    return build_app(settings).state.logic.engine


def _generate(engine, prompt=PROMPT, n=6):
    out, result = [], None
    for ev in engine.stream(GenerationRequest(list(prompt), n, SamplingParams(), ignore_eos=True)):
        if isinstance(ev, Result):
            result = ev
        elif ev.token_id >= 0:
            out.append(ev.token_id)
    return out, result


def _refused(model_dir, edge, **kw):
    """An engine whose connection the edge refuses (it never connects: a short connect timeout)."""
    return _engine(model_dir, edge, connect_timeout_seconds=0.5, **kw)


def _fails(engine) -> str:
    from device_agent.edge.client import EdgeError

    with pytest.raises(EdgeError) as e:
        _generate(engine)
    return e.value.code.name


def test_tls_and_mutual_tls(tiny_dir, pki):
    expected = greedy_reference(tiny_dir, PROMPT, 6)
    with edge_server(tiny_dir, tls_cert_file=pki["edge"], tls_key_file=pki["edge-key"]) as edge:
        assert _generate(_engine(tiny_dir, edge, edge_ca_file=pki["ca"]))[0] == expected
        assert _fails(_refused(tiny_dir, edge)) == "UNAVAILABLE"  # plaintext client: no handshake
        assert _fails(_refused(tiny_dir, edge, edge_ca_file=pki["rogue-ca"])) == "UNAVAILABLE"  # wrong CA
    with edge_server(
        tiny_dir, tls_cert_file=pki["edge"], tls_key_file=pki["edge-key"], tls_client_ca_file=pki["ca"]
    ) as edge:
        ok = _engine(
            tiny_dir, edge, edge_ca_file=pki["ca"], edge_cert_file=pki["device"], edge_key_file=pki["device-key"]
        )
        assert _generate(ok)[0] == expected
        from coinfer.tools.healthcheck import main as healthcheck  # the container probe speaks mutual TLS too

        assert (
            healthcheck(["grpc", address(edge), "--ca", pki["ca"], "--cert", pki["device"], "--key", pki["device-key"]])
            == 0
        )
        assert healthcheck(["grpc", address(edge), "--timeout", "1"]) == 1
        assert _fails(_refused(tiny_dir, edge, edge_ca_file=pki["ca"])) == "UNAVAILABLE"  # no client certificate
        assert (
            _fails(
                _refused(
                    tiny_dir,
                    edge,
                    edge_ca_file=pki["ca"],
                    edge_cert_file=pki["rogue-device"],
                    edge_key_file=pki["rogue-device-key"],
                )
            )
            == "UNAVAILABLE"
        )  # certificate of another CA


def test_bearer_token_guards_every_call_but_health(tiny_dir):
    with edge_server(tiny_dir, auth_tokens="s3cret,other") as edge:
        with grpc.insecure_channel(address(edge)) as ch:
            stub = edge_pb2_grpc.EdgeInferenceStub(ch)
            for md in ((), wire.bearer_metadata("wrong"), ((wire.AUTHORIZATION_KEY, "s3cret"),)):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Describe(pb.DescribeRequest(), timeout=5, metadata=md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.Generate(iter([open_msg(edge.service.runner.fingerprint, 0)]), timeout=5, metadata=md))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(edge.service.sessions) == 0  # nothing ran
            assert stub.Describe(pb.DescribeRequest(), timeout=5, metadata=wire.bearer_metadata("s3cret"))
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert _fails(_engine(tiny_dir, edge)) == "UNAUTHENTICATED"
        assert _generate(_engine(tiny_dir, edge, edge_token="other"))[0] == greedy_reference(tiny_dir, PROMPT, 6)


def test_kept_caches_and_session_limits_are_per_client(tiny_dir):
    with edge_server(tiny_dir, auth_tokens="alice,bob", max_sessions_per_client=1) as edge:
        alice, bob = _engine(tiny_dir, edge, edge_token="alice"), _engine(tiny_dir, edge, edge_token="bob")
        _generate(alice)
        # bob offers the prefix alice's finished session left on the edge: not his to use (his device
        # has no head cache for it, so lend him alice's: the offer goes out, the edge must refuse it)
        bob.remote.head_caches = alice.remote.head_caches
        assert _generate(bob)[1].stats.cached_tokens == 0
        assert _generate(alice, PROMPT + [7] * 4)[1].stats.cached_tokens == 32  # alice's own: reused
        # one session per client: a second concurrent one of alice is refused, bob still gets in
        with grpc.insecure_channel(address(edge)) as ch:
            stub = edge_pb2_grpc.EdgeInferenceStub(ch)
            fp = edge.service.runner.fingerprint
            release = threading.Event()

            def open_and_wait():
                yield open_msg(fp, 0, session_id="a1")
                release.wait(10)

            held = stub.Generate(open_and_wait(), timeout=10, metadata=wire.bearer_metadata("alice"))
            assert next(held).WhichOneof("kind") == "opened"
            with pytest.raises(grpc.RpcError) as e:
                list(
                    stub.Generate(
                        iter([open_msg(fp, 0, session_id="a2")]), timeout=5, metadata=wire.bearer_metadata("alice")
                    )
                )
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per_client" in e.value.details()
            assert _generate(bob)[0]
            release.set()
            held.cancel()


def test_api_key_on_the_rest_api(tiny_dir):
    with edge_server(tiny_dir) as edge:
        app = build_app(AgentSettings(model_dir=str(tiny_dir), edge=address(edge), api_key="k-123"))
        with TestClient(app) as c:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k-123"}):
                r = c.get("/v1/models", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
                r = c.post("/v1/completions", json={"model": "x", "prompt": "w1", "max_tokens": 2}, headers=headers)
                assert r.status_code == 401
            assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
            auth = {"Authorization": "Bearer k-123"}
            name = c.get("/v1/models", headers=auth).json()["data"][0]["id"]
            r = c.post("/v1/completions", json={"model": name, "prompt": "w1", "max_tokens": 2}, headers=auth)
            assert r.status_code == 200, r.text


def test_half_configured_tls_is_refused(tiny_dir, pki):
    with pytest.raises(ValueError, match="TLS needs"):
        with edge_server(tiny_dir, tls_cert_file=pki["edge"]):
            pass
