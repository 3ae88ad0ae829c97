"""DNS step: the system resolver, and explicit resolvers over UDP and TCP (dnspython on trio).

Why our own UDP loop instead of ``dns.asyncquery.udp``: that call returns the first matching
response and closes the socket.  An on-path injector wins exactly that race, and the genuine
answer that arrives a few milliseconds later is the evidence.  So we keep the socket open for a
short window after the first answer and keep every further response to the same query.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import trio

from kzprobe import errors as E
from kzprobe.model import STEP_DNS, Observation, now

_BACKEND: Any = None


def _backend() -> Any:
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = dns.asyncbackend.get_backend("trio")
    return _BACKEND


def parse_resolver(spec: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port); ValueError with a clear message."""
    spec = spec.strip()
    host, port = spec, 53
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        port = int(p)
    ipaddress.ip_address(host)  # raises ValueError
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def _rcode_failure(rcode: dns.rcode.Rcode) -> str | None:
    if rcode == dns.rcode.NOERROR:
        return None
    return {
        dns.rcode.NXDOMAIN: E.DNS_NXDOMAIN,
        dns.rcode.SERVFAIL: E.DNS_SERVFAIL,
        dns.rcode.REFUSED: E.DNS_REFUSED,
    }.get(rcode, f"{E.UNKNOWN}: rcode {dns.rcode.to_text(rcode)}")


def _answers(msg: dns.message.Message) -> list[dict[str, Any]]:
    out = []
    for rrset in msg.answer:
        for rd in rrset:
            out.append({
                "type": dns.rdatatype.to_text(rrset.rdtype),
                "name": rrset.name.to_text(omit_final_dot=True),
                "data": rd.to_text().rstrip("."),
                "ttl": rrset.ttl,
            })
    return out


def _addresses(answers: list[dict[str, Any]]) -> list[str]:
    return [a["data"] for a in answers if a["type"] in ("A", "AAAA")]


def _merge(target: str, domain: str, resolver: str, transport: str, t0: float,
           results: dict[str, tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]]) -> Observation:
    """Fold the A and AAAA lookups into one observation for (resolver, transport)."""
    fa, ans_a, resp_a = results.get("A", (E.TIMEOUT, [], []))
    fq, ans_q, _ = results.get("AAAA", (E.DNS_NO_ANSWER, [], []))
    answers = ans_a + ans_q
    addresses = _addresses(answers)
    if addresses:
        failure = None
    elif fa and fa != E.DNS_NO_ANSWER:
        failure = fa
    elif fq and fq not in (E.DNS_NO_ANSWER,):
        failure = fq
    else:
        failure = E.DNS_NO_ANSWER
    rcode = resp_a[0]["rcode"] if resp_a else None
    return Observation(
        step=STEP_DNS, target=target, domain=domain, t_start=t0, t_end=now(), failure=failure,
        data={"resolver": resolver, "transport": transport, "qtype": "A+AAAA", "rcode": rcode,
              "answers": answers, "addresses": addresses, "responses": resp_a},
    )


async def _udp_one(domain: str, ip: str, port: int, rdtype: str, timeout: float, window: float
                   ) -> tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]:
    q = dns.message.make_query(domain, rdtype)
    af = socket.AF_INET6 if ":" in ip else socket.AF_INET
    backend = _backend()
    responses: list[dict[str, Any]] = []
    first: dns.message.Message | None = None
    t_sent = trio.current_time()
    try:
        sock = await backend.make_socket(af, socket.SOCK_DGRAM, 0, None, None)
    except OSError as exc:
        return E.failure_string(exc), [], []
    async with sock:
        try:
            # Resend on silence (UDP loss), as stub resolvers do, up to the step timeout.
            with trio.fail_after(timeout):
                tries = 3
                for attempt in range(tries):
                    await dns.asyncquery.send_udp(sock, q, (ip, port))
                    with trio.move_on_after(timeout / tries if attempt < tries - 1 else timeout):
                        # receive_udp returns (message, received_time, from_address).
                        first = (await dns.asyncquery.receive_udp(
                            sock, (ip, port), ignore_unexpected=True, query=q))[0]
                    if first is not None:
                        break
        except (trio.TooSlowError, dns.exception.Timeout) as exc:
            return E.failure_string(exc), [], []
        except OSError as exc:
            return E.failure_string(exc), [], []
        except dns.exception.DNSException as exc:
            return f"{E.UNKNOWN}: {type(exc).__name__}", [], []
        assert first is not None
        responses.append({"rcode": dns.rcode.to_text(first.rcode()), "addresses": _addresses(_answers(first)),
                          "delay": round(trio.current_time() - t_sent, 4)})
        # Keep listening: a second answer to the same query is evidence of injection.
        with trio.move_on_after(window):
            while True:
                try:
                    extra = (await dns.asyncquery.receive_udp(sock, (ip, port), ignore_unexpected=True,
                                                              query=q))[0]
                except (dns.exception.DNSException, OSError):
                    break
                responses.append({"rcode": dns.rcode.to_text(extra.rcode()),
                                  "addresses": _addresses(_answers(extra)),
                                  "delay": round(trio.current_time() - t_sent, 4)})
    failure = _rcode_failure(first.rcode())
    answers = _answers(first)
    if failure is None and not _addresses(answers):
        failure = E.DNS_NO_ANSWER
    return failure, answers, responses


