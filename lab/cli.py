"""``kzprobe lab``: bring the simulated censoring ISP up and down, and probe it end to end."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from kzprobe.lab.core import (
    DEFAULT_PREFIX,
    Lab,
    LabError,
    compare,
    destroy,
    down_all,
    instances,
    list_namespaces,
    require_root,
    run_probe,
    run_probe_doc,
)
from kzprobe.lab.scenario import ROLES, ScenarioError, load

#: The instance the CLI uses when none is given, so that `lab up` and `lab down` pair up.
CLI_INSTANCE = "kzlab"

scenario_opt = click.option(
    "--scenario", default="kz2014", show_default=True,
    help="Built-in scenario name (kz2014, method-sni-reset, ...) or a scenario TOML file.",
)
instance_opt = click.option(
    "--instance", default=CLI_INSTANCE, show_default=True, help="Lab instance name (1-12 [a-z0-9]).",
)


def _lab(scenario: str, instance: str) -> Lab:
    try:
        require_root()
        return Lab(scenario, instance=instance)
    except (LabError, ScenarioError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def lab() -> None:
    """A simulated censoring ISP in network namespaces (needs root).

    volunteer -- isp (resolver, DNS blocking) -- bb1 -- bb2 (DPI) -- world (DNS, sites, helper).
    Nothing is linked to the host's network.
    """


@lab.command()
@scenario_opt
@instance_opt
def up(scenario: str, instance: str) -> None:
    """Build the lab (idempotent)."""
    try:
        if load(scenario).isps:
            return _up_multi(scenario, instance)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    lab_ = _lab(scenario, instance)
    t0 = time.monotonic()
    try:
        lab_.up()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    endpoints = f", {len(lab_.scenario.endpoints)} endpoints" if lab_.scenario.endpoints else ""
    click.echo(f"lab {instance} up ({lab_.scenario.name}, {len(lab_.scenario.sites)} sites{endpoints}) "
               f"in {time.monotonic() - t0:.1f}s")
    click.echo(f"  volunteer: ip netns exec {lab_.ns_name('volunteer')} ...  (or: kzprobe lab exec -- CMD)")
    click.echo(f"  targets: {lab_.targets_file}   lab CA: {lab_.ca_path}")
    click.echo(f"  ISP resolver {lab_.isp_resolver}, public resolver {lab_.public_resolver}, "
               f"helper {lab_.helper_url or '(not available)'}")


def _up_multi(scenario: str, instance: str) -> None:
    """A multi-ISP scenario ([[isp]]): one chain per ISP joining one world (lab/multi.py)."""
    from kzprobe.lab.multi import MultiLab

    t0 = time.monotonic()
    try:
        require_root()
        m = MultiLab(scenario, instance=instance)
        m.up()
    except (LabError, ScenarioError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"lab {instance} up ({m.scenario.name}, {len(m.chains)} ISPs, {len(m.scenario.sites)} sites) "
               f"in {time.monotonic() - t0:.1f}s; world: ip netns exec {m.world.ns_name('world')} ...")
    for isp, chain in m.chains:
        click.echo(f"  {isp.name} ({isp.asn}): kzprobe lab exec --instance {chain.instance} -- CMD; "
                   f"targets {chain.targets_file}")
    click.echo(f"  lab CA: {m.world.ca_path}   helper {m.world.helper_url or '(not available)'}   "
               f"free for a collector: {m.collector_address}")


@lab.command()
@click.option("--instance", default=CLI_INSTANCE, show_default=True, help="Lab instance to remove.")
@click.option("--all", "all_", is_flag=True, help=f"Remove every lab instance ({DEFAULT_PREFIX}*).")
def down(instance: str, all_: bool) -> None:
    """Remove a lab: processes, namespaces, links, rules, state (idempotent, crash-safe)."""
    try:
        require_root()
        if all_:
            gone = down_all(DEFAULT_PREFIX)
            click.echo(f"removed {len(gone)} lab instance(s){': ' + ', '.join(gone) if gone else ''}")
        else:
            # A multi-ISP lab's chains are instances INSTANCEi1, INSTANCEi2, ... (lab/multi.py).
            for inst in [instance, *(i for i in instances(instance) if re.fullmatch(rf"{instance}i[0-9]+", i))]:
                destroy(inst)
            click.echo(f"lab {instance} down")
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


@lab.command()
def status() -> None:
    """List lab instances and what is running in them."""
    try:
        require_root()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    found = instances(DEFAULT_PREFIX)
    if not found:
        click.echo("no lab instances")
        return
    existing = set(list_namespaces())
    for inst in found:
        info_path = Path("/run/kzprobe-lab") / inst / "up.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        present = [r for r in ROLES if f"{inst}-{r}" in existing]
        pids = 0
        for r in present:
            out = subprocess.run(["ip", "netns", "pids", f"{inst}-{r}"], capture_output=True, text=True)
            pids += len(out.stdout.split())
        # A multi-ISP lab's world instance has only the world; its chains have no world.
        want = len(ROLES) if "multi" not in info else (1 if info["multi"] == inst else len(ROLES) - 1)
        state = "up" if info and len(present) == want else "broken (run: kzprobe lab down)"
        click.echo(f"{inst}: {state}; scenario {info.get('name', '?')}; namespaces {len(present)}/{len(ROLES)}; "
                   f"{pids} processes")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@instance_opt
@click.option("--role", type=click.Choice(ROLES), default="volunteer", show_default=True,
              help="Namespace to run in.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(instance: str, role: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside a lab namespace (the volunteer's by default): kzprobe lab exec -- CMD..."""
    try:
        require_root()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    ns = f"{instance}-{role}"
    if ns not in list_namespaces():
        raise click.ClickException(f"lab {instance} is not up (run: kzprobe lab up --instance {instance})")
    sys.exit(subprocess.run(["ip", "netns", "exec", ns, *command]).returncode)


