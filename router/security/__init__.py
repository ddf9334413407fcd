"""Who may use the router's front doors, and how much: API keys, per-key rate limits, TLS.

Step 1 of a request's life (admission) starts here, before validation: the front door (gRPC or
HTTP) authenticates the caller's key, and once the request is tokenized takes its share of the
key's requests and tokens per minute from buckets every router shares through Redis. TLS (and
mutual TLS, with a client CA) wraps both front doors' sockets. Nothing here knows gRPC or HTTP
wire types except the gRPC adapter (grpc_auth); the HTTP one is router.http.auth.
"""
from router.security.api_keys import ApiKeys, Unauthenticated, bearer_token
from router.security.config import SecurityConfig
from router.security.gatekeeper import Gatekeeper
from router.security.quota import Grant, Quota, RateLimited
from router.security.tls import ServerTls, TlsError, TlsFiles

__all__ = ["ApiKeys", "Gatekeeper", "Grant", "Quota", "RateLimited", "SecurityConfig", "ServerTls",
           "TlsError", "TlsFiles", "Unauthenticated", "bearer_token"]
