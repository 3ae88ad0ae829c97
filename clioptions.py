"""Options checked when they are parsed, so a mistake is one line before anything is measured.

Why at parse time: a ``--helper notaurl`` accepted as is fails once per target, hundreds of
lines later; a non-PEM ``--ca-bundle`` used to surface as a 43-line exception group from inside
the run, leaving an empty run behind.  Each check names the option and the value.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

#: Files an option points at are read whole; none of them is legitimately this large.
MAX_OPTION_FILE = 16 * 1024 * 1024


def _url(value: str, schemes: tuple[str, ...], what: str) -> str:
    try:
        parts = urlsplit(value)
        _port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: not a URL ({exc})") from None
    if parts.scheme not in schemes or not parts.hostname:
        want = " or ".join(f"{s}://HOST" for s in schemes)
        raise click.BadParameter(f"{value!r}: not {what} ({want}[:PORT]/…)")
    return value


def check_helpers(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for v in values:
        _url(v, ("http", "https"), "a helper URL")
        frag = urlsplit(v).fragment
        if frag and not frag.startswith("token="):
            raise click.BadParameter(f"{v!r}: the only fragment a helper URL takes is '#token=T'")
    return values


def check_doh(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for v in values:
        if v != "default":
            _url(v, ("https",), "a DNS-over-HTTPS URL")
    return values


def check_ip(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: not an IP address") from None
    return value


def _read_option_file(path: str) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_OPTION_FILE:
            raise click.BadParameter(f"{path}: larger than {MAX_OPTION_FILE >> 20} MiB")
        with p.open("rb") as fh:
            data = fh.read(MAX_OPTION_FILE + 1)
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_OPTION_FILE:  # a device or a growing file: stat said nothing useful
        raise click.BadParameter(f"{path}: larger than {MAX_OPTION_FILE >> 20} MiB")
    return data


def check_ca_bundles(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from cryptography import x509

    for path in values:
        data = _read_option_file(path)
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            certs = []
        if not certs:
            raise click.BadParameter(f"{path}: not a PEM certificate bundle (no '-----BEGIN CERTIFICATE-----' "
                                     "block that parses)")
    return values


def check_fingerprints(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from kzprobe.analysis.fingerprints import FingerprintError, parse

    for path in values:
        data = _read_option_file(path)
        try:
            parse(data.decode("utf-8"), path)
        except UnicodeDecodeError as exc:
            raise click.BadParameter(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                                     f"{exc.start})") from None
        except FingerprintError as exc:
            raise click.BadParameter(str(exc)) from None
    return values


def control_sni_option(default: str | None = "example.com") -> Any:
    """``--control-sni`` for every command that needs a benign name (old ``--control-domain``
    stays as a hidden alias so existing scripts keep working)."""
    def deco(f: Any) -> Any:
        f = click.option("--control-domain", "control_sni_alias", default=None, hidden=True)(f)
        return click.option("--control-sni", "control_sni", default=default, show_default=default is not None,
                            help="Benign SNI / Host name used as the contrast.")(f)
    return deco