def _print(rows: list[dict[str, Any]], fmt: str, head: dict[str, Any]) -> None:
    if fmt == "json":
        # The shared envelope (docs/output.md): kzprobe's verdicts at the top, the lab's comparison
        # with the scenario (expected vs got per site) under its own key.
        from kzprobe import __version__

        doc = {"command": "lab run", "kzprobe": __version__,
               "verdicts": [r["verdict"] for r in rows if r["verdict"]], "problems": [],
               "lab": {**head, "results": rows}}
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kzprobe lab run: {head['scenario']}")
    for col in ("", "target", "method @ hop", "expected", "kzprobe", "evidence"):
        table.add_column(col, overflow="fold", ratio=4 if col == "evidence" else None)
    for r in rows:
        v = r["verdict"] or {}
        how = ", ".join(r["methods"]) + (f" @ {r['hop']}" if r["methods"] else "") or "none"
        sentence = (v.get("evidence") or {}).get("sentence", "")
        exp = r["expect"] + (f" ({r['expect_detail']})" if r.get("expect_detail") else "")
        got = r["got"] + (f" ({r['got_detail']})" if r.get("got_detail") else "")
        # (not "[round]": rich would read the brackets as markup and print nothing)
        target = r["target"] + (f" ({r['round']} {r['outage']})" if r.get("round") in ("during", "after") else "")
        table.add_row("✔" if r["match"] else "✘", target, how, exp, got, sentence)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log or a pipe: no terminal width to fit, keep rows readable
    console.print(table)
    bad = [r for r in rows if not r["match"]]
    click.echo(f"{len(rows) - len(bad)}/{len(rows)} verdicts as expected")


@lab.command()
@scenario_opt
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--instance", default=None, help="Lab instance (default: a fresh one).")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="kzprobe's per-step timeout.")
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards.")
@click.option("--collector", is_flag=True,
              help="Multi-ISP scenarios: also run a collector in the world on a throwaway PostgreSQL, upload "
                   "every volunteer's run and compare its verdicts with the volunteers'.")
