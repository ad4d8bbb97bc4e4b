"""A server's TLS certificate and key (and the CA of its clients, for mTLS), read again on
SIGHUP: a renewed certificate is served from the next connection on, without a restart.

It uses gRPC's dynamic server credentials: before each new connection's handshake, gRPC
asks `_fetch` whether the certificate changed. Connections already open keep theirs.
A renewed pair is checked first (the key matches the certificate, the CA parses); a pair
that does not pass is logged and the one in force stays.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

import grpc

log = logging.getLogger("clipsearch.tls")


class CertificateError(ValueError):
    """The certificate, key or CA cannot be used."""


class ReloadableCertificates:
    """The PEM files of a TLS server, and credentials that follow `reload()`."""

    def __init__(self, cert: str, key: str, ca: str = "") -> None:
        self.cert, self.key, self.ca = cert, key, ca
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert, self.key)
            if self.ca:
                context.load_verify_locations(self.ca)
            key, chain = Path(self.key).read_bytes(), Path(self.cert).read_bytes()
            ca = Path(self.ca).read_bytes() if self.ca else None
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"TLS files {self.cert}, {self.key}"
                                   f"{', ' + self.ca if self.ca else ''}: {exc}") from None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that take up a reloaded certificate at the next handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch,  # type: ignore[arg-type]  # None: no change (documented)
            require_client_authentication=bool(self.ca))

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before each handshake: the new configuration once, then None (no
        # change: gRPC keeps what it has).
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self) -> bool:
        """Reads the files again; True when new connections will use them."""
        try:
            configuration = self._load()
        except CertificateError as exc:
            log.error("TLS certificate not reloaded, the one in force stays: %s", exc)
            return False
        with self._lock:
            self._pending = configuration
        log.info("TLS certificate %s reloaded: new connections use it", self.cert)
        return True
