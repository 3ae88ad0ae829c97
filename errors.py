"""Failure strings (OONI's vocabulary) and the mapping from Python exceptions to them.

Why a vocabulary and not exception classes: observations are stored, exported to OONI's data
format and compared across sources (live, pcap, OONI import).  A fixed set of strings, the same
ones OONI's netxlite emits, is what makes those comparable.

Why walk the exception graph: under trio, httpx and httpcore wrap the OS error several times
(``httpx.ConnectError`` <- ``httpcore.ConnectError`` <- ``trio.BrokenResourceError`` <-
``OSError(ECONNRESET)``), sometimes inside an ``ExceptionGroup`` raised by a nursery.  The errno is
the only reliable fact, so we search ``__cause__``, ``__context__`` and group members for it
before falling back to the exception types; message text is never parsed.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Iterator

# Failure strings.  Kept as module constants so typos are import errors, not silent mismatches.
DNS_NXDOMAIN = "dns_nxdomain_error"
DNS_SERVFAIL = "dns_servfail_error"
DNS_REFUSED = "dns_refused_error"
DNS_NO_ANSWER = "dns_no_answer"
DNS_BOGON = "dns_bogon_error"
CONNECTION_REFUSED = "connection_refused"
CONNECTION_RESET = "connection_reset"
CONNECTION_ABORTED = "connection_aborted"
TIMEOUT = "generic_timeout_error"
EOF = "eof_error"
HOST_UNREACHABLE = "host_unreachable"
NETWORK_UNREACHABLE = "network_unreachable"
SSL_INVALID_HOSTNAME = "ssl_invalid_hostname"
SSL_UNKNOWN_AUTHORITY = "ssl_unknown_authority"
SSL_INVALID_CERTIFICATE = "ssl_invalid_certificate"
SSL_FAILED_HANDSHAKE = "ssl_failed_handshake"
INTERRUPTED = "interrupted"
UNKNOWN = "unknown_failure"
#: netxlite's failure for a redirect whose Location cannot be followed (ooni/probe#2628).
HTTP_INVALID_REDIRECT = "http_invalid_redirect_location_host"
#: A response head that does not parse: the server sent something, so it is not an EOF.
HTTP_MALFORMED = "unknown_failure: malformed HTTP response"

#: Failures that mean "the network path itself is unusable" rather than "this site".
NETWORK_DOWN = frozenset({NETWORK_UNREACHABLE})

_ERRNO: dict[int, str] = {
    errno.ECONNREFUSED: CONNECTION_REFUSED,
    errno.ECONNRESET: CONNECTION_RESET,
    errno.EPIPE: CONNECTION_RESET,
    errno.ECONNABORTED: CONNECTION_ABORTED,
    errno.ETIMEDOUT: TIMEOUT,
    errno.EHOSTUNREACH: HOST_UNREACHABLE,
    errno.EHOSTDOWN: HOST_UNREACHABLE,
    errno.ENETUNREACH: NETWORK_UNREACHABLE,
    errno.ENETDOWN: NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: NETWORK_UNREACHABLE,
}

# OpenSSL X509_V_ERR_* codes (stable across OpenSSL versions).
_X509_UNKNOWN_AUTHORITY = {2, 18, 19, 20, 21, 27}
#: HOSTNAME_MISMATCH, EMAIL_MISMATCH, IP_ADDRESS_MISMATCH: the certificate is for another name
#: (64 is what an https://IP/ target, e.g. a Tor directory authority, gets).
_X509_HOSTNAME_MISMATCH = frozenset({62, 63, 64})


def walk(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception reachable through cause, context and groups, once each."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            stack.extend(reversed(e.exceptions))
        if e.__context__ is not None:
            stack.append(e.__context__)
        if e.__cause__ is not None:
            stack.append(e.__cause__)


def _from_errno(e: BaseException) -> str | None:
    if isinstance(e, OSError) and e.errno is not None:
        return _ERRNO.get(e.errno)
    return None


def _from_ssl(e: BaseException) -> str | None:
    if isinstance(e, ssl.SSLCertVerificationError):
        code = getattr(e, "verify_code", None)
        if code in _X509_HOSTNAME_MISMATCH:
            return SSL_INVALID_HOSTNAME
        if code in _X509_UNKNOWN_AUTHORITY:
            return SSL_UNKNOWN_AUTHORITY
        return SSL_INVALID_CERTIFICATE
    if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return EOF
    return None


def _from_malformed(e: BaseException) -> str | None:
    """h11 rejected the response head.  httpx raises the same RemoteProtocolError for that as for a
    clean close, and calling it eof_error would read as interference."""
    if type(e).__name__ == "RemoteProtocolError" and type(e).__module__.startswith("h11"):
        return HTTP_INVALID_REDIRECT if "location" in str(e).lower() else HTTP_MALFORMED
    if type(e).__name__ == "InvalidURL" and type(e).__module__.startswith("httpx"):
        # httpx builds the next request from every 3xx, and reports a Location that does not
        # parse as RemoteProtocolError with the InvalidURL as context.
        return HTTP_INVALID_REDIRECT
    return None


def _from_type(e: BaseException) -> str | None:
    """Library-specific types, imported lazily so this module stays cheap to import."""
    name = type(e).__name__
    module = type(e).__module__
    if name == "TooSlowError" and module.startswith("trio"):
        return TIMEOUT
    if isinstance(e, TimeoutError):
        return TIMEOUT
    if module.startswith(("httpx", "httpcore")):
        if "Timeout" in name:
            return TIMEOUT
        if name == "RemoteProtocolError":
            # "Server disconnected without sending a response": the peer closed cleanly.
            return EOF
    if module.startswith("dns."):
        if name == "NXDOMAIN":
            return DNS_NXDOMAIN
        if name in ("NoAnswer", "NoNameservers"):
            return DNS_NO_ANSWER
        if name in ("Timeout", "LifetimeTimeout"):
            return TIMEOUT
    if name == "BrokenResourceError" and module.startswith("trio"):
        # Broken without an errno underneath: the peer went away.
        return EOF
    if isinstance(e, EOFError | ConnectionResetError):
        return EOF if isinstance(e, EOFError) else CONNECTION_RESET
    return None


def failure_string(exc: BaseException) -> str:
    """Map an exception (however deeply wrapped) to one OONI failure string.

    The most specific fact wins: an errno anywhere in the graph, then a certificate or TLS
    EOF error, then library exception types, then a generic TLS failure.
    """
    chain = list(walk(exc))
    for finder in (_from_errno, _from_ssl, _from_malformed, _from_type):
        for e in chain:
            found = finder(e)
            if found:
                return found
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return SSL_FAILED_HANDSHAKE
    for e in chain:
        if isinstance(e, KeyboardInterrupt):
            return INTERRUPTED
    # Name the cause, not the wrapper: "ExceptionGroup: Exceptions from Trio nursery" says nothing.
    cause = leaf(exc)
    return f"{UNKNOWN}: {type(cause).__name__}: {cause}"[:200]


def leaf(exc: BaseException) -> BaseException:
    """The exception at the bottom of ``exc``: first member of each group, then explicit causes
    (or the implicit context, unless suppressed) down to the one that started it."""
    seen: set[int] = set()
    e = exc
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, BaseExceptionGroup) and e.exceptions:
            e = e.exceptions[0]
            continue
        nxt = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
        if nxt is None:
            break
        e = nxt
    return e


def gai_failure(exc: BaseException) -> str:
    """Map a ``socket.gaierror`` from getaddrinfo (the system resolver) to a DNS failure string."""
    import socket

    for e in walk(exc):
        if isinstance(e, socket.gaierror):
            code = e.args[0] if e.args else None
            if code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                return DNS_NXDOMAIN
            if code == socket.EAI_AGAIN:
                # Temporary failure: the resolver did not answer (or is unreachable).
                return TIMEOUT
            if code == socket.EAI_FAIL:
                return DNS_SERVFAIL
    return failure_string(exc)


# --- the command line's error boundary -------------------------------------------------------------
#: Exit status of an internal error (sysexits' EX_SOFTWARE), apart from 1 (a user's mistake).
EXIT_INTERNAL = 70


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions at the bottom of (possibly nested) exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


def crash_log_dir() -> str:
    import os
    from pathlib import Path

    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "kzprobe" / "logs")


def write_crash_log(exc: BaseException, argv: list[str]) -> str:
    """Write the full traceback to a log file; return its path (a temp file if the usual folder
    cannot be written)."""
    import datetime
    import os
    import tempfile
    import traceback
    from pathlib import Path

    text = "kzprobe " + " ".join(argv) + "\n\n" + "".join(traceback.format_exception(exc))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"crash-{stamp}-{os.getpid()}.log"
    for folder in (crash_log_dir(), tempfile.gettempdir()):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            path = Path(folder) / name
            path.write_text(text, encoding="utf-8")
            return str(path)
        except OSError:
            continue
    return "(no writable folder for the log)"


def user_error_line(exc: BaseException) -> str | None:
    """One line for a mistake of the user's or a problem of the environment, or None when the
    exception is a bug (an internal error)."""
    name = type(exc).__name__
    # Errors whose message is written for the user, one line, naming the file / option / URL.
    if name in ("StorageError", "TargetListError", "FingerprintError", "WireError", "OoniFormatError",
                "ScenarioError", "LabError", "PcapError", "TraceError", "UploadError"):
        return str(exc).splitlines()[0] if str(exc) else name
    if isinstance(exc, ModuleNotFoundError):
        hint = "install kzprobe[postgres]" if (exc.name or "").startswith(("psycopg", "asyncpg")) else \
            f"install the Python package that provides '{exc.name}'"
        return f"a module kzprobe needs is missing ({exc.name}): {hint}"
    if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError | NotADirectoryError):
        where = exc.filename or ""
        return f"{where}: {exc.strerror}" if where else str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory (an input too large? see the limits in docs/output.md)"
    return None
