"""``kzprobe helper``: the control helper, to run outside the censored network."""

from __future__ import annotations

import ipaddress
import logging
import ssl
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import click

from kzprobe.helper.server import HelperOptions, Limits


def _parse_listen(value: str) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or not port_text:
            raise ValueError("expected [IPv6]:PORT")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected ADDR:PORT (IPv6 in brackets: [::1]:8780)")
    ipaddress.ip_address(host)
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def _check_resolver(spec: str) -> str:
    from kzprobe.probes.dns import parse_resolver

    try:
        parse_resolver(spec)
    except ValueError as exc:
        raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--resolver") from None
    return spec


def _check_bundle(path: str) -> None:
    from cryptography import x509

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd serials in real bundles still validate
            certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: not a PEM certificate bundle ({exc})", param_hint="--ca-bundle") from None
    if not certs:
        raise click.BadParameter(f"{path}: no certificates in it", param_hint="--ca-bundle")


def _parse_cidrs(values: tuple[str, ...], option: str) -> list[Any]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise click.BadParameter(f"{v!r} is not an address or CIDR prefix", param_hint=option) from None
    return out


@click.group("helper", invoke_without_command=True)
@click.option("--listen", default="127.0.0.1:8780", show_default=True, metavar="ADDR:PORT",
              help="Address and port to listen on (port 0: any free port, printed when ready).")
@click.option("--resolver", "resolvers", multiple=True, metavar="IP[:PORT]",
              help="DNS resolver the helper uses for targets (repeatable; default: the system resolver).")