def run(scenario: str, fmt: str, instance: str | None, timeout: float, keep: bool, collector: bool) -> None:
    """Up, `kzprobe run` from the volunteer against the scenario, compare, down.

    Exits non-zero when any verdict differs from the scenario's expectation.  A multi-ISP scenario
    ([[isp]], e.g. vantage-3isp) runs `kzprobe run` from every ISP's volunteer at once and compares
    each with that ISP's expectations.
    """
    if collector and keep:
        # The cluster is throwaway: it stops when the run ends, and a kept collector would have no database.
        raise click.UsageError("--collector and --keep: the throwaway PostgreSQL stops when the run ends "
                               "(to keep a lab up: kzprobe lab up)")
    try:
        multi = bool(load(scenario).isps)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    if multi:
        return _run_multi(scenario, fmt, instance or _fresh_instance(), timeout, keep, collector)
    if collector:
        raise click.UsageError("--collector: only for a multi-ISP scenario ([[isp]], e.g. vantage-3isp)")
    lab_ = _lab(scenario, instance or _fresh_instance())
    windows: list[dict[str, Any]] = []
    try:
        lab_.up()
        doc = run_probe_doc(lab_, timeout=timeout)
        rows = compare(lab_.scenario, doc["verdicts"])
        if lab_.scenario.outages:
            # Rules that hold for a window only: measured before, during and after (lab/outage.py).
            from kzprobe.lab.outage import run_windows

            rows, windows = run_windows(lab_, timeout, doc, rows)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if not keep:
            lab_.down()
    head = {"scenario": lab_.scenario.name, "instance": lab_.instance, "helper": lab_.helper_url,
            "ok": all(r["match"] for r in rows)}
    _print(rows, fmt, head | ({"windows": windows} if windows else {}))
    if not all(r["match"] for r in rows):
        sys.exit(1)


def _run_multi(scenario: str, fmt: str, instance: str, timeout: float, keep: bool, collector: bool) -> None:
    from contextlib import ExitStack

    from kzprobe.lab.multi import MultiLab

    try:
        require_root()
        m = MultiLab(scenario, instance=instance)
    except (LabError, ScenarioError) as exc:
        raise click.ClickException(str(exc)) from None
    if collector:
        from kzprobe.storage.pgcluster import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise click.ClickException(f"--collector needs PostgreSQL: {reason}")
    compared: tuple[Any, Any] | None = None
    coll_url: str | None = None
    with ExitStack() as stack:
        try:
            if collector:
                from kzprobe.lab import multi_collector as mc
                from kzprobe.storage.pgcluster import ClusterUnavailable, throwaway_cluster

                try:
                    cluster = stack.enter_context(throwaway_cluster())
                except ClusterUnavailable as exc:
                    raise click.ClickException(f"--collector: PostgreSQL cannot start: {exc}") from None
                db_url = cluster.create_database("lab")
            # up() removes what it built when it fails; the finally covers a failed or interrupted
            # (Ctrl-C) measurement: every chain and the world go, from their names alone (the
            # collector with the world), before the cluster stops.
            m.up()
            if collector:
                coll_url, extra, env = mc.start(m, db_url)
                measured = m.measure(timeout, extra, env)
                compared = (mc.local_verdicts(m),
                            mc.collector_verdicts(db_url, {isp.name for isp, _ in m.chains}))
            else:
                measured = m.measure(timeout)
        except LabError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            if not keep:
                m.down()
    rows = m.compare(measured)
    ok = all(r["match"] for r in rows)
    if compared is not None:
        mc.annotate(rows, *compared)
        ok = ok and all(r["collector_match"] for r in rows)
    if fmt == "json":
        from kzprobe import __version__

        # The shared envelope, as for one ISP: every volunteer's verdicts at the top (a target
        # appears once per ISP, in chain order), the comparison under "lab" with each row's ISP.
        isps = [{"name": isp.name, "asn": isp.asn, "country": isp.country, "instance": chain.instance,
                 "ok": all(r["match"] and r.get("collector_match", True) for r in rows if r["isp"] == isp.name)}
                for isp, chain in m.chains]
        doc = {"command": "lab run", "kzprobe": __version__,
               "verdicts": [v for _, d in measured for v in d["verdicts"]], "problems": [],
               "lab": {"scenario": m.scenario.name, "instance": m.instance, "helper": m.world.helper_url,
                       "ok": ok, "isps": isps, "results": rows}
               | ({"collector": {"url": coll_url, "db": "throwaway PostgreSQL"}} if compared is not None else {})}
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        _print_multi(m.scenario.name, rows)
    if not ok:
        sys.exit(1)


