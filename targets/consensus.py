"""Tor network-status consensus: the relays, and a deterministic sample of guards as targets.

``kzprobe run --list tor --tor-consensus FILE --tor-sample N`` measures N guards of a consensus
beside the directory authorities.  The consensus is data from the user (or CollecTor): it is read
line by line with bounds on the file, the line and the relay count, and any malformation is one
:class:`ConsensusError` line ``FILE:LINE: reason``; nothing here touches the network.

The format is dir-spec.txt's "network-status-version 3" document (full or microdescriptor
flavour).  Only what sampling needs is read: the ``r`` line (nickname, identity, address, ORPort,
DirPort), the ``s`` line (flags) and the first ``a`` line (an IPv6 OR address, kept for the
record).  Signatures are not checked: a consensus passed by hand is trusted as much as the person
who passed it, and a forged one can only add targets to the user's own measurement.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from kzprobe.model import Claim, Target

#: A real consensus is ~3 MB (7,000 relays); 64 MiB is twenty times the largest ever published.
MAX_FILE_BYTES = 64 * 1024 * 1024
#: The longest line read (``params`` and ``known-flags`` lines are a few hundred bytes).
MAX_LINE_BYTES = 64 * 1024
MAX_RELAYS = 100_000
#: A guard must have all of these (what a Tor client requires of an entry guard).
GUARD_FLAGS = frozenset({"Guard", "Running", "Valid"})
#: ``--tor-sample`` default.
DEFAULT_SAMPLE = 10


class ConsensusError(Exception):
    """The file is not a usable consensus; the message is one line ``FILE[:LINE]: reason``."""


@dataclass(frozen=True, slots=True)
class Relay:
    nickname: str
    fingerprint: str  # 40 upper-case hex digits (the identity key's SHA-1)
    address: str
    or_port: int
    dir_port: int  # 0: none
    flags: frozenset[str] = frozenset()
    ipv6: str | None = None  # "[addr]:port" from the first ``a`` line

    @property
    def is_guard(self) -> bool:
        return GUARD_FLAGS <= self.flags


@dataclass
class Consensus:
    path: str
    valid_after: str = ""
    flavor: str = "ns"  # "ns" (full) or "microdesc"
    relays: list[Relay] = field(default_factory=list)

    @property
    def guards(self) -> list[Relay]:
        return [r for r in self.relays if r.is_guard]


def _lines(fh: BinaryIO, label: str) -> Iterator[tuple[int, str]]:
    """(line number, text) with the bounds applied; NUL or non-UTF-8 bytes end the read."""
    total = 0
    lineno = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        total += len(raw)
        if total > MAX_FILE_BYTES:
            raise ConsensusError(f"{label}:{lineno}: larger than {MAX_FILE_BYTES >> 20} MiB; not a consensus")
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise ConsensusError(f"{label}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; not a consensus")
        if b"\x00" in raw:
            raise ConsensusError(f"{label}:{lineno}: binary data (NUL byte); not a consensus")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConsensusError(f"{label}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x}); "
                                 "a consensus is text (decompress it first?)") from None
        yield lineno, text.rstrip("\r\n")


def _fingerprint(identity: str) -> str | None:
    """The base64 identity of an ``r`` line (27 characters, padding omitted) as hex."""
    try:
        raw = base64.b64decode(identity + "=" * (-len(identity) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex().upper() if len(raw) == 20 else None


def _port(text: str, allow_zero: bool) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if (allow_zero or port) and port <= 65535 else None


def _relay(parts: list[str], flavor: str) -> Relay | str:
    """Relay from the words of an ``r`` line, or why it is malformed."""
    # ns:        r nickname identity digest date time IP ORPort DirPort
    # microdesc: r nickname identity date time IP ORPort DirPort
    want = 9 if flavor == "ns" else 8
    if len(parts) != want:
        return f"'r' line has {len(parts)} fields, expected {want} ({flavor} flavour)"
    nickname, identity = parts[1], parts[2]
    if not (1 <= len(nickname) <= 19 and nickname.isascii() and nickname.isalnum()):
        return f"bad relay nickname {nickname[:40]!r}"
    fpr = _fingerprint(identity)
    if fpr is None:
        return f"bad relay identity {identity[:40]!r} (not 20 bytes of base64)"
    ip, orp, dirp = parts[-3], parts[-2], parts[-1]
    try:
        address = str(ipaddress.IPv4Address(ip))
    except ValueError:
        return f"bad relay address {ip[:40]!r} (not an IPv4 address)"
    or_port, dir_port = _port(orp, False), _port(dirp, True)
    if or_port is None:
        return f"bad ORPort {orp[:10]!r}"
    if dir_port is None:
        return f"bad DirPort {dirp[:10]!r}"
    return Relay(nickname=nickname, fingerprint=fpr, address=address, or_port=or_port, dir_port=dir_port)


def parse(path: str | Path) -> Consensus:
    """Read a consensus; raise :class:`ConsensusError` (one line) on anything malformed."""
    label = str(path)
    try:
        fh = Path(path).open("rb")
    except FileNotFoundError:
        raise ConsensusError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ConsensusError(f"{label}: is a directory, not a consensus") from None
    except OSError as exc:
        raise ConsensusError(f"{label}: cannot read ({exc.strerror or exc})") from None
    with fh:
        try:
            return _parse(fh, label)
        except OSError as exc:
            raise ConsensusError(f"{label}: cannot read ({exc.strerror or exc})") from None


def _parse(fh: BinaryIO, label: str) -> Consensus:
    out = Consensus(path=label)
    header = False
    status = ""
    current: Relay | None = None
    footer = False
    lineno = 0

    def flush() -> None:
        nonlocal current
        if current is not None:
            if len(out.relays) >= MAX_RELAYS:
                raise ConsensusError(f"{label}:{lineno}: more than {MAX_RELAYS} relays; not a consensus")
            out.relays.append(current)
            current = None

    for lineno, line in _lines(fh, label):
        if not header:
            if not line.strip() or line.startswith("@"):  # CollecTor's "@type ..." annotation
                continue
            words = line.split()
            if words[:2] != ["network-status-version", "3"]:
                raise ConsensusError(f"{label}:{lineno}: not a Tor consensus (expected 'network-status-version 3', "
                                     f"got {line[:60]!r})")
            out.flavor = "microdesc" if words[2:3] == ["microdesc"] else "ns"
            header = True
            continue
        if footer:
            continue  # signatures: not needed, and base64 blocks are not keyword lines
        keyword, _, rest = line.partition(" ")
        if keyword == "vote-status":
            status = rest.strip()
            if status != "consensus":
                raise ConsensusError(f"{label}:{lineno}: a {status or 'blank'} document, not a consensus")
        elif keyword == "valid-after":
            out.valid_after = rest.strip()[:40]
        elif keyword == "r":
            if not status:
                raise ConsensusError(f"{label}:{lineno}: relay before 'vote-status consensus'")
            flush()
            relay = _relay(line.split(), out.flavor)
            if isinstance(relay, str):
                raise ConsensusError(f"{label}:{lineno}: {relay}")
            current = relay
        elif keyword == "s":
            if current is None:
                raise ConsensusError(f"{label}:{lineno}: 's' line without a relay ('r' line) before it")
            current = Relay(current.nickname, current.fingerprint, current.address, current.or_port,
                            current.dir_port, frozenset(rest.split()), current.ipv6)
        elif keyword == "a" and current is not None and current.ipv6 is None:
            current = Relay(current.nickname, current.fingerprint, current.address, current.or_port,
                            current.dir_port, current.flags, rest.strip()[:64])
        elif keyword in ("directory-footer", "directory-signature"):
            flush()
            footer = True
    flush()
    if not header:
        raise ConsensusError(f"{label}: empty; not a Tor consensus")
    if not status:
        raise ConsensusError(f"{label}: no 'vote-status consensus' line; not a consensus")
    return out


def sample_guards(consensus: Consensus, n: int, seed: int | None) -> list[Relay]:
    """N guards drawn from SEED (all of them when there are fewer); a seed gives the same sample
    for the same file, in the consensus's order so the targets read like the file."""
    guards = consensus.guards
    if n >= len(guards):
        return guards
    picked = set(random.Random(seed).sample(range(len(guards)), n))
    return [g for i, g in enumerate(guards) if i in picked]


def guard_targets(consensus: Consensus, n: int, seed: int | None, claim: Claim | None = None) -> list[Target]:
    """tor-or:// (and tor-dir:// where a DirPort is set) targets for N sampled guards."""
    path = consensus.path
    if not consensus.guards:
        raise ConsensusError(f"{path}: no relay with the Guard, Running and Valid flags")
    out: list[Target] = []
    for g in sample_guards(consensus, n, seed):
        why = (f"Tor guard {g.nickname} (fingerprint {g.fingerprint}), sampled from the consensus valid after "
               f"{consensus.valid_after or '?'} ({Path(path).name}).")
        out.append(Target(url=f"tor-or://{g.address}:{g.or_port}", category="ANON", claim=claim,
                          notes=f"{why} OR port."))
        if g.dir_port:
            out.append(Target(url=f"tor-dir://{g.address}:{g.dir_port}", category="ANON", claim=claim,
                              notes=f"{why} DirPort."))
    return out