async def _tcp_one(domain: str, ip: str, port: int, rdtype: str, timeout: float
                   ) -> tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]:
    q = dns.message.make_query(domain, rdtype)
    try:
        with trio.fail_after(timeout):
            r = await dns.asyncquery.tcp(q, ip, timeout=timeout, port=port, backend=_backend())
    except (trio.TooSlowError, dns.exception.Timeout, OSError, EOFError) as exc:
        return E.failure_string(exc), [], []
    except dns.exception.DNSException as exc:
        return f"{E.UNKNOWN}: {type(exc).__name__}", [], []
    answers = _answers(r)
    failure = _rcode_failure(r.rcode())
    if failure is None and not _addresses(answers):
        failure = E.DNS_NO_ANSWER
    return failure, answers, [{"rcode": dns.rcode.to_text(r.rcode()), "addresses": _addresses(answers)}]


async def lookup(target: str, domain: str, resolver: str, transport: str, timeout: float,
                 window: float = 0.3) -> Observation:
    """Look up A and AAAA at one explicit resolver (``IP[:PORT]``) over ``udp`` or ``tcp``."""
    ip, port = parse_resolver(resolver)
    t0 = now()
    results: dict[str, tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]] = {}

    async def one(rdtype: str) -> None:
        if transport == "udp":
            results[rdtype] = await _udp_one(domain, ip, port, rdtype, timeout, window)
        else:
            results[rdtype] = await _tcp_one(domain, ip, port, rdtype, timeout)

    async with trio.open_nursery() as n:
        n.start_soon(one, "A")
        n.start_soon(one, "AAAA")
    label = f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}"
    return _merge(target, domain, label, transport, t0, results)


async def lookup_system(target: str, domain: str, timeout: float) -> Observation:
    """getaddrinfo, as every browser on the vantage point would resolve the name."""
    t0 = now()
    failure: str | None = None
    addresses: list[str] = []
    try:
        with trio.fail_after(timeout):
            infos = await trio.socket.getaddrinfo(domain, None, type=socket.SOCK_STREAM)
        # dict.fromkeys: ordered de-duplication in linear time (a name may carry thousands of records).
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    except socket.gaierror as exc:
        failure = E.gai_failure(exc)
    except (trio.TooSlowError, OSError) as exc:
        failure = E.failure_string(exc)
    if not failure and not addresses:
        failure = E.DNS_NO_ANSWER
    return Observation(
        step=STEP_DNS, target=target, domain=domain, t_start=t0, t_end=now(), failure=failure,
        data={"resolver": "system", "transport": "system", "qtype": "ANY",
              "answers": [{"type": "AAAA" if ":" in a else "A", "name": domain, "data": a, "ttl": None}
                          for a in addresses],
              "addresses": addresses, "responses": [{"rcode": None, "addresses": addresses}] if addresses else []},
    )


def system_resolvers() -> list[str]:
    """Nameservers from /etc/resolv.conf (recorded as vantage metadata)."""
    try:
        with open("/etc/resolv.conf", encoding="utf-8") as fh:
            return [line.split()[1] for line in fh if line.startswith("nameserver") and len(line.split()) > 1]
    except OSError:
        return []
