"""A real DNS server on a loopback port (dnslib), with a zone the test edits as it goes:
what a Kubernetes headless Service or a Compose network's DNS does for the encoders."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from tests.servers import free_port


class Zone(BaseResolver):  # type: ignore[misc]
    """Names -> IPv4 addresses, answered with a TTL of 1 s; editable while serving."""

    def __init__(self) -> None:
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.queries = 0

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self._records[name.rstrip(".").lower()] = list(addresses)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self._lock:
            self.queries += 1
            addresses = self._records.get(name)
        if addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for address in addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply  # other types of a known name: no records, no error


@contextmanager
def dns_server() -> Iterator[tuple[Zone, int]]:
    """A zone served over UDP and TCP on 127.0.0.1:PORT; yields (zone, port)."""
    zone = Zone()
    port = free_port()
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    servers = [DNSServer(zone, port=port, address="127.0.0.1", tcp=tcp, logger=quiet)
               for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    try:
        yield zone, port
    finally:
        for server in servers:
            server.stop()
