"""Who may talk to the edge: TLS / mutual TLS credentials and bearer tokens, and the caller's identity.

- TLS: `tls_cert_file` + `tls_key_file` serve gRPC over TLS; with `tls_client_ca_file` the edge
  also requires a client certificate signed by that CA (mutual TLS) and refuses the handshake
  otherwise.
- Tokens: with `auth_tokens` set, every call but the gRPC health service must carry
  `authorization: Bearer <token>` in its metadata; a missing or unknown token is UNAUTHENTICATED
  before any handler runs.
- Identity: what the edge scopes per-client state by (kept prefix caches, the per-client session
  limit): the client certificate's subject under mutual TLS, else which token was used, else
  the peer's address.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc

from coinfer import wire

OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes of orchestrators carry no token
UNAUTHENTICATED = f"missing or unknown bearer token (metadata {wire.AUTHORIZATION_KEY}: {wire.BEARER}<token>)"


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS credentials from PEM files; a client CA turns on mutual TLS (client certificate required)."""
    key, cert = Path(key_file).read_bytes(), Path(cert_file).read_bytes()
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def token_identity(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenAuth(grpc.ServerInterceptor):
    """Refuses calls without one of the configured bearer tokens (UNAUTHENTICATED), health checks excepted."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = [t.encode() for t in tokens if t]

    def _known(self, token: str | None) -> bool:
        # constant-time compare per token: no timing hint about how much of a token was right
        return token is not None and any(hmac.compare_digest(token.encode(), t) for t in self.tokens)

    def allows(self, metadata) -> bool:
        """The call's metadata carries one of the tokens (constant-time compare)."""
        return self._known(wire.bearer_token(metadata))

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS) or self._known(
            wire.bearer_token(handler_call_details.invocation_metadata)
        ):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def identity(context, tokens_required: bool = True) -> str:
    """Who is calling (see the module docstring). A bearer token names the caller only where tokens
    are checked: elsewhere any string would do, and a client could take a new identity per call."""
    auth = context.auth_context() if context is not None else {}
    subject = auth.get("x509_subject") or auth.get("x509_common_name")
    if subject:
        return "cert:" + subject[0].decode(errors="replace")
    token = wire.bearer_token(context.invocation_metadata()) if context is not None and tokens_required else None
    if token:
        return token_identity(token)
    return "peer:" + (context.peer().rsplit(":", 1)[0] if context is not None else "local")