def _print_multi(name: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kzprobe lab run: {name}")
    with_collector = any("collector" in r for r in rows)
    cols = ("ISP", "target", "expected", "got", "match", *(("collector",) if with_collector else ()), "evidence")
    for col in cols:
        table.add_column(col, overflow="fold", ratio=4 if col == "evidence" else None)
    for r in rows:
        sentence = ((r["verdict"] or {}).get("evidence") or {}).get("sentence", "")
        exp = r["expect"] + (f" ({r['expect_detail']})" if r.get("expect_detail") else "")
        got = r["got"] + (f" ({r['got_detail']})" if r.get("got_detail") else "")
        # The collector column says whether its verdict equals the volunteer's stored one.
        coll = (("same" if r["collector_match"] else f"differs: {r['collector'] or 'missing'}"),) \
            if with_collector else ()
        table.add_row(r["isp"], r["target"], exp, got, "✔" if r["match"] else "✘", *coll, sentence)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    bad = sum(not r["match"] for r in rows)
    click.echo(f"{len(rows) - bad}/{len(rows)} verdicts as expected")
    if with_collector:
        same = sum(bool(r["collector_match"]) for r in rows)
        click.echo(f"{same}/{len(rows)} of the collector's verdicts equal the volunteers'")


def _fresh_instance() -> str:
    import secrets

    return DEFAULT_PREFIX + secrets.token_hex(2)


@lab.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="capture to write, e.g. fixtures/pcaps/NAME.pcapng; NAME.expected.json goes beside it.  "
                   ".pcapng also holds the probe's TLS secrets (replay then reads HTTPS responses).")
@scenario_opt
@click.option("--timeout", type=float, default=3.0, show_default=True, help="kzprobe's per-step timeout.")
def record(out: Path, scenario: str, timeout: float) -> None:
    """Capture the volunteer's interface during a `kzprobe run` of the scenario.

    With a .pcapng output the probe logs its HTTP steps' TLS secrets (SSLKEYLOGFILE), and they go
    into the capture as a Decryption Secrets Block (editcap --inject-secrets), as Wireshark reads
    them: replay can then read what was served over HTTPS (a blockpage behind a bad certificate,
    a body's rate), which ciphertext alone does not show."""
    if out.suffix not in (".pcap", ".pcapng"):
        raise click.UsageError(f"--out {out}: must end in .pcap or .pcapng")
    lab_ = _lab(scenario, _fresh_instance())
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        lab_.up()
        verdicts, packets = _capture(lab_, out, timeout)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        lab_.down()
    rows = compare(lab_.scenario, verdicts)
    expected = {
        "scenario": lab_.scenario.name,
        "pcap": out.name,
        "recorded_with": "kzprobe lab record",
        "volunteer": lab_.volunteer_address,
        "resolvers": {"isp": lab_.isp_resolver, "public": lab_.public_resolver},
        # The probe's requests to the control helper cross the same interface; replay decodes their answers as control.
        "helper": lab_.helper_url,
        "hops": {r: lab_.router_address(r) for r in ("isp", "bb1", "bb2")},
        "targets": [
            {k: r[k] for k in ("target", "domain", "expect", "methods", "hop", "reason")}
            | ({"detail": r["expect_detail"]} if r.get("expect_detail") else {})
            | {"address": r["address"], "live_verdict": r["got"],
               "live_detail": _classifier_detail(r)}
            for r in rows
        ],
    }
    side = out.with_name(out.stem + ".expected.json")
    side.write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
    bad = [r for r in rows if not r["match"]]
    click.echo(f"wrote {out} ({packets} packets, {out.stat().st_size} bytes) and {side}; "
               f"{len(rows) - len(bad)}/{len(rows)} live verdicts as expected")
    for r in bad:
        click.echo(f"  mismatch: {r['target']}: expected {r['expect']} {r.get('expect_detail') or ''}, "
                   f"kzprobe said {r['got']} {r.get('got_detail') or ''}", err=True)
    if bad:
        sys.exit(1)


