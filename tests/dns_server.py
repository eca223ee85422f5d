"""A small authoritative DNS server on 127.0.0.1 for tests (never the real DNS): answers from a
dict {(name., type): [rdata text]} over UDP with dnspython's own message code, NXDOMAIN for names
it does not hold, in a thread of its own, so node processes can ask it too. It records the
questions it was asked, so a test can tell a cached answer from a new lookup."""
from __future__ import annotations

import socket
import threading

import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, zone: dict[tuple[str, str], list[str]], ttl: int = 300) -> None:
        self.zone = dict(zone)
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 3.0
        return resolver

    def asked(self, name: str, rdtype: str) -> int:
        return self.queries.count((name, rdtype))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "DnsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            try:
                self.sock.sendto(self._answer(dns.message.from_wire(data)).to_wire(), peer)
            except Exception:  # a malformed question gets no answer, as from a real server
                continue

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not any(zone_name == name for zone_name, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif (name, rdtype) in self.zone:
            response.answer.append(dns.rrset.from_text_list(question.name, self.ttl, "IN", rdtype,
                                                            self.zone[(name, rdtype)]))
        return response
