"""TLS and mutual TLS for the front doors, from PEM files checked when the router starts.

A router given a certificate and its key serves gRPC and HTTP over TLS only; given a client CA
too, it requires every client to present a certificate that CA signed (mutual TLS). The files
are read and checked against each other at start-up (a key that does not match the certificate,
a file that is not PEM), so a mistake fails `pdserve serve` at once, naming the file.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass


class TlsError(ValueError):
    """A TLS file is unreadable, not PEM, or does not fit the others."""


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as err:
        raise TlsError(f"{flag} {path}: cannot read it: {err.strerror or err}") from err
    if b"-----BEGIN " not in pem:
        raise TlsError(f"{flag} {path}: not a PEM file")
    return pem


@dataclass(frozen=True)
class TlsFiles:
    cert: str  # the server's certificate chain, PEM
    key: str  # its private key, PEM
    client_ca: str | None = None  # CA bundle client certificates must chain to: mutual TLS

    def load(self) -> "ServerTls":
        """Read and check the files; TlsError names the one at fault."""
        cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
        ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as err:
            if "KEY_VALUES_MISMATCH" in str(err) or "key values mismatch" in str(err):
                raise TlsError(f"--tls-key {self.key} does not match the certificate --tls-cert "
                               f"{self.cert}") from err
            raise TlsError(f"--tls-cert {self.cert} / --tls-key {self.key}: {err}") from err
        if self.client_ca:
            try:
                context.load_verify_locations(self.client_ca)
            except ssl.SSLError as err:
                raise TlsError(f"--tls-client-ca {self.client_ca}: {err}") from err
        return ServerTls(cert, key, ca, self)


@dataclass(frozen=True)
class ServerTls:
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None
    files: TlsFiles

    @property
    def mutual(self) -> bool:
        return self.client_ca_pem is not None

    def grpc_credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)],
                                           root_certificates=self.client_ca_pem,
                                           require_client_auth=self.mutual)

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTP front door."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.files.cert, self.files.key)
        if self.mutual:
            context.load_verify_locations(self.files.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def client_credentials(ca: str | None, cert: str | None = None, key: str | None = None):
    """gRPC channel credentials: trust `ca` (else the system's roots), and present cert/key
    when the server asks for a client certificate."""
    import grpc

    if (cert is None) != (key is None):
        raise TlsError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca") if ca else None,
        private_key=_read(key, "--tls-key") if key else None,
        certificate_chain=_read(cert, "--tls-cert") if cert else None)


def client_ssl_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """The same for an HTTP client."""
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context