@click.option("--ca-bundle", "ca_bundles", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Extra trusted CA (PEM) for certificate validation, e.g. a lab CA (repeatable).")
@click.option("--allow-private", is_flag=True,
              help="LAB ONLY: also connect to loopback/private/bogon addresses and to ports other than 80 "
                   "and 443. Never use on a helper reachable from the internet.")
@click.option("--deny", "deny", multiple=True, metavar="CIDR",
              help="Never connect to this prefix (repeatable): what the operator's network reaches but the "
                   "world must not. Applies even with --allow-private.")
@click.option("--lab-public", "lab_public", multiple=True, metavar="CIDR", hidden=True,
              help="LAB ONLY: treat this special-purpose prefix as public internet (the lab's TEST-NETs). "
                   "The host's own addresses and --deny stay refused.")
@click.option("--token", default=None, envvar="KZPROBE_HELPER_TOKEN", metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' (env KZPROBE_HELPER_TOKEN; at least 16 bytes, make "
                   "one with `kzprobe helper token new`). Probes pass it as --helper URL#token=TOKEN.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve HTTPS with this certificate chain (PEM); needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Private key (PEM) for --tls-cert.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="Timeout per measurement step (s).")
@click.option("--control-sni", default="example.com", show_default=True, metavar="NAME",
              help="The benign name a proxy+http:// target is asked to CONNECT to (and the SNI of the TLS "
                   "handshake through its tunnel). Fixed by the operator: a client never chooses it.")
@click.option("--deadline", default=30.0, show_default=True, type=click.FloatRange(1, 600),
              help="Deadline for a whole control request (s); past it the answer is 504.")
@click.option("--io-timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 300),
              help="Time a client has to send a request head, and then its body (slow clients are dropped).")
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Measurements at once.")
@click.option("--queue", default=64, show_default=True, type=click.IntRange(0, 4096),
              help="Requests that may wait (up to 5 s) for a measurement slot; beyond that, 503 at once.")
@click.option("--client-concurrency", default=4, show_default=True, type=click.IntRange(1, 1024),
              help="Measurements at once per client (address, IPv6 /64, or token); beyond that, 429.")
@click.option("--client-rate", default=4.0, show_default=True, type=click.FloatRange(0.01, 10000),
              help="Requests per second per client, sustained (bursts of 5x allowed; a request that makes the "
                   "helper follow redirects or download much counts for more); beyond that, 429.")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Open client connections (always kept 256 below the file-descriptor limit).")
@click.pass_context
def helper(ctx: click.Context, listen: str, resolvers: tuple[str, ...], ca_bundles: tuple[str, ...],
           allow_private: bool, deny: tuple[str, ...], lab_public: tuple[str, ...],
           token: str | None, tls_cert: str | None, tls_key: str | None, timeout: float, control_sni: str,
           deadline: float, io_timeout: float, concurrency: int, queue: int, client_concurrency: int,
           client_rate: float, max_connections: int) -> None:
    """Run the control helper: measure targets from outside the censored network.

    Probes call it with `kzprobe run --helper http://ADDR:PORT`. For each request it resolves the
    name with its own resolvers, connects to those addresses and the ones the probe saw, does the
    TLS handshake with SNI and an HTTP GET, and answers with the observations (vantage "control").

    It is not an open proxy: unless --allow-private is given it refuses loopback, private,
    link-local, CGNAT and other non-global addresses, the host's own addresses, --deny prefixes,
    and ports other than 80 and 443.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        host, port = _parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(f"{listen!r}: {exc}", param_hint="--listen") from None
    for r in resolvers:
        _check_resolver(r)
    for b in ca_bundles:
        _check_bundle(b)
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_cert and tls_key:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise click.BadParameter(f"{tls_cert} / {tls_key}: {exc}", param_hint="--tls-cert") from None
    if token is not None:
        from kzprobe.hardening.tokens import token_problem

        problem = token_problem(token)
        if problem:
            raise click.BadParameter(problem, param_hint="--token")
    from kzprobe.helper.policy import idna_problem

    problem = idna_problem(control_sni)
    if problem or "." not in control_sni.strip("."):
        raise click.BadParameter(f"{control_sni!r} is {problem or 'not a fully qualified name'}",
                                 param_hint="--control-sni")
    deny_nets = _parse_cidrs(deny, "--deny")
    lab_nets = _parse_cidrs(lab_public, "--lab-public")

    opts = HelperOptions(host=host, port=port, resolvers=list(resolvers), ca_bundles=list(ca_bundles),
                         allow_private=allow_private, token=token, tls_cert=tls_cert, tls_key=tls_key,
                         timeout=timeout, deny=deny_nets, lab_public=lab_nets, control_sni=control_sni,
                         limits=Limits(concurrency=concurrency, queue=queue, deadline=deadline,
                                       body_timeout=io_timeout, header_timeout=io_timeout,
                                       client_concurrency=client_concurrency, client_rate=client_rate,
                                       client_burst=max(1, round(client_rate * 5)),
                                       max_connections=max_connections))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="kzprobe helper: %(message)s")
    for noisy in ("httpx", "httpcore", "hpack"):
        # One line per measured request is the probe's business, not the operator's log.
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _run(opts)


@helper.group("token")
def token_group() -> None:
    """Helper tokens."""


@token_group.command("new")
def token_new() -> None:
    """Print a new random token (32 bytes, URL-safe) for --token and the probes' #token=."""
    from kzprobe.hardening.tokens import new_token

    click.echo(new_token())


def _run(opts: HelperOptions) -> None:
    import trio

    from kzprobe.helper.server import serve

    started = False

    def ready(url: str) -> None:
        nonlocal started
        started = True
        if opts.allow_private:
            click.echo("kzprobe helper: --allow-private is on: private addresses and all ports are reachable "
                       "(lab use only)", err=True)
        click.echo(f"kzprobe helper listening on {url}", err=True)
        sys.stderr.flush()

    try:
        trio.run(partial(serve, opts, ready=ready))
    except BaseException as exc:  # sorted below; anything else is re-raised
        os_err = _startup_oserror(exc) if not started else None
        if os_err is not None:
            raise click.ClickException(f"cannot listen on {opts.bind}: {os_err.strerror or os_err}") from None
        raise
    click.echo("kzprobe helper stopped", err=True)


def _startup_oserror(exc: BaseException) -> OSError | None:
    from kzprobe.errors import walk

    for e in walk(exc):
        if isinstance(e, OSError) and not isinstance(e, ssl.SSLError):
            return e
    return None


__all__ = ["helper"]
