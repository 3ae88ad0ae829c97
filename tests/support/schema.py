"""The JSON Schemas of docs/schema (docs/output.md), as validators for any test's output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schema"


def validator(name: str) -> Any:
    """A validator for ``docs/schema/NAME`` that resolves the other schemas it refers to."""
    registry: Registry = Registry()
    for p in SCHEMAS.glob("*.json"):
        doc = json.loads(p.read_text("utf-8"))
        registry = registry.with_resource(p.name, Resource.from_contents(doc))
        registry = registry.with_resource(doc["$id"], Resource.from_contents(doc))
    schema = json.loads((SCHEMAS / name).read_text("utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)
