"""A DNS-over-HTTPS server's handler for tests (RFC 8484: POST application/dns-message).

``sites`` maps names to the one A record they get; any other name is NXDOMAIN (as a real DoH
server says for an IP literal).  ``queries`` records every name asked, in order.  Subclass it to
give a test its own ``sites`` and ``queries``.
"""

from __future__ import annotations

import http.server
from typing import Any, ClassVar

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DoHHandler(http.server.BaseHTTPRequestHandler):
    sites: ClassVar[dict[str, str]] = {}
    queries: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        if self.path != "/dns-query" or self.headers.get("Content-Type") != "application/dns-message":
            self.send_error(415)
            return
        q = dns.message.from_wire(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        r = dns.message.make_response(q)
        name = q.question[0].name.to_text(omit_final_dot=True)
        self.queries.append(name)
        if name not in self.sites:
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", self.sites[name]))
        body = r.to_wire()
        self.send_response(200)
        self.send_header("Content-Type", "application/dns-message")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass
