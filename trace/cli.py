"""``kzprobe trace``: locate the censoring hop, live or from a pair of captures."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import click

from kzprobe.model import SOURCE_LIVE, SOURCE_PCAP
from kzprobe.trace.decide import HopResult, TraceResult, consolidate, decide


def _split_target(target: str) -> tuple[str, str | None, int | None]:
    """TARGET (domain or URL) -> (host, scheme or None, port or None)."""
    if "://" in target:
        parts = urlsplit(target)
        if not parts.hostname:
            raise click.BadParameter(f"{target!r} has no host name", param_hint="TARGET")
        return parts.hostname.lower(), parts.scheme.lower(), parts.port
    host = target.strip().strip(".").lower()
    if not host or "/" in host or " " in host:
        raise click.BadParameter(f"{target!r} is not a domain or URL", param_hint="TARGET")
    return host, None, None


def _default_trigger(scheme: str | None) -> str:
    return "http" if scheme == "http" else "tls"


def _resolve(host: str) -> str:
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot resolve {host}: {exc.strerror}; pass --address") from None
    return str(infos[0][4][0])


def _hop_text(h: HopResult | None) -> str:
    if h is None:
        return ""
    if h.kind == "icmp_time_exceeded":
        return f"ICMP time-exceeded {h.router}"
    text = h.detail or h.kind.replace("_", " ")
    if h.responder:
        text += f" from {h.responder}"
    if h.ip_ttl is not None:
        text += f" ttl={h.ip_ttl}"
        if h.server_ttl is not None and h.ip_ttl != h.server_ttl:
            text += f" (server {h.server_ttl})"
    if h.router and h.terminating:
        text += f" + ICMP {h.router}"
    return text


def print_table(res: TraceResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ev = res.evidence
    table = Table(title=f"{res.target} ({res.address}, {res.trigger} trigger)")
    table.add_column("TTL", justify="right")
    table.add_column(ev.get("test_domain") or res.target)
    table.add_column(ev.get("control_domain") or "control")
    tv, cv = consolidate(res.test_hops), consolidate(res.control_hops)
    for ttl in sorted(set(tv) | set(cv)):
        style = "bold red" if ttl == res.hop_ttl else None
        table.add_row(str(ttl), _hop_text(tv.get(ttl)), _hop_text(cv.get(ttl)), style=style)
    console.print(table)
    where = ""
    if res.hop_ttl is not None or res.hop_address:
        where = f" at TTL {res.hop_ttl} ({res.hop_address or 'no address'})"
    extra = ", ".join(x for x in (res.placement, f"{res.triggered_by}-triggered" if res.triggered_by else None) if x)
    console.print(f"[bold]{res.result}[/bold]{where}{' — ' + extra if extra else ''}")
    console.print(ev.get("sentence", ""), highlight=False)


def _emit(res: TraceResult, fmt: str) -> None:
    if fmt == "json":
        # The shared envelope (docs/output.md): a trace has no verdicts of its own; the result
        # is under its own key.
        from kzprobe import __version__

        click.echo(json.dumps({"command": "trace", "kzprobe": __version__, "verdicts": [], "problems": [],
                               "trace": res.to_dict()}, sort_keys=False))
    else:
        print_table(res)


def _store(res: TraceResult, db: str | None, run_id: int | None, source: str, options: dict[str, Any]) -> int:
    from kzprobe.storage import StorageError, Store

    try:
        store = Store(db)
        try:
            if run_id is None:
                run_id = store.latest_run_id()
            elif store.run(run_id) is None:
                raise click.ClickException(f"--run {run_id}: no such run in {db or 'the default database'}")
            if run_id is None:
                run_id = store.new_run(source=source, options=options)
                store.finish_run(run_id)
            store.add_trace(run_id, res.target, {**res.to_dict(), "hops": res.hops_dict()})
        finally:
            store.close()
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    return run_id


@click.command("trace")
@click.argument("target", required=False)
@click.option("--address", help="Server address to trace toward (default: resolve TARGET).")
@click.option(
    "--trigger",
    type=click.Choice(["http", "tls", "dns"]),
    help="What to send with a limited TTL (default: tls, or http for an http:// URL).",
)
@click.option("--control-sni", "--control-domain", "control_domain", default="example.com", show_default=True,
              help="Benign name of the control sweep (the same option as run's; --control-domain is its old name).")
@click.option("--max-hops", type=click.IntRange(1, 64), default=30, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True, help="Repetitions per TTL.")
@click.option("--port", type=click.IntRange(1, 65535), help="Server port (default 80 / 443 / 53).")
@click.option("--timeout", type=click.FloatRange(0.1, 30), default=2.0, show_default=True,
              help="Seconds to wait for answers after each round of triggers.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--db", help="Database path or SQLAlchemy URL (with --store).")
@click.option("--store", is_flag=True, help="Store the result (beside the latest run's verdicts, or --run).")
@click.option("--run", "run_id", type=int, help="Attach the stored trace to this run.")
@click.option("--from-pcap", "from_pcap", type=click.Path(exists=True, dir_okay=False),
              help="Read the test sweep from a capture instead of probing.")
@click.option("--control", "control_pcap", type=click.Path(exists=True, dir_okay=False),
              help="The control sweep's capture (with --from-pcap).")
def trace(
    target: str | None,
    address: str | None,
    trigger: str | None,
    control_domain: str,
    max_hops: int,
    repeat: int,
    port: int | None,
    timeout: float,
    fmt: str,
    db: str | None,
    store: bool,
    run_id: int | None,
    from_pcap: str | None,
    control_pcap: str | None,
) -> None:
    """Locate the censoring hop for TARGET with TTL-limited triggers (CenTrace-style).

    For TTL = 1, 2, ... a normal TCP handshake is made and the trigger (HTTP GET Host, TLS
    ClientHello SNI, or a DNS query over UDP) is sent with that IP TTL; what answers (ICMP
    time-exceeded, RST, FIN, a page, a ServerHello, or nothing) is compared with the same
    sweep for a control domain.  Live tracing needs root (raw sockets).

    With --from-pcap TEST.pcap --control CONTROL.pcap the same decision runs on recorded sweeps.
    """
    if from_pcap or control_pcap:
        if not (from_pcap and control_pcap):
            raise click.UsageError("--from-pcap and --control go together (the test and the control capture)")
        res = _from_pcaps(from_pcap, control_pcap, target)
        source = SOURCE_PCAP
    else:
        if not target:
            raise click.UsageError("TARGET is required (or --from-pcap TEST.pcap --control CONTROL.pcap)")
        host, scheme, url_port = _split_target(target)
        trig = trigger or _default_trigger(scheme)
        if address is None:
            address = _resolve(host)
        try:
            socket.inet_aton(address)
        except OSError:
            raise click.BadParameter(f"{address!r} is not an IPv4 address", param_hint="--address") from None
        from kzprobe.trace import live

        try:
            res = live.trace(
                host,
                address,
                trigger=trig,
                port=port or url_port,
                control_domain=control_domain,
                max_hops=max_hops,
                repeat=repeat,
                timeout=timeout,
            )
        except live.TraceError as exc:
            raise click.ClickException(str(exc)) from None
        source = SOURCE_LIVE
    _emit(res, fmt)
    if store:
        options = {"trace": True, "trigger": res.trigger, "control_domain": control_domain, "address": res.address}
        rid = _store(res, db, run_id, source, options)
        if fmt == "table":
            click.echo(f"stored with run {rid}", err=True)


def _from_pcaps(test_path: str, control_path: str, target: str | None) -> TraceResult:
    from kzprobe.trace.pcap import PcapError, read_sweep

    domain = _split_target(target)[0] if target else None
    try:
        test = read_sweep(test_path, domain=domain)
    except PcapError as exc:
        raise click.ClickException(f"--from-pcap {test_path}: {exc}") from None
    try:
        control = read_sweep(control_path, exclude=test.domain)
    except PcapError as exc:
        raise click.ClickException(f"--control {control_path}: {exc}") from None
    if control.server != test.server:
        raise click.ClickException(
            f"--control {control_path}: its sweep goes to {control.server}, the test's to {test.server}; "
            "a control must use the same address"
        )
    if control.trigger != test.trigger:
        raise click.ClickException(
            f"--control {control_path}: {control.trigger} trigger, the test uses {test.trigger}"
        )
    return decide(
        test.hops,
        control.hops,
        target=test.domain,
        address=test.server,
        trigger=test.trigger,
        test_domain=test.domain,
        control_domain=control.domain,
    )
