"""Every command's machine output against the JSON Schemas in docs/schema (docs/output.md)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from kzprobe.output import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "docs" / "schema"
QA = ROOT.parent / "shared" / "ooni-qa"
PCAP = ROOT / "fixtures" / "pcaps" / "method-sni-reset.pcap"


def _schema(name: str) -> dict[str, Any]:
    return dict(json.loads((SCHEMAS / name).read_text("utf-8")))


def _validator(name: str) -> jsonschema.protocols.Validator:
    registry: Registry = Registry()
    for p in SCHEMAS.glob("*.json"):
        doc = json.loads(p.read_text("utf-8"))
        registry = registry.with_resource(p.name, Resource.from_contents(doc))
        registry = registry.with_resource(doc["$id"], Resource.from_contents(doc))
    schema = _schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def _kz(*argv: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("kzprobe")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kzprobe.cli"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})


def test_schemas_reject_what_they_must() -> None:
    """The schemas can fail: a verdict with rule inside evidence, or a null-less mechanism."""
    v = _validator("verdict.schema.json")
    good = {"target": "https://a.example/", "domain": "a.example", "status": "ok", "mechanism": None,
            "detail": "ok", "rule": "ok.fetched", "confidence": 0.9,
            "evidence": {"observations": [1], "packets": [], "sentence": "fetched"}}
    v.validate(good)
    for bad in ({**good, "rule": None}, {**good, "evidence": {**good["evidence"], "rule": "x"}},
                {**good, "status": "blocked"}, {k: x for k, x in good.items() if k != "evidence"}):
        assert not v.is_valid(bad), bad


@pytest.fixture(scope="module")
def live(loopnet: Any, loopnet_lib: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("schema")
    names = ["ok.test", "nx.test", "tlsreset.test", "down.test"]
    out = loopnet_lib.run_kzprobe(loopnet, [loopnet.url(n) for n in names], tmp / "s.db")
    assert out.returncode == 0, out.stderr
    return {"db": out.db, "json": json.loads(out.stdout), "n": len(names)}


def test_run_and_verdicts_json(live: dict[str, Any]) -> None:
    env = _validator("envelope.schema.json")
    env.validate(live["json"])
    assert live["json"]["command"] == "run" and len(live["json"]["verdicts"]) == live["n"]
    p = _kz("verdicts", "--db", str(live["db"]), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    env.validate(doc)
    assert doc["command"] == "verdicts"
    strip = [{k: x for k, x in v.items()} for v in doc["verdicts"]]
    assert strip == live["json"]["verdicts"], "run and verdicts print the same verdict objects"


def test_verdicts_jsonl_and_csv(live: dict[str, Any]) -> None:
    v = _validator("verdict.schema.json")
    p = _kz("verdicts", "--db", str(live["db"]), "--format", "jsonl")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == live["n"]
    for line in lines:
        v.validate(json.loads(line))
    c = _kz("verdicts", "--db", str(live["db"]), "--format", "csv")
    rows = list(csv.reader(io.StringIO(c.stdout)))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == live["n"] + 1
    e = _kz("export", "--db", str(live["db"]), "--format", "csv")
    assert e.returncode == 0, e.stderr
    assert tuple(next(csv.reader(io.StringIO(e.stdout)))) == CSV_COLUMNS, "one CSV column set for verdicts"


def test_replay_json() -> None:
    p = _kz("replay", str(PCAP), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    _validator("envelope.schema.json").validate(doc)
    assert doc["command"] == "replay" and doc["verdicts"]
    assert all(v["capture"]["file"] == str(PCAP) for v in doc["verdicts"])
    assert all(v["evidence"]["packets"] for v in doc["verdicts"] if v["status"] == "blocked")


def test_replay_json_lists_failed_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    p = _kz("replay", str(PCAP), str(bad), "--format", "json")
    assert p.returncode != 0
    doc = json.loads(p.stdout)
    _validator("envelope.schema.json").validate(doc)
    assert [x["where"] for x in doc["problems"]] == [str(bad)]


CENTRACE = ROOT.parent / "shared" / "real-pcaps" / "centrace"


@pytest.mark.skipif(not CENTRACE.is_dir(), reason="../shared (real-pcaps/centrace) is not available")
def test_trace_json() -> None:
    test = CENTRACE / "188.65.24.82_www.nifty.org_www.nifty.org.pcap"
    control = CENTRACE / "188.65.24.82_www.nifty.org_example.com.pcap"
    p = _kz("trace", "--from-pcap", str(test), "--control", str(control), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    _validator("envelope.schema.json").validate(doc)
    assert doc["command"] == "trace" and doc["verdicts"] == []
    # The CenTrace README: nifty.org's censor is at 134.0.217.233.
    assert doc["trace"]["hop_address"] == "134.0.217.233"


@pytest.mark.skipif(not QA.is_dir(), reason="../shared (ooni-qa) is not available")
def test_import_ooni_jsonl(tmp_path: Path) -> None:
    p = _kz("import-ooni", str(QA / "cloudflareCAPTCHAWithHTTP.json"), "--db", str(tmp_path / "o.db"),
            "--format", "jsonl", "--workers", "1", "--no-progress")
    assert p.returncode == 0, p.stderr
    v = _validator("verdict.schema.json")
    lines = p.stdout.splitlines()
    assert lines
    for line in lines:
        v.validate(json.loads(line))