def _classifier_detail(row: dict[str, Any]) -> str | None:
    """The verdict's detail as the classifier gives it (what replay's verdicts carry): the JSON
    output repeats the status as the detail where the classifier has none, for ok and
    inconclusive (docs/output.md); "down" is the classifier's own detail."""
    v = row.get("verdict") or {}
    detail, status = v.get("detail"), v.get("status")
    return None if status in ("ok", "inconclusive") and detail == status else detail


def _capture(lab_: Lab, out: Path, timeout: float) -> tuple[list[dict[str, Any]], int]:
    if out.suffix != ".pcapng":
        return _capture_pcap(lab_, out, timeout)
    raw = lab_.state_dir / "record.pcap"
    keys = lab_.state_dir / "tls-keys.log"
    keys.unlink(missing_ok=True)
    verdicts, packets = _capture_pcap(lab_, raw, timeout, env={"SSLKEYLOGFILE": str(keys)})
    inject = ["--inject-secrets", f"tls,{keys}"] if keys.is_file() and keys.stat().st_size else []
    p = subprocess.run(["editcap", "-F", "pcapng", *inject, str(raw), str(out.resolve())],
                       capture_output=True, text=True)
    if p.returncode:
        raise LabError(f"editcap could not write {out}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return verdicts, packets


def _capture_pcap(lab_: Lab, out: Path, timeout: float, env: dict[str, str] | None = None
                  ) -> tuple[list[dict[str, Any]], int]:
    iface = lab_.veth("volunteer", "up")
    dump = subprocess.Popen(
        # -B 16 MiB: a run's burst (dozens of handshakes at once) overflowed the default buffer and
        # the kernel dropped packets, which makes a fixture lie about what happened on the wire.
        ["ip", "netns", "exec", lab_.ns_name("volunteer"), "tcpdump", "-Z", "root", "-i", iface, "-U", "-n",
         "-B", "16384", "--immediate-mode", "-s", "0", "-w", str(out.resolve())],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        # tcpdump says "listening on" once the capture is open; nothing before that is recorded.
        assert dump.stderr is not None
        line = dump.stderr.readline()
        if "listening" not in line:
            raise LabError(f"tcpdump did not start: {line.strip()}")
        verdicts = run_probe(lab_, timeout=timeout, env=env)
        time.sleep(0.2)  # late packets (RSTs answering injected segments) belong in the capture
    finally:
        dump.send_signal(signal.SIGINT)
        try:
            _, err = dump.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            dump.kill()
            _, err = dump.communicate()
    packets = dropped = 0
    for ln in (err or "").splitlines():
        if "packets captured" in ln:
            packets = int(ln.split()[0])
        elif "dropped by kernel" in ln:
            dropped = int(ln.split()[0])
    if dropped:
        raise LabError(f"{out}: tcpdump says the kernel dropped {dropped} packet(s): the capture is incomplete; "
                       "record again")
    return verdicts, packets
