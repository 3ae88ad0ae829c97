"""kzprobe.targets: what to measure.

Two kinds of lists:

* built-in lists shipped with the package (``kz2014``: seeded from Freedom House's "Freedom on
  the Net 2014: Kazakhstan", each entry citing the report's words; ``tor``, ``messaging`` and
  ``circumvention``: the non-web kinds of issue 15, citing the report where it speaks of them);
  see :func:`load_builtin`;
* user files: a Citizen Lab test-list CSV or a plain-text list; see :func:`load_file`.

Nothing here touches the network: names are validated syntactically and never resolved.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from kzprobe.model import Claim, Target
from kzprobe.targets._files import LoadResult, TargetListError, load_file
from kzprobe.targets._urls import URLProblem, check_url

__all__ = [
    "BUILTIN_LISTS",
    "CATEGORY_CODES",
    "CLAIMED_ROLES",
    "ROLES",
    "LoadResult",
    "TargetListError",
    "builtin_info",
    "load",
    "load_builtin",
    "load_builtin_roles",
    "load_file",
    "shared_claim",
]

#: Names of the lists shipped in this package (``NAME.toml`` next to this file).
BUILTIN_LISTS: tuple[str, ...] = ("kz2014", "tor", "messaging", "circumvention")

#: Citizen Lab NEW category codes (test-lists 00-LEGEND-new_category_codes.csv).
CATEGORY_CODES: frozenset[str] = frozenset(
    "ALDR REL PORN PROV POLR HUMR ENV MILX HATE NEWS XED PUBH GMB ANON DATE GRP LGBT FILE HACK "
    "COMT MMED HOST SRCH GAME CULTR ECON GOVT COMM CTRL IGO MISC".split()
)

#: ``censored``: the source says it was blocked; ``control``: named as popular / accessible;
#: ``listed``: the report does not speak of it (no claim): it is on the list for its subject (e.g.
#: Signal, which OONI measures with WhatsApp and Telegram), and its notes say where it comes from.
ROLES: tuple[str, ...] = ("censored", "control", "listed")
#: The roles that need a claim (the report's words); ``listed`` entries must have none.
CLAIMED_ROLES = ("censored", "control")

_CLAIM_KEYS = ("quote", "section", "footnote", "dates", "mechanism")
#: ``source``: where the entry's address comes from when that is not the report (e.g. Tor's
#: auth_dirs.inc, an OONI spec); it is appended to the target's notes.
_TARGET_KEYS = {"url", "category", "claim", "notes", "role", "source"}


def _read_toml(name: str) -> dict[str, Any]:
    if name not in BUILTIN_LISTS:
        raise TargetListError(f"unknown built-in target list {name!r} (available: {', '.join(BUILTIN_LISTS)})")
    res = resources.files(__name__).joinpath(f"{name}.toml")
    try:
        return tomllib.loads(res.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TargetListError(f"{name}.toml: {exc}") from None


def _read_builtin(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The list's [[target]] entries, and its shared claims ([claims.KEY] tables that an entry
    names with ``claim = "KEY"``: one outage or one sentence cited by fifty endpoints)."""
    data = _read_toml(name)
    entries = data.get("target")
    if not isinstance(entries, list) or not entries:
        raise TargetListError(f"{name}.toml: no [[target]] entries")
    shared = data.get("claims", {})
    if not isinstance(shared, dict):
        raise TargetListError(f"{name}.toml: [claims] must be a table of claims")
    return entries, shared


def builtin_info(name: str) -> dict[str, str]:
    """A built-in list's own metadata: name, source, date (of the data it was taken from)."""
    data = _read_toml(name)
    return {k: str(data.get(k, "")) for k in ("name", "source", "date")}


def shared_claim(name: str, key: str) -> Claim:
    """One of a built-in list's shared claims ([claims.KEY]), e.g. ("tor", "tor-dpi") for targets
    added at run time (guards sampled from a consensus) that stand for what the list's entries do."""
    _, shared = _read_builtin(name)
    if key not in shared:
        raise TargetListError(f"{name}.toml: no [claims.{key}]")
    return _parse_claim(f"{name}.toml: [claims.{key}]", shared[key])


