"""Record the *during* round of kz2014-circumvention's messaging outage as a replay fixture.

``kzprobe lab record`` captures the scenario's main run only: the outage (lab/outage.py: the
13 February 2014 cut of WhatsApp and Viber in Almaty, an nftables drop on the ISP hop added and
removed around a second ``kzprobe run``) is not part of it.  This records that second run, with
the outage's rule in place, exactly as ``kzprobe lab record`` records a run (the same tcpdump on
the volunteer's interface, the probe's TLS secrets in the pcapng)::

    python -m kzprobe.tests.support.outagerec fixtures/pcaps/kz2014-circumvention-outage.pcapng  # as root

and writes NAME.expected.json beside it in lab record's shape: per target of the outage's
``measure`` list, what the scenario expects inside the window (the outage's ``expect`` for its
targets, the endpoint's own for the others) and the live run's verdict and detail.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

SCENARIO = "kz2014-circumvention"


def record(out: Path, timeout: float = 3.0) -> int:
    from kzprobe.lab import rules
    from kzprobe.lab.cli import _capture, _classifier_detail, _fresh_instance
    from kzprobe.lab.core import Lab, verdict_label
    from kzprobe.lab.topology import run

    lab = Lab(SCENARIO, instance=_fresh_instance())
    (outage,) = lab.scenario.outages
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        lab.up()
        targets = lab.state_dir / "outage-targets.txt"
        targets.write_text("".join(f"{t}\n" for t in outage.measure))
        lab.targets_file = targets  # the run measures the outage's list, as lab run's "during" round
        ns = lab.ns_name(outage.hop)
        run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules.outage_nft_rules(outage, lab.scenario.endpoints))
        opened = time.time()
        try:
            verdicts, packets = _capture(lab, out, timeout)
        finally:
            closed = time.time()
            run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", rules.OUTAGE_TABLE])
        doc: dict[str, Any] = {
            "scenario": SCENARIO,
            "pcap": out.name,
            "recorded_with": f"python -m kzprobe.tests.support.outagerec {out}",
            "round": "during",
            "outage": {"name": outage.name, "hop": outage.hop, "method": outage.method,
                       "targets": list(outage.targets), "opened": opened, "closed": closed},
            "volunteer": lab.volunteer_address,
            "resolvers": {"isp": lab.isp_resolver, "public": lab.public_resolver},
            "helper": lab.helper_url,
        }
    finally:
        lab.down()
    by_target = {e.target: e for e in lab.scenario.endpoints}
    got = {v.get("target"): v for v in verdicts}
    bad = 0
    rows: list[dict[str, object]] = []
    for t in outage.measure:
        e, v = by_target[t], got.get(t)
        inside = t in outage.targets
        expect, detail = (outage.expect, outage.detail) if inside else (e.expect, e.detail)
        label = verdict_label(v) if v else "missing"
        live_detail = _classifier_detail({"verdict": v})
        bad += label != expect or bool(detail and (v or {}).get("detail") != detail)
        rows.append({
            "target": t, "domain": e.host, "address": e.address, "expect": expect,
            **({"detail": detail} if detail else {}),
            "methods": [*e.methods, outage.method] if inside else list(e.methods),
            "hop": outage.hop if inside else e.hop, "reason": outage.reason if inside else e.reason,
            "live_verdict": label, "live_detail": live_detail,
        })
    doc["targets"] = rows
    side = out.with_name(out.name.removesuffix(out.suffix) + ".expected.json")
    side.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({packets} packets) and {side}; {len(outage.measure) - bad}/{len(outage.measure)} live "
          "verdicts as the scenario expects inside the window")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".pcapng"):
        raise SystemExit("usage: python -m kzprobe.tests.support.outagerec OUT.pcapng")
    raise SystemExit(record(Path(sys.argv[1])))
