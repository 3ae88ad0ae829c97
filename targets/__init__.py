"""kzprobe.targets: what to measure.

Two kinds of lists:

* built-in lists shipped with the package (``kz2014``: seeded from Freedom House's "Freedom on
  the Net 2014: Kazakhstan", each entry citing the report's words); see :func:`load_builtin`;
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
    "ROLES",
    "LoadResult",
    "TargetListError",
    "load",
    "load_builtin",
    "load_builtin_roles",
    "load_file",
]

#: Names of the lists shipped in this package (``NAME.toml`` next to this file).
BUILTIN_LISTS: tuple[str, ...] = ("kz2014",)

#: Citizen Lab NEW category codes (test-lists 00-LEGEND-new_category_codes.csv).
CATEGORY_CODES: frozenset[str] = frozenset(
    "ALDR REL PORN PROV POLR HUMR ENV MILX HATE NEWS XED PUBH GMB ANON DATE GRP LGBT FILE HACK "
    "COMT MMED HOST SRCH GAME CULTR ECON GOVT COMM CTRL IGO MISC".split()
)

#: ``censored``: the source says it was blocked; ``control``: named as popular / accessible.
ROLES: tuple[str, ...] = ("censored", "control")

_CLAIM_KEYS = ("quote", "section", "footnote", "dates", "mechanism")
_TARGET_KEYS = {"url", "category", "claim", "notes", "role"}


def _read_builtin(name: str) -> list[dict[str, Any]]:
    if name not in BUILTIN_LISTS:
        raise TargetListError(f"unknown built-in target list {name!r} (available: {', '.join(BUILTIN_LISTS)})")
    res = resources.files(__name__).joinpath(f"{name}.toml")
    try:
        data = tomllib.loads(res.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TargetListError(f"{name}.toml: {exc}") from None
    entries = data.get("target")
    if not isinstance(entries, list) or not entries:
        raise TargetListError(f"{name}.toml: no [[target]] entries")
    return entries


def _parse_entry(name: str, index: int, entry: Any) -> tuple[Target, str]:
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
    raw_claim = entry.get("claim")
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
    notes = entry.get("notes", "")
    if not isinstance(notes, str):
        raise TargetListError(f"{where}: notes must be a string")
    return Target(url=url, category=category, claim=Claim(**fields), notes=notes), role


def _load_builtin_entries(name: str) -> list[tuple[Target, str]]:
    entries = _read_builtin(name)
    parsed = [_parse_entry(name, i, e) for i, e in enumerate(entries, start=1)]
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