def _parse_claim(where: str, raw_claim: Any) -> Claim:
    if not isinstance(raw_claim, dict):
        raise TargetListError(f"{where}: missing [target.claim]")
    bad = set(raw_claim) - set(_CLAIM_KEYS)
    if bad:
        raise TargetListError(f"{where}: unknown claim key(s) {', '.join(sorted(bad))}")
    fields: dict[str, str] = {}
    for key in _CLAIM_KEYS:
        value = raw_claim.get(key)
        if not isinstance(value, str):
            raise TargetListError(f"{where}: claim.{key} must be a string")
        fields[key] = value
    if not fields["quote"].strip():
        raise TargetListError(f"{where}: claim.quote is empty")
    return Claim(**fields)


def _parse_entry(name: str, index: int, entry: Any, shared: dict[str, Any] | None = None) -> tuple[Target, str]:
    where = f"{name}.toml: target #{index}"
    if not isinstance(entry, dict):
        raise TargetListError(f"{where}: not a table")
    url = entry.get("url")
    if not isinstance(url, str):
        raise TargetListError(f"{where}: missing 'url'")
    where = f"{where} ({url})"
    unknown = set(entry) - _TARGET_KEYS
    if unknown:
        raise TargetListError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        check_url(url)
    except URLProblem as exc:
        raise TargetListError(f"{where}: {exc}") from None
    category = entry.get("category", "")
    if category not in CATEGORY_CODES:
        raise TargetListError(f"{where}: unknown category code {category!r}")
    role = entry.get("role")
    if role not in ROLES:
        raise TargetListError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}")
    notes = entry.get("notes", "")
    if not isinstance(notes, str):
        raise TargetListError(f"{where}: notes must be a string")
    source = entry.get("source", "")
    if not isinstance(source, str):
        raise TargetListError(f"{where}: source must be a string")
    raw_claim = entry.get("claim")
    claim: Claim | None = None
    if role in CLAIMED_ROLES:
        if isinstance(raw_claim, str):
            if raw_claim not in (shared or {}):
                raise TargetListError(f"{where}: claim {raw_claim!r} is not one of the list's [claims.*] tables")
            raw_claim = (shared or {})[raw_claim]
        claim = _parse_claim(where, raw_claim)
    else:
        # The report does not speak of it: no claim, and the notes must say so and why it is here.
        if raw_claim is not None:
            raise TargetListError(f"{where}: role 'listed' means the report does not speak of it: no claim")
        if not notes.strip() or not source.strip():
            raise TargetListError(f"{where}: a 'listed' entry needs notes (why it is listed) and a source")
    if source:
        notes = f"{notes} Source: {source}." if notes else f"Source: {source}."
    return Target(url=url, category=category, claim=claim, notes=notes), role


def _load_builtin_entries(name: str) -> list[tuple[Target, str]]:
    entries, shared = _read_builtin(name)
    parsed = [_parse_entry(name, i, e, shared) for i, e in enumerate(entries, start=1)]
    seen: set[str] = set()
    for target, _ in parsed:
        key = check_url(target.url)
        if key in seen:
            raise TargetListError(f"{name}.toml: duplicate target {target.url}")
        seen.add(key)
    return parsed


def load_builtin(name: str = "kz2014") -> list[Target]:
    """The targets of a built-in list, in file order, each with the report's claim."""
    return [target for target, _ in _load_builtin_entries(name)]


def load_builtin_roles(name: str = "kz2014") -> dict[str, str]:
    """URL -> role (``censored`` or ``control``) for a built-in list."""
    return {target.url: role for target, role in _load_builtin_entries(name)}


def load(spec: str | Path) -> LoadResult:
    """Load a built-in list by name, or else a file by path.

    An existing file wins over a built-in name, so a file called ``kz2014`` in the current
    directory is still loadable.
    """
    path = Path(spec)
    if str(spec) == "-":  # standard input
        return load_file("-")
    if str(spec) in BUILTIN_LISTS and not path.exists():
        return LoadResult(targets=load_builtin(str(spec)), errors=[], duplicates=0, format="builtin")
    return load_file(path)
