"""Analysis: pure functions from observations to verdicts.

``classify`` is the one classifier for every source (live probes, pcap replay, OONI import):
it groups observations by target and applies the rule table (:mod:`kzprobe.analysis.rules`,
joined with :mod:`kzprobe.analysis.rules_kinds`).
No I/O happens here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from kzprobe.analysis.facts import Context, Facts
from kzprobe.analysis.rules import RULES as _URL_RULES
from kzprobe.analysis.rules import Hit, Rule
from kzprobe.analysis.rules_hellos import HELLO_RULES
from kzprobe.analysis.rules_hellos import join as join_hellos
from kzprobe.analysis.rules_kinds import KIND_RULES, join
from kzprobe.model import BLOCKED, MEASURE, Observation, Verdict

#: The one rule table: rules.py's, with the kind targets' rules (rules_kinds.py) after ``ip.tcp``
#: and the ClientHello rules (rules_hellos.py) right before ``dpi.tls_followup``.
RULES: tuple[Rule, ...] = join_hellos(join(_URL_RULES, KIND_RULES), HELLO_RULES)
RULES_BY_ID = {r.id: r for r in RULES}

__all__ = ["RULES", "RULES_BY_ID", "Context", "Facts", "Hit", "Rule", "classify", "classify_target"]


def classify_target(
    target: str,
    observations: list[Observation],
    context: Context | None = None,
    domain: str | None = None,
) -> Verdict:
    dom = domain or next((o.domain for o in observations if o.purpose == MEASURE), "") or target
    facts = Facts(target=target, domain=dom, observations=observations, context=context or Context())
    for rule in RULES:
        hit = rule.check(facts)
        if hit is not None:
            return _verdict(facts, rule, hit)
    raise AssertionError("the last rule always matches")  # pragma: no cover


def _verdict(f: Facts, rule: Rule, hit: Hit) -> Verdict:
    ids: list[int] = []
    packets: list[int] = []
    for o in hit.observations:
        if o.id is not None and o.id not in ids:
            ids.append(o.id)
        packets.extend(p for p in o.packets if p not in packets)
    return Verdict(
        target=f.target,
        domain=f.domain,
        status=rule.status,
        mechanism=rule.mechanism if rule.status == BLOCKED else None,
        detail=hit.detail or rule.detail,
        rule=rule.id,
        confidence=hit.confidence if hit.confidence is not None else rule.confidence,
        observations=ids,
        packets=sorted(packets),
        sentence=hit.sentence,
    )


def classify(observations: Iterable[Observation], context: Context | None = None,
             targets: Iterable[str] = ()) -> list[Verdict]:
    """One verdict per target, in the order targets first appear (``targets`` first, if given)."""
    groups: dict[str, list[Observation]] = defaultdict(list)
    for t in targets:
        groups[t]
    for o in observations:
        groups[o.target].append(o)
    return [classify_target(t, obs, context) for t, obs in groups.items()]
